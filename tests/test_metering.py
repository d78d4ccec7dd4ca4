"""Throughput metering of the training loop: tokens/s and MFU per logged step, pauses left out."""

import pytest

from train.metering import ThroughputMeter, format_rate


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _m(loss):
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5}


def test_meter_times_logged_steps_from_the_step_after_them():
    clock = FakeClock()
    meter = ThroughputMeter(100, flops_per_token=6.0, peak_flops=1000.0, n_devices=2, clock=clock)
    clock.t = 5.0
    assert meter.step(1, _m(5.0), log=False) is None  # compilation, not throughput
    assert meter.compile_s == 5.0
    clock.t = 6.0
    assert meter.step(2, _m(4.0), log=True) is None  # pending: read once step 3 is queued
    clock.t = 7.0
    record = meter.step(3, _m(3.5), log=False)
    assert record == {"step": 2, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 50.0,  # 100 tokens / 2 s
                      "mfu": 50.0 * 6.0 / 2000.0, "grad_norm": 0.5}
    clock.t = 8.0
    assert meter.step(4, _m(3.0), log=True) is None
    clock.t = 9.0
    # Step 3 was queued before step 2's record and stays counted in step 4's interval.
    assert meter.flush()["tokens_per_s"] == 200 / 2.0
    assert meter.flush() is None


def test_meter_leaves_pauses_out_and_refuses_a_restart_over_a_pending_step():
    clock = FakeClock()
    meter = ThroughputMeter(100, flops_per_token=6.0, peak_flops=None, clock=clock)
    meter.step(1, _m(5.0), log=True)  # a logged first step: nothing timed yet
    clock.t = 1.0
    record = meter.step(2, _m(4.0), log=True)
    assert (record["step"], record["tokens_per_s"]) == (1, None)
    with pytest.raises(RuntimeError, match="step 2 is still pending"):
        meter.restart()  # a checkpoint at a logged step must report it first
    clock.t = 3.0
    record = meter.flush()
    assert (record["step"], record["tokens_per_s"], record["mfu"]) == (2, 100 / 2.0, None)
    clock.t = 100.0  # an evaluation or a checkpoint
    meter.restart()
    for step in (3, 4):
        clock.t += 1.0
        meter.step(step, _m(3.0), log=step == 4)
    clock.t += 1.0
    assert meter.flush()["tokens_per_s"] == 200 / 3.0  # the pause is left out


def test_format_rate():
    assert (format_rate(None), format_rate(12_345.0), format_rate(2_500_000.0)) == ("-", "12.3k", "2.50M")


# ---------------------------------------------------------------- a careless user
