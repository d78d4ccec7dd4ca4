"""The backward kernels' grids by length under causal when small (``occupancy.backward_by_length``).

Interpret mode on the CPU: the order of the CTAs changes, nothing they compute, so the deterministic gradients are
bit-identical to those with heads outermost, and the fused mode's (summed per CTA in interpret mode) likewise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash.backends.mosaic_gpu import common, occupancy
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.config import MosaicBackwardConfig
from pallas_flash.testing.shapes import Shape
from tests.conftest import ON_GPU
from tests.test_mosaic_gpu import _residuals


def test_the_grid_puts_the_tile_outermost_only_under_causal_and_below_the_threshold(monkeypatch):
    monkeypatch.setattr(occupancy, "sm_count", lambda: 132)
    kw = dict(head_name="head", tile_name="q_tile")
    # GPT-2 124M at T=4096 (B=4, 12 heads, 32 tiles): 11.6 CTAs per SM; 32 heads: 31 per SM
    assert common.backward_grid(4, 12, 32, causal=True, **kw) == ((32, 4, 12), ("q_tile", "batch", "head"))
    assert common.backward_grid(4, 12, 32, causal=False, **kw) == ((4, 12, 32), ("batch", "head", "q_tile"))
    assert common.backward_grid(4, 32, 32, causal=True, **kw) == ((4, 32, 32), ("batch", "head", "q_tile"))
    # the boundary: 14 x 132 = 1848 CTAs
    assert occupancy.backward_by_length(1847, 64, causal=True)
    assert not occupancy.backward_by_length(1848, 64, causal=True)
    assert not occupancy.backward_by_length(1847, 64, causal=True, sms=100)
    # 16k rows (128 tiles) per head: heads outermost at any grid
    assert not occupancy.backward_by_length(1024, 128, causal=True)
    assert common.backward_grid(1, 8, 128, causal=True, **kw) == ((1, 8, 128), ("batch", "head", "q_tile"))


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("bwd", [MosaicBackwardConfig(block_q=64, num_stages=2, dq_block_kv=64, dq_num_stages=2),
                                 MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False)],
                         ids=["deterministic", "fused"])
def test_by_length_changes_no_bit(monkeypatch, bwd, seed):
    """Causal, GQA 2:1, ragged, Tq != Tk, several key and query tiles."""
    q, k, v, out, lse2, do, dlse, spec = _residuals(Shape("o", 2, 300, 270, 4, 2, 64), jnp.bfloat16, True, seed)
    monkeypatch.setattr(occupancy, "SMALL_GRID_BACKWARD_CTAS_PER_SM", 0)
    want = jax.block_until_ready(mosaic_backward(q, k, v, out, lse2, do, dlse, spec=spec, config=bwd, interpret=True))
    monkeypatch.setattr(occupancy, "SMALL_GRID_BACKWARD_CTAS_PER_SM", 1e9)
    grids = []  # what the launchers asked for: both kernels (one when dQ is fused), tiles outermost
    from pallas_flash.backends.mosaic_gpu import backward_dkdv, backward_dq
    for module in (backward_dkdv, backward_dq):
        monkeypatch.setattr(module, "backward_grid", lambda *a, **kw: grids.append(common.backward_grid(*a, **kw))
                            or grids[-1])
    got = jax.block_until_ready(mosaic_backward(q, k, v, out, lse2, do, dlse, spec=spec, config=bwd, interpret=True))
    assert [names for _, names in grids] == [("kv_tile", "batch", "kv_head")] + (
        [("q_tile", "batch", "head")] if bwd.deterministic else [])
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert bool(jnp.isfinite(w.astype(jnp.float32)).all()), name
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), name)
