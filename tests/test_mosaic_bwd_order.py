"""The order the one-CTA-per-tile kernels hand out their CTAs in: under causal the backward's by length within groups
of (batch row, head) pairs (``occupancy.BACKWARD_HEAD_GROUP``), else by length over every pair when its grid is small
(``occupancy.backward_by_length``); the forward in groups only when ``occupancy.FORWARD_HEAD_GROUP`` (one CTA per
tile; an A/B knob) or, persistent, when ``PERSISTENT_FORWARD_HEAD_GROUP`` picks a group ("auto" by default: when
the K/V of all pairs overflows L2), with odd rounds to the CTAs in reverse (``PERSISTENT_FORWARD_SNAKE``, on).

Interpret mode on the CPU: the order of the CTAs changes, nothing they compute, so the deterministic gradients and
the forward's output are bit-identical in every order, and the fused mode's (summed per CTA in interpret mode)
likewise. A CTA order that missed a tile or ran one twice would leave a tile unwritten.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash.backends.mosaic_gpu import common, occupancy
from pallas_flash.backends.mosaic_gpu import forward as forward_module
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.config import MosaicBackwardConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.spec import AttentionInputs
from pallas_flash.testing.shapes import Shape
from tests.conftest import ON_GPU
from tests.test_mosaic_gpu import _residuals


def _grid(order: common.CtaOrder):
    return order.grid, order.grid_names


def test_without_groups_the_grid_puts_the_tile_outermost_only_under_causal_and_below_the_threshold(monkeypatch):
    monkeypatch.setattr(occupancy, "sm_count", lambda: 132)
    monkeypatch.setattr(occupancy, "BACKWARD_HEAD_GROUP", None)
    kw = dict(head_name="head", tile_name="q_tile")
    # GPT-2 124M at T=4096 (B=4, 12 heads, 32 tiles): 11.6 CTAs per SM; 32 heads: 31 per SM
    assert _grid(common.backward_grid(4, 12, 32, causal=True, **kw)) == ((32, 4, 12), ("q_tile", "batch", "head"))
    assert _grid(common.backward_grid(4, 12, 32, causal=False, **kw)) == ((4, 12, 32), ("batch", "head", "q_tile"))
    assert _grid(common.backward_grid(4, 32, 32, causal=True, **kw)) == ((4, 32, 32), ("batch", "head", "q_tile"))
    # the boundary: 14 x 132 = 1848 CTAs
    assert occupancy.backward_by_length(1847, 64, causal=True)
    assert not occupancy.backward_by_length(1848, 64, causal=True)
    assert not occupancy.backward_by_length(1847, 64, causal=True, sms=100)
    # 16k rows (128 tiles) per head: heads outermost at any grid
    assert not occupancy.backward_by_length(1024, 128, causal=True)
    assert _grid(common.backward_grid(1, 8, 128, causal=True, **kw)) == ((1, 8, 128), ("batch", "head", "q_tile"))


def test_the_backwards_groups(monkeypatch):
    monkeypatch.setattr(occupancy, "sm_count", lambda: 132)
    kw = dict(head_name="head", tile_name="q_tile")
    assert occupancy.group_size(12, 8) == 6 and occupancy.group_size(128, 8) == 8 and occupancy.group_size(7, 4) == 1
    assert occupancy.BACKWARD_HEAD_GROUP == 4 and occupancy.FORWARD_HEAD_GROUP is None  # the defaults measured
    assert occupancy.PERSISTENT_FORWARD_HEAD_GROUP == "auto" and occupancy.PERSISTENT_FORWARD_SNAKE  # NOTES 107
    # 4 x 32 pairs in 32 groups of 4: (group, tile, pair in the group); not under causal: heads outermost
    assert _grid(common.backward_grid(4, 32, 32, causal=True, **kw)) == ((32, 32, 4), ("head_group", "q_tile",
                                                                                        "in_group"))
    assert _grid(common.backward_grid(4, 32, 32, causal=False, **kw)) == ((4, 32, 32), ("batch", "head", "q_tile"))
    monkeypatch.setattr(occupancy, "BACKWARD_HEAD_GROUP", 8)
    assert _grid(common.backward_grid(4, 32, 32, causal=True, **kw)) == ((16, 32, 8), ("head_group", "q_tile",
                                                                                        "in_group"))
    # a group of every pair is by length
    assert _grid(common.backward_grid(1, 8, 16, causal=True, **kw)) == ((16, 1, 8), ("q_tile", "batch", "head"))
    # 11 pairs have no divisor from 2 to 8: the small-grid rule decides (by length here; heads outermost past it)
    assert _grid(common.backward_grid(1, 11, 16, causal=True, **kw)) == ((16, 1, 11), ("q_tile", "batch", "head"))
    assert _grid(common.backward_grid(1, 11, 128, causal=True, **kw)) == ((1, 11, 128), ("batch", "head", "q_tile"))


ORDERS = {  # name: (occupancy settings, the dK/dV and dQ kernels' grid names for B=2, 2 K/V heads, 4 query heads)
    "by_length": (dict(BACKWARD_HEAD_GROUP=None, SMALL_GRID_BACKWARD_CTAS_PER_SM=1e9), [("kv_tile", "batch", "kv_head"),
                                                             ("q_tile", "batch", "head")]),
    "groups_of_2": (dict(BACKWARD_HEAD_GROUP=2), [("head_group", "kv_tile", "in_group"), ("head_group", "q_tile", "in_group")]),
}


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bwd", [MosaicBackwardConfig(block_q=64, num_stages=2, dq_block_kv=64, dq_num_stages=2),
                                 MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False)],
                         ids=["deterministic", "fused"])
def test_the_backward_order_changes_no_bit(monkeypatch, bwd, order, seed):
    """Causal, GQA 2:1, ragged, Tq != Tk, several key and query tiles."""
    q, k, v, out, lse2, do, dlse, spec = _residuals(Shape("o", 2, 300, 270, 4, 2, 64), jnp.bfloat16, True, seed)
    monkeypatch.setattr(occupancy, "BACKWARD_HEAD_GROUP", None)  # heads outermost
    monkeypatch.setattr(occupancy, "SMALL_GRID_BACKWARD_CTAS_PER_SM", 0)
    want = jax.block_until_ready(mosaic_backward(q, k, v, out, lse2, do, dlse, spec=spec, config=bwd, interpret=True))
    settings, names = ORDERS[order]
    for name, value in settings.items():
        monkeypatch.setattr(occupancy, name, value)
    grids = []  # what the launchers asked for: both kernels (one when dQ is fused)
    from pallas_flash.backends.mosaic_gpu import backward_dkdv, backward_dq
    for module in (backward_dkdv, backward_dq):
        monkeypatch.setattr(module, "backward_grid", lambda *a, **kw: grids.append(common.backward_grid(*a, **kw))
                            or grids[-1])
    got = jax.block_until_ready(mosaic_backward(q, k, v, out, lse2, do, dlse, spec=spec, config=bwd, interpret=True))
    assert [g.grid_names for g in grids] == names[: 2 if bwd.deterministic else 1]
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert bool(jnp.isfinite(w.astype(jnp.float32)).all()), name
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), name)


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("compute_wgs", [2, 3])
def test_the_forwards_groups_change_no_bit(monkeypatch, compute_wgs, seed):
    """The one-CTA-per-tile causal forward in groups of 2 and 3 of the 6 (batch row, head) pairs against heads
    outermost: GQA 3:1, Tq > Tk (the causal diagonal off the corner), ragged, several query tiles per head."""
    q, k, v, *_, spec = _residuals(Shape("f", 2, 400, 300, 3, 1, 64), jnp.bfloat16, True, seed)
    fwd = MosaicForwardConfig(block_q=64, block_kv=64, num_stages=2, overlap=compute_wgs == 3,
                              compute_wgs=compute_wgs)
    run = lambda: jax.block_until_ready(mosaic_forward(q, k, v, AttentionInputs(), spec=spec, config=fwd,
                                                       interpret=True))
    want = run()
    assert bool(jnp.isfinite(want[0].astype(jnp.float32)).all())
    for group in (2, 3):
        monkeypatch.setattr(occupancy, "FORWARD_HEAD_GROUP", group)
        for got, ref in zip(run(), want):
            np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("compute_wgs", [2, 3])
def test_the_persistent_forwards_orders_change_no_bit(monkeypatch, compute_wgs, seed):
    """The persistent causal forward (3 CTAs here) in groups of 2 and 5 of its 10 (batch row, head) pairs, with
    and without the snake, against by length over every pair: GQA 5:1, Tq > Tk, ragged; 50 or 40 tiles, so that
    the last round is partial (a CTA's tile count under the snake)."""
    q, k, v, *_, spec = _residuals(Shape("p", 2, 600, 500, 5, 1, 64), jnp.bfloat16, True, seed)
    fwd = MosaicForwardConfig(block_q=64, block_kv=64, num_stages=2, overlap=compute_wgs == 3, persistent=True,
                              compute_wgs=compute_wgs)
    orders = []  # the order each launch hands the kernel body

    def kernel(*args, head_group, snake, **kw):
        orders.append((head_group, snake))
        return original(*args, head_group=head_group, snake=snake, **kw)

    original = forward_module._forward_kernel
    monkeypatch.setattr(forward_module, "_forward_kernel", kernel)
    run = lambda: jax.block_until_ready(mosaic_forward(q, k, v, AttentionInputs(), spec=spec, config=fwd,
                                                       interpret=True))
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_HEAD_GROUP", None)  # by length over every pair ...
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_SNAKE", False)
    want = run()
    assert bool(jnp.isfinite(want[0].astype(jnp.float32)).all())
    for group, snake in ((2, False), (5, False), (None, True), (2, True)):  # ... against groups and the snake
        monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_HEAD_GROUP", group)
        monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_SNAKE", snake)
        for got, ref in zip(run(), want):
            np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))
    assert set(orders) == {(None, False), (2, False), (5, False), (None, True), (2, True)}


def test_the_persistent_schedule_and_its_auto_group():
    """``occupancy.persistent_schedule`` hands every tile out once, each CTA as many as the kernel's ``my_tiles``
    gives it; "auto" groups only past the K/V bytes that fit, and never unbalances the CTAs beyond the slack."""
    for pairs, q_tiles, ctas in ((10, 5, 3), (512, 8, 132), (48, 32, 132), (7, 3, 4)):
        for group in {None, occupancy.group_size(pairs, 4)} - {1}:  # 7 pairs: no group but all of them
            for snake in (False, True):
                cta, rounds, pair, rank = occupancy.persistent_schedule(pairs, q_tiles, group, ctas, snake)
                assert len(set(zip(pair.tolist(), rank.tolist()))) == pairs * q_tiles
                assert ((rank >= 0) & (rank < q_tiles)).all() and ((pair >= 0) & (pair < pairs)).all()
                full, rest = divmod(pairs * q_tiles, ctas)
                lane_in_last = np.arange(ctas) if not snake or full % 2 == 0 else ctas - 1 - np.arange(ctas)
                np.testing.assert_array_equal(np.bincount(cta, minlength=ctas), full + (lane_in_last < rest))
                work = occupancy.cta_work(pairs, q_tiles, group, ctas, snake)
                assert work.sum() == pairs * q_tiles * (q_tiles + 1) / 2
    knobs = occupancy.PERSISTENT_FORWARD_HEAD_GROUP, occupancy.PERSISTENT_FORWARD_SNAKE
    try:
        occupancy.PERSISTENT_FORWARD_SNAKE = False
        occupancy.PERSISTENT_FORWARD_HEAD_GROUP = None
        assert occupancy.persistent_forward_group(512, 8, 2**30, 132) is None
        occupancy.PERSISTENT_FORWARD_HEAD_GROUP = 6
        assert occupancy.persistent_forward_group(512, 8, 0, 132) == 4  # the largest divisor up to 6
        for bad in (0, -2, True, 2.0, "all"):
            occupancy.PERSISTENT_FORWARD_HEAD_GROUP = bad
            with pytest.raises(ValueError, match="PERSISTENT_FORWARD_HEAD_GROUP"):
                occupancy.persistent_forward_group(512, 8, 0, 132)
        occupancy.PERSISTENT_FORWARD_HEAD_GROUP = "auto"
        assert occupancy.persistent_forward_group(192, 8, occupancy.GROUP_ABOVE_KV_BYTES, 132) is None  # fits
        for snake in (False, True):  # D=64 causal 1k, B=16, 32 heads: 128 MiB of K/V
            occupancy.PERSISTENT_FORWARD_SNAKE = snake
            group = occupancy.persistent_forward_group(512, 8, 128 * 2**20, 132)
            assert group is not None and 512 % group == 0
            peak = lambda g: occupancy.cta_work(512, 8, g, 132, snake).max()
            assert peak(group) <= peak(None) * (1 + occupancy.AUTO_GROUP_SLACK)
    finally:
        occupancy.PERSISTENT_FORWARD_HEAD_GROUP, occupancy.PERSISTENT_FORWARD_SNAKE = knobs


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True], ids=["per_tile", "persistent"])
@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "fused"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_groups_against_float64(monkeypatch, head_dim, deterministic, group, persistent, seed):
    """Compiled, in groups of 2 and 3 (batch row, head) pairs: the forward (one CTA per tile on 12 pairs; or
    persistent on 24, 192 tiles for 132 CTAs: in groups of 2, and for 3 the snake without groups) and the
    backward's kernels (dK/dV 4 or 8 pairs, dQ 12 or 24), causal, GQA 3:1, Tq != Tk, ragged: values, lse and
    gradients against float64 through the public API."""
    from pallas_flash.backends.mosaic_gpu.config import MosaicConfig
    from pallas_flash.sharding import partition
    from tests.test_mosaic_gpu import _check

    bwd = (MosaicBackwardConfig(block_q=64, num_stages=2, dq_block_kv=64, dq_num_stages=2) if deterministic
           else MosaicBackwardConfig(block_q=64, num_stages=2, deterministic=False))
    config = MosaicConfig(fwd=MosaicForwardConfig(block_q=64, block_kv=128, num_stages=2, persistent=persistent),
                          bwd=bwd)
    monkeypatch.setattr(occupancy, "BACKWARD_HEAD_GROUP", group)
    monkeypatch.setattr(occupancy, "FORWARD_HEAD_GROUP", group)
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_HEAD_GROUP", group if group == 2 else None)
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_SNAKE", group == 3)
    partition._trace.cache_clear()  # traces are cached by call, not by the order
    try:
        _check(Shape("g", 4 if persistent else 2, 1000, 1100, 6, 2, head_dim), jnp.bfloat16, True, seed, config,
               grads=True)
    finally:
        partition._trace.cache_clear()
