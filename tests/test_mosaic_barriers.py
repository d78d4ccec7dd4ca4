"""The Mosaic GPU kernels' barrier protocols with one warpgroup lagging (CPU, interpret mode).

Mosaic GPU's interpreter runs a CTA's warpgroups as threads and checks that
every thread waiting on an mbarrier observes each of its phases: a barrier
that completes twice before a waiter has looked would, on the GPU, leave that
waiter's parity wait one phase behind (a hang or a read of the wrong slot).
Whether a kernel gets there depends on how far one warpgroup can fall behind
the others, which ordinary interpret runs rarely explore: the forward's
persistent, overlapped schedule had such a hand-over between tiles and failed
once in CI out of many runs. Here one warpgroup is slowed on purpose (a 20 ms
pause before a random 30% of its barrier waits and arrivals), in turn each
compute warpgroup and the memory warpgroup, and the kernels must still agree
with the float64 reference: the persistent forward in both schedules (plain, and
with a window and per-batch lengths), and three backward kernels. With the old hand-over this failed 7 runs of 10
with warpgroup 0 lagging.

This relies on the interpreter's ``Barrier`` class (``jax._src``; jax is pinned
to 0.11.2): the test fails, not skips, if it is not where it was.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from pallas_flash.backends.mosaic_gpu import MosaicConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.common import MEMORY_WG
from tests.conftest import ON_GPU
from tests.test_mosaic_gpu import BWD_INTERPRET_CASES, INTERPRET_CASES, _check
from tests.test_mosaic_window import CASES as WINDOW_CASES
from tests.test_mosaic_window import _check as check_window

pytestmark = pytest.mark.skipif(ON_GPU, reason="interpret mode (the GPU suites run the compiled kernels)")

LAG_S = 0.02  # a pause long enough for the other warpgroups to run ahead by several barrier phases
LAG_PROBABILITY = 0.3


@pytest.fixture
def lagging(monkeypatch):
    """``lagging(wg, seed)``: from now on warpgroup ``wg`` pauses before some of its barrier waits and arrivals."""
    from jax._src.pallas.mosaic_gpu.interpret import shared_memory

    barrier = shared_memory.Barrier

    def install(wg: int, seed: int):
        draw = random.Random(seed)

        def lag(thread):
            if getattr(thread, "warpgroup_id", None) == wg and draw.random() < LAG_PROBABILITY:
                time.sleep(LAG_S)

        def wait(self, thread, *args, **kwargs):
            lag(thread)
            return original_wait(self, thread, *args, **kwargs)

        def arrive(self, thread, *args, **kwargs):
            lag(thread)
            return original_arrive(self, thread, *args, **kwargs)

        original_wait, original_arrive = barrier.wait, barrier.arrive
        monkeypatch.setattr(barrier, "wait", wait)
        monkeypatch.setattr(barrier, "arrive", arrive)

    return install


@pytest.mark.parametrize("lagging_wg", [0, 1, MEMORY_WG], ids=["wg0_lags", "wg1_lags", "memory_lags"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("name", ["causal_tq>tk", "causal_tq<tk_gqa2"])
def test_persistent_forward_with_a_lagging_warpgroup(name, overlap, lagging_wg, lagging, seed):
    """Persistent CTAs walk several tiles each (three CTAs in interpret mode), so the hand-overs between tiles
    (the K/V ring, the next Q, the schedules' turns) are exercised, each warpgroup in turn left behind."""
    shape, causal, dtype, fwd = INTERPRET_CASES[name]
    lagging(lagging_wg, seed)
    fwd = dataclasses.replace(fwd, overlap=overlap, persistent=True)
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=fwd), grads=False, interpret=True)


@pytest.mark.parametrize("lagging_wg", [0, 1, MEMORY_WG], ids=["wg0_lags", "wg1_lags", "memory_lags"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
def test_persistent_windowed_forward_with_a_lagging_warpgroup(overlap, lagging_wg, lagging, seed):
    """A window and per-batch lengths: warpgroup 1 starts a block later than warpgroup 0, rows that see no key,
    a batch row with no keys at all, so the schedules release blocks only the partner sees, before and after."""
    shape, causal, window, lengths = WINDOW_CASES["causal_w100_lengths"]
    lagging(lagging_wg, seed)
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap, persistent=True)
    check_window(shape, causal, window, lengths, fwd, seed)


@pytest.mark.parametrize("lagging_wg", [0, 1, MEMORY_WG], ids=["wg0_lags", "wg1_lags", "memory_lags"])
@pytest.mark.parametrize("name", ["causal_tq<tk_gqa2_fused", "causal_tq>tk_gqa2_rows128", "d256_causal_tq<tk_gqa2"])
def test_backward_with_a_lagging_warpgroup(name, lagging_wg, lagging, seed):
    """The backward kernels' rings and hand-overs (dK/dV's dS double buffer, dQ's, the D=256 role split's P)."""
    shape, causal, dtype, bwd = BWD_INTERPRET_CASES[name]
    lagging(lagging_wg, seed)
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=MosaicForwardConfig(64, 64, 2), bwd=bwd), grads=True,
           interpret=True)
