"""The small-grid rule of the Mosaic forward's default config (``backends/mosaic_gpu/occupancy.py``).

CPU only and fast: no kernel runs. The SM count is fixed at 132 (an H200) so that the thresholds do not depend
on the machine.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from pallas_flash import backends
from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu import occupancy
from pallas_flash.backends.mosaic_gpu.config import MosaicConfig, MosaicForwardConfig
from pallas_flash.validate import attention_call

SMALL = MosaicForwardConfig(**occupancy.SMALL_GRID_FORWARD)
GPU = "NVIDIA H200"


@pytest.fixture(autouse=True)
def h200_sms(monkeypatch):
    monkeypatch.setattr(occupancy, "sm_count", lambda: 132)


def _config(batch_heads, *, causal=True, seq=4096, head_dim=64, gpu="", **kw):
    return mosaic_config.default_config(head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, seq_q=seq, seq_k=seq,
                                        gpu=gpu, batch_heads=batch_heads, **kw)


def test_ctas_per_sm_counts_whole_tiles():
    assert occupancy.forward_ctas_per_sm(48, 4096, 192) == pytest.approx(48 * 22 / 132)  # 4096 = 21 x 192 + 64
    assert occupancy.forward_ctas_per_sm(48, 4096, 192, sms=66) == pytest.approx(2 * 48 * 22 / 132)
    assert occupancy.forward_ctas_per_sm(1, 1, 128) == pytest.approx(1 / 132)


def test_a_small_causal_grid_takes_the_persistent_two_warpgroup_forward():
    """GPT-2's T=4096 (batch 4, 12 heads: 8 CTAs per SM) leaves three warpgroups; 32 heads (21 per SM) keep them."""
    big = _config(None)
    assert big.fwd.compute_wgs == 3 and not big.fwd.persistent  # the heuristic this rule overrides
    assert _config(4 * 12) == dataclasses.replace(big, fwd=SMALL)
    assert _config(4 * 20) == dataclasses.replace(big, fwd=SMALL)  # 13.3 per SM
    assert _config(4 * 24) == big  # 96 x 22 / 132 = 16.0: the measured tie, not below the threshold
    assert _config(4 * 32) == big
    assert _config(2 * 12, seq=8192).fwd == SMALL
    assert _config(None).bwd == _config(4 * 12).bwd  # the backward is not touched


def test_the_rule_leaves_other_forwards_alone():
    # non-causal three warpgroups are persistent already; D=128 and short causal calls have two warpgroups
    assert _config(1, causal=False) == _config(None, causal=False)
    assert _config(1, head_dim=128) == _config(None, head_dim=128)
    assert _config(1, seq=1024) == _config(None, seq=1024)
    # with a feature the three-warpgroup forward already gave way to the two-warpgroup heuristic
    windowed = _config(1, features=frozenset({"window"}))
    assert windowed == _config(None, features=frozenset({"window"}))
    assert windowed.fwd.compute_wgs == 2


def test_a_tuned_three_warpgroup_entry_gives_way_too(cache_dir):
    tuned = MosaicConfig(fwd=MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, compute_wgs=3))
    key = mosaic_config.config_key(64, "bfloat16", True, 4096)
    mosaic_config.user_cache_path().write_text(json.dumps({GPU: {key: tuned.to_dict()}}))
    assert _config(None, gpu=GPU) == tuned
    assert _config(4 * 32, gpu=GPU) == tuned
    assert _config(4 * 12, gpu=GPU) == dataclasses.replace(tuned, fwd=SMALL)


def test_the_backend_passes_batch_times_query_heads(monkeypatch):
    monkeypatch.setattr(mosaic_config, "gpu_name", lambda: "")
    mosaic = backends.get("mosaic")

    def fwd(batch, heads, kv_heads):
        q = jax.ShapeDtypeStruct((batch, 4096, heads, 64), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((batch, 4096, kv_heads, 64), jnp.bfloat16)
        spec, _ = attention_call(q, k, k, None, None, is_causal=True)
        return mosaic.default_config(q, k, spec).fwd

    assert fwd(4, 12, 12) == SMALL
    assert fwd(4, 12, 3) == SMALL  # GQA: the query heads make the grid
    assert fwd(4, 32, 8).compute_wgs == 3
    assert fwd(8, 32, 32).compute_wgs == 3


@pytest.mark.parametrize("heads, want_small", [(12, True), (32, False)])
def test_the_tuner_starts_from_what_an_untuned_call_of_its_shape_runs(monkeypatch, heads, want_small):
    """The tuner's baseline (the pick unless beaten by its margin) has the small-grid forward where a call of the
    problem's batch and heads gets it; with every candidate equally fast the baseline is kept."""
    from pallas_flash.backends.mosaic_gpu import tune as mosaic_tune

    def timer(p, cfg, xs):
        return lambda min_time: 1.0

    monkeypatch.setattr(mosaic_tune, "_fwd_timer", timer)
    monkeypatch.setattr(mosaic_tune, "_bwd_timer", timer)
    monkeypatch.setattr(mosaic_tune.Problem, "inputs", lambda self: None)
    problem = mosaic_tune.Problem(64, "bfloat16", True, 4096, 4, heads)
    cfg, times = mosaic_tune.tune_problem(problem, log=lambda s: None, search=mosaic_tune.Search(top=1, rounds=1))
    heuristic = mosaic_config.heuristic_config(head_dim=64, dtype="bfloat16", causal=True, seq_q=4096, seq_k=4096)
    want = dataclasses.replace(heuristic, fwd=SMALL) if want_small else heuristic
    assert times["fwd_search"]["baseline"] == repr(want)
    assert cfg.fwd == want.fwd


def test_sm_count_falls_back_without_a_gpu(monkeypatch):
    monkeypatch.undo()  # the real sm_count
    occupancy.sm_count.cache_clear()
    try:
        jax.devices("gpu")
    except RuntimeError:
        assert occupancy.sm_count() == occupancy.DEFAULT_SM_COUNT
    else:
        assert occupancy.sm_count() >= 1


@pytest.mark.gpu
def test_gpu_the_small_grid_forward_against_float64(seed):
    """The default config where the rule applies (one batch row, 6 query heads: 6 x 21 tiles, 1 CTA per SM), with
    lengths that are not block multiples, Tq != Tk in one bucket and GQA 3:1, through the public API: values, lse
    and gradients against float64."""
    from pallas_flash.testing.shapes import Shape
    from tests.test_mosaic_gpu import _check

    shape = Shape("small_grid", 1, 4000, 4100, 6, 2, 64)
    q = jax.ShapeDtypeStruct((1, 4000, 6, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 4100, 2, 64), jnp.bfloat16)
    spec, _ = attention_call(q, k, k, None, None, is_causal=True)
    assert backends.get("mosaic").default_config(q, k, spec).fwd == SMALL
    _check(shape, jnp.bfloat16, True, seed, None, grads=True)
