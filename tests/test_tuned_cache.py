"""The tuned configs' caches and what ``default_config`` makes of them: the Mosaic backend's user cache (beside
the Triton one), its rules after the lookup (features, three warpgroups, small grids), the bucket lookup, and
invalid or unreadable entries of both backends' caches. CPU only and fast: nothing is tuned or run."""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import pytest

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu.config import MosaicBackwardConfig, MosaicConfig, MosaicForwardConfig
from tests.test_mosaic_tuning import GPU, _heuristic, _write_cache


def test_user_cache_beside_the_triton_one(cache_dir):
    from pallas_flash.backends.triton import config as triton_config

    assert mosaic_config.user_cache_path() == cache_dir / "mosaic_configs.json"
    assert mosaic_config.user_cache_path().parent == triton_config.user_cache_path().parent
    assert mosaic_config.user_cache_path() != triton_config.user_cache_path()


def test_default_config_reads_the_user_cache(cache_dir):
    tuned = dataclasses.replace(_heuristic(128, True), fwd=MosaicForwardConfig(block_kv=64, num_stages=4))
    _write_cache({mosaic_config.config_key(128, "bfloat16", True, 4096): tuned.to_dict()})
    got = mosaic_config.default_config(head_dim=128, dtype=jnp.bfloat16, causal=True, seq_q=4096, seq_k=4096, gpu=GPU)
    assert got == tuned
    # another GPU, or another key (head dim, causal), gets the heuristics
    other_gpu = mosaic_config.default_config(
        head_dim=128, dtype=jnp.bfloat16, causal=True, seq_q=4096, seq_k=4096, gpu="NVIDIA H100"
    )
    assert other_gpu.fwd == _heuristic(128, True).fwd
    assert mosaic_config.default_config(
        head_dim=128, dtype=jnp.bfloat16, causal=False, seq_q=4096, seq_k=4096, gpu=GPU
    ) == _heuristic(128, False)
    assert mosaic_config.default_config(
        head_dim=64, dtype=jnp.bfloat16, causal=True, seq_q=4096, seq_k=4096, gpu=GPU
    ) == _heuristic(64, True)


def test_default_config_without_cache_is_the_heuristic(cache_dir):
    assert not mosaic_config.user_cache_path().exists()
    got = mosaic_config.default_config(head_dim=64, dtype=jnp.bfloat16, causal=False, seq_q=1024, seq_k=1024, gpu=GPU)
    assert got.fwd == MosaicForwardConfig(block_kv=256, num_stages=2, persistent=True)
    assert got.bwd == MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False)  # fused from 1k at D=64
    got = mosaic_config.default_config(head_dim=64, dtype=jnp.bfloat16, causal=True, seq_q=1024, seq_k=1024, gpu=GPU)
    assert got.bwd == MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2)


@pytest.mark.parametrize("features", [{"window"}, {"lengths"}, {"segments", "window"}])
def test_features_make_the_d128_forward_take_turns(cache_dir, features):
    """Tuned or not, a window, lengths or segment ids turn the D=128 forward's overlap off (and nothing else)."""
    kw = dict(dtype=jnp.bfloat16, causal=False, seq_q=4096, seq_k=4096)
    plain = _heuristic(128, False)
    assert plain.fwd.overlap
    got = mosaic_config.default_config(head_dim=128, features=frozenset(features), gpu="", **kw)
    assert got == dataclasses.replace(plain, fwd=dataclasses.replace(plain.fwd, overlap=False))
    tuned = dataclasses.replace(plain, fwd=MosaicForwardConfig(block_kv=64, num_stages=4, overlap=True, persistent=False))
    _write_cache({mosaic_config.config_key(128, "bfloat16", False, 4096): tuned.to_dict()})
    got = mosaic_config.default_config(head_dim=128, features=frozenset(features), gpu=GPU, **kw)
    assert got.fwd == MosaicForwardConfig(block_kv=64, num_stages=4, overlap=False, persistent=False)
    assert got.bwd == tuned.bwd
    # other features, and other head dims, keep their config
    assert mosaic_config.default_config(head_dim=128, features=frozenset({"dropout"}), gpu=GPU, **kw) == tuned
    assert mosaic_config.default_config(head_dim=256, features=frozenset(features), gpu="", **kw) == _heuristic(256, False)


def test_segment_ids_give_the_d64_forward_128_key_blocks(cache_dir):
    kw = dict(dtype=jnp.bfloat16, causal=True, seq_q=3072, seq_k=3072, gpu="")
    plain = _heuristic(64, True, 3072)
    assert plain.fwd.block_kv == 256
    got = mosaic_config.default_config(head_dim=64, features=frozenset({"segments"}), **kw)
    assert got == dataclasses.replace(plain, fwd=dataclasses.replace(plain.fwd, block_kv=128, num_stages=3))
    assert mosaic_config.default_config(head_dim=64, features=frozenset({"window"}), **kw) == plain


@pytest.mark.parametrize("causal, seq, persistent",
                         [(False, 4096, True), (False, 16384, True), (True, 4096, False), (True, 16384, False)])
def test_long_d64_forwards_take_three_warpgroups_on_plain_calls(cache_dir, causal, seq, persistent):
    """The D=64 heuristic's three compute warpgroups (from 4k keys, causal or not); with any feature, or over fewer
    keys, two. A tuned three-warpgroup entry gives way to the heuristic's two under a feature as well."""
    got = _heuristic(64, causal, seq)
    assert got.fwd == MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=persistent,
                                          compute_wgs=3)
    shorter = _heuristic(64, causal, 2048).fwd
    assert shorter.compute_wgs == 2 and not shorter.overlap
    kw = dict(head_dim=64, dtype=jnp.bfloat16, causal=causal, seq_q=seq, seq_k=seq)
    two = mosaic_config._two_warpgroup_d64_forward(causal, seq)
    assert two.compute_wgs == 2
    for features in ({"offsets"}, {"window"}, {"lengths"}):
        assert mosaic_config.default_config(**kw, gpu="", features=frozenset(features)).fwd == two
    tuned = dataclasses.replace(got, fwd=dataclasses.replace(got.fwd, num_stages=3))
    _write_cache({mosaic_config.config_key(64, "bfloat16", causal, seq): tuned.to_dict()})
    assert mosaic_config.default_config(**kw, gpu=GPU) == tuned
    assert mosaic_config.default_config(**kw, gpu=GPU, features=frozenset({"window"})).fwd == two


def test_a_tuned_d128_three_warpgroup_forward_stays_valid(cache_dir):
    """The tuner's D=128 space holds three-warpgroup forwards. Tuned into the cache, the rules applied after the
    lookup must keep a config that is valid and fits at D=128: the small-grid rule's forward (D=64's, which does
    not fit there) is for D <= 64, and under a feature the D=128 heuristic's two warpgroups replace it."""
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=True, persistent=False, compute_wgs=3)
    _write_cache({mosaic_config.config_key(128, "bfloat16", True, 1024): MosaicConfig(fwd=fwd).to_dict()})
    kw = dict(head_dim=128, dtype=jnp.bfloat16, causal=True, seq_q=1024, seq_k=1024, gpu=GPU)
    assert mosaic_config.default_config(**kw, batch_heads=256).fwd == fwd  # the tuned problem's own (small) grid
    for features in ({"lengths"}, {"window"}, {"offsets"}):
        got = mosaic_config.default_config(**kw, features=frozenset(features)).fwd
        assert got == mosaic_config._default_forward(128, jnp.bfloat16, True, 1024)  # two warpgroups, taking turns
        got.check_fits(128, jnp.bfloat16)


def test_lookup_takes_the_nearest_bucket_and_skips_malformed_keys():
    """The nearest sequence bucket of the same (head dim, dtype, causal); fp16 takes bf16's; a hand-edited key whose
    bucket is not a number ("n1k") is no bucket (it made the lookup raise a bare int() error)."""
    from pallas_flash.backends.triton import config as triton_config

    key = lambda n, dt="bfloat16": mosaic_config.config_key(128, dt, True, n)  # noqa: E731
    table = {key(1024): {"a": 1}, key(16384): {"a": 2}, key(4096).replace("n4096", "n1k"): {"a": 3}}
    assert triton_config.lookup(table, 128, jnp.bfloat16, True, 2048) == (key(1024), {"a": 1})
    assert triton_config.lookup(table, 128, jnp.float16, True, 8192 * 2) == (key(16384), {"a": 2})  # bf16's entry
    assert triton_config.lookup(table, 128, jnp.bfloat16, True, 4096, nearest=False) is None
    assert triton_config.lookup(table, 128, jnp.bfloat16, False, 4096) is None  # not causal: none


def test_an_invalid_triton_cache_entry_raises_naming_the_file(cache_dir, monkeypatch):
    """The Triton backend's cache, like the Mosaic one's: an entry that parses but makes no config (here without
    "bwd") is an error naming the file, not a bare KeyError on every call of that shape."""
    from pallas_flash.backends.triton import config as triton_config

    key = triton_config.config_key(64, "bfloat16", True, 16384)
    triton_config.user_cache_path().write_text(json.dumps({GPU: {key: {"fwd": {"block_q": 64}}}}))
    triton_config.read_user_table.cache_clear()
    # reached from 1024 through the nearest bucket: the message names the key the file holds
    found, wanted = (re.escape(triton_config.config_key(64, "bfloat16", True, n)) for n in (16384, 1024))
    with pytest.raises(ValueError, match=rf"the tuned cache .*tuned\.json holds an invalid Triton config .* at "
                                         rf"{found} \(looked up for {wanted}"):
        triton_config.default_config(head_dim=64, dtype=jnp.bfloat16, causal=True, seq_q=1024, seq_k=1024, gpu=GPU)
    # and the tuner the message sends the user to starts from the heuristics, not from that entry
    from pallas_flash.backends.triton import tune as triton_tune

    seen = []

    def first(candidates, timer, log):
        candidates = list(candidates)
        seen.append(candidates[0])
        return candidates[0], 1e-3

    monkeypatch.setattr(triton_tune, "fastest", first)
    triton_tune.tune_problem(triton_tune.Problem(64, "bfloat16", True, 1024, 1, 1), log=lambda s: None)
    assert seen[0].bwd == triton_config.heuristic_config(64, jnp.bfloat16).bwd


def test_the_triton_tuner_keeps_each_stage_winner(monkeypatch):
    """The Triton tuner's coordinate search composes its winners: the forward's, then the dK/dV kernel's, then the
    dQ kernel's on top of both; none is dropped for the heuristic on the way. (Here the last candidate of each
    stage wins: no kernel runs.)"""
    from pallas_flash.backends.triton import tune as triton_tune

    monkeypatch.setattr(triton_tune, "fastest", lambda candidates, timer, log: (list(candidates)[-1], 1e-3))
    best, _ = triton_tune.tune_problem(triton_tune.Problem(64, "bfloat16", True, 1024, 1, 1), log=lambda s: None)
    fwd_space, dkdv_space, dq_space = triton_tune.spaces(64)
    fwd, bwd = best.fwd, best.bwd
    assert (fwd.block_q, fwd.block_k, fwd.num_warps, fwd.num_stages) == fwd_space[-1]
    assert (bwd.block_q_dkv, bwd.block_k_dkv, bwd.num_warps_dkv, bwd.num_stages_dkv) == dkdv_space[-1]
    assert (bwd.block_q_dq, bwd.block_k_dq, bwd.num_warps_dq, bwd.num_stages_dq) == dq_space[-1]


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not readable JSON"),
    (json.dumps({GPU: [1, 2]}), "is not a JSON object of"),
    (json.dumps([GPU]), "is not a JSON object of"),
])
def test_an_unreadable_cache_raises_naming_the_file(cache_dir, text, match):
    """A truncated or hand-broken cache is an error naming the file, as an invalid entry is, not a silent fall back
    to the heuristics (every tuned config in it would be dropped without a word)."""
    mosaic_config.user_cache_path().write_text(text)
    with pytest.raises(ValueError, match=f"the tuned cache .*mosaic_configs.json {match}.*fix or delete that file"):
        mosaic_config.default_config(head_dim=128, dtype=jnp.bfloat16, causal=False, seq_q=4096, seq_k=4096, gpu=GPU)


def test_a_tuned_entry_applies_at_its_bucket_with_both_lengths_in_it(cache_dir):
    """As the shipped table's: a 16k entry (here a fused-dQ backward and three warpgroups) is not carried to 512 keys
    or to Tq = 16k, Tk = 128, where the heuristics' thresholds say otherwise (the fused dQ would change the mode)."""
    tuned = MosaicConfig(fwd=MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, compute_wgs=3),
                         bwd=mosaic_config.MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False))
    _write_cache({mosaic_config.config_key(64, "bfloat16", False, 16384): tuned.to_dict()})
    kw = dict(head_dim=64, dtype=jnp.bfloat16, causal=False, gpu=GPU)
    assert mosaic_config.default_config(**kw, seq_q=16384, seq_k=16384) == tuned
    for seq_q, seq_k in ((512, 512), (16384, 128)):
        got = mosaic_config.default_config(**kw, seq_q=seq_q, seq_k=seq_k)
        want = mosaic_config.heuristic_config(head_dim=64, dtype=jnp.bfloat16, causal=False, seq_q=seq_q, seq_k=seq_k)
        assert got == want and got.bwd.deterministic


def test_invalid_cache_entry_raises_naming_the_file(cache_dir):
    bad = MosaicConfig().to_dict()
    bad["fwd"]["block_kv"] = 256
    bad["fwd"]["num_stages"] = 4  # does not fit at D=128
    _write_cache({mosaic_config.config_key(128, "bfloat16", False, 4096): bad})
    with pytest.raises(ValueError, match="mosaic_configs.json.*shared memory"):
        mosaic_config.default_config(head_dim=128, dtype=jnp.bfloat16, causal=False, seq_q=4096, seq_k=4096, gpu=GPU)
