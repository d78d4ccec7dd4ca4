"""Throughput of a training run: tokens/s and MFU of the logged steps.

Steps are dispatched back to back, so the host runs ahead of the device; a
logged step's metrics are read (which waits for that step) only once the step
after it is queued, so that logging never leaves the device idle while the
host dispatches the next step. :class:`ThroughputMeter` keeps that pending
step and the clock:

* the first step is compilation, not throughput: its time is ``compile_s``
  and the clock starts after it;
* a logged step's tokens/s is the tokens of the steps queued up to it over
  the time since the previous record (or since the last restart); the steps
  queued after it stay counted for the next record;
* a pause (evaluation, checkpoint) must not count: the caller reports the
  pending step first (:meth:`ThroughputMeter.flush`, which waits for that step
  anyway), then restarts the clock after the pause (:meth:`ThroughputMeter.restart`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["ThroughputMeter", "format_rate"]


class ThroughputMeter:
    """tokens/s and MFU of the logged steps (see the module docstring).

    Args:
      tokens_per_step: tokens one optimizer step consumes (all devices).
      flops_per_token: training FLOPs per token (``gpt2.flops_per_token``).
      peak_flops: dense peak FLOP/s of one device, or None (no MFU).
      n_devices: devices the step runs on.
      clock: seconds, monotonic (a fake one in tests).
    """

    def __init__(self, tokens_per_step: int, *, flops_per_token: float, peak_flops: float | None,
                 n_devices: int = 1, clock: Callable[[], float] = time.perf_counter):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_total = peak_flops * n_devices if peak_flops else None
        self.compile_s: float | None = None  # the first step's time, once it is known
        self._clock = clock
        self._t0 = clock()
        self._tokens = 0  # tokens of the steps queued since _t0 and not yet reported
        self._pending: tuple[int, Mapping[str, Any], int] | None = None

    def step(self, done: int, metrics: Mapping[str, Any], *, log: bool) -> dict[str, Any] | None:
        """Account for step ``done``, just queued, with its (unread) ``metrics``.

        The first call waits for the step and sets ``compile_s``. Returns the
        record of the previous logged step if one was pending (read now), else
        None; with ``log`` this step becomes the pending one.
        """
        if self.compile_s is None:
            jax.block_until_ready(metrics)
            self.compile_s = self._clock() - self._t0
            self.restart()
        else:
            self._tokens += self.tokens_per_step
        record = self.flush()
        if log:
            self._pending = (done, metrics, self._tokens)
        return record

    def flush(self) -> dict[str, Any] | None:
        """The pending logged step's record (waits for that step), or None if none is pending.

        ``{step, loss, lr, tokens_per_s, mfu, grad_norm}``; ``tokens_per_s``
        is None when no step was timed (a logged first step), ``mfu`` when
        there is no peak to divide by.
        """
        if self._pending is None:
            return None
        done, m, tokens = self._pending
        self._pending = None
        loss = float(m["loss"])  # waits for that step (not for the one queued after it)
        now = self._clock()
        tps = tokens / (now - self._t0) if tokens else None
        mfu = tps * self.flops_per_token / self.peak_total if (tps and self.peak_total) else None
        self._t0, self._tokens = now, self._tokens - tokens  # steps queued since stay counted
        return {
            "step": done, "loss": loss, "lr": float(m["lr"]),
            "tokens_per_s": tps, "mfu": mfu, "grad_norm": float(m["grad_norm"]),
        }

    def restart(self) -> None:
        """Start the clock afresh: after a pause, which tokens/s must leave out.

        A pending step must be flushed before the pause: its interval ends
        there, and restarting under it would leave its tokens counted against
        the next interval (the negative tokens/s of an earlier version).
        """
        if self._pending is not None:
            raise RuntimeError(f"step {self._pending[0]} is still pending: flush() it before the pause")
        self._t0, self._tokens = self._clock(), 0


def format_rate(x: float | None) -> str:
    """``12.3k`` / ``1.23M`` (tokens/s) for the progress bar; ``-`` for None."""
    if x is None:
        return "-"
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"
