"""benchmarks.attention's command line on a CPU, without running a benchmark: what ``--allow-cpu`` runs when
``--quick`` is given too. The harness itself: test_benchmarks.py."""

from __future__ import annotations

import pytest

from benchmarks import attention as bench

SHAPES = ("head_dims", "seq_lens", "batch_tokens", "hidden")


# --- --allow-cpu keeps its tiny shapes whatever --quick says -------------------------------------


@pytest.mark.parametrize("suite", [[], ["--suite", "masks"], ["--memory"]], ids=["attention", "masks", "memory"])
def test_quick_with_allow_cpu_on_a_cpu_keeps_the_tiny_shapes(suite):
    """``--quick --allow-cpu`` on a CPU ran --quick's GPU shapes (16k tokens, N 4k) in interpret mode: hours."""
    tiny = bench.parse_args(["--allow-cpu", *suite], on_cpu=True)
    quick = bench.parse_args(["--quick", "--allow-cpu", *suite], on_cpu=True)
    assert quick.profile == tiny.profile == "cpu"
    assert {k: getattr(quick, k) for k in SHAPES} == {k: getattr(tiny, k) for k in SHAPES}
    if quick.memory:
        assert max(quick.seq_lens) <= 256
    else:
        problems = bench.plan(quick)
        assert problems and [p.fields() for p in problems] == [p.fields() for p in bench.plan(tiny)]
        assert max(p.shape.batch * p.shape.seq_q * p.shape.num_heads * p.shape.head_dim for p in problems) <= 2**15


def test_quick_with_allow_cpu_keeps_shapes_given_by_flag_and_gpu_quick():
    o = bench.parse_args(["--quick", "--allow-cpu", "--seq-lens", "256", "--head-dims", "16"], on_cpu=True)
    assert (o.seq_lens, o.head_dims, o.profile) == ((256,), (16,), "cpu")
    on_gpu = bench.parse_args(["--quick", "--allow-cpu"], on_cpu=False)  # a GPU: --allow-cpu changes nothing
    assert (on_gpu.profile, on_gpu.head_dims, on_gpu.seq_lens) == ("quick", (64, 128), (1024, 4096))
