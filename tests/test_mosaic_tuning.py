"""The Mosaic GPU tuning spaces and ``python -m pallas_flash.tuning --backend mosaic`` (its user cache:
``test_tuned_cache.py``).

CPU only and fast: no kernel runs (``tune_problem`` is checked with fake timers).
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu import tune as mosaic_tune
from pallas_flash.backends.mosaic_gpu.config import (
    HEAD_DIMS,
    MosaicBackwardConfig,
    MosaicConfig,
    MosaicForwardConfig,
    backward_smem_bytes,
    smem_bytes,
)
from pallas_flash.tuning import __main__ as tuning_cli

GPU = "NVIDIA H200"
DTYPES = (jnp.bfloat16, jnp.float16)


def _heuristic(head_dim=128, causal=False, seq=4096, dtype=jnp.bfloat16):
    return mosaic_config.default_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=seq, seq_k=seq, gpu="")


def _heuristic_deterministic(head_dim, causal, seq):
    want = mosaic_config.default_backward(head_dim, jnp.bfloat16, seq, seq, causal=causal, deterministic=True)
    assert want.deterministic
    return want


def _write_cache(entries: dict) -> None:
    path = mosaic_config.user_cache_path()
    path.write_text(json.dumps({GPU: entries}))


# --- the spaces ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_space_fits_in_shared_memory(head_dim, dtype):
    cands = mosaic_tune.forward_candidates(head_dim, dtype)
    assert cands
    for cfg in cands:
        assert (cfg.block_kv, cfg.num_stages, cfg.overlap, cfg.persistent, cfg.compute_wgs) in mosaic_tune.FWD_SPACE
        need = smem_bytes(cfg.block_q, cfg.block_kv, cfg.num_stages, head_dim, dtype, cfg.q_buffers, cfg.compute_wgs)
        assert need <= mosaic_config.MAX_SMEM_BYTES
    # exactly the space's members that fit: none is dropped needlessly
    fitting = {
        (kv, s, overlap, persistent, wgs)
        for kv, s, overlap, persistent, wgs in mosaic_tune.FWD_SPACE
        if smem_bytes(64, kv, s, head_dim, dtype, 2 if persistent else 1, wgs) <= mosaic_config.MAX_SMEM_BYTES
    }
    assert {(c.block_kv, c.num_stages, c.overlap, c.persistent, c.compute_wgs) for c in cands} == fitting


def test_forward_space_sizes():
    assert len(mosaic_tune.FWD_SPACE) == 60
    sizes = {d: len(mosaic_tune.forward_candidates(d, jnp.bfloat16)) for d in HEAD_DIMS}
    assert sizes[64] > sizes[128] > sizes[256] >= 1
    assert mosaic_tune.forward_candidates(256, jnp.bfloat16) == [
        MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap) for overlap in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_space_fits_in_shared_memory(head_dim, dtype):
    cands = mosaic_tune.backward_candidates(head_dim, dtype, nondeterministic=False)
    assert cands and all(c.deterministic for c in cands)
    wider = mosaic_tune.backward_candidates(head_dim, dtype, nondeterministic=True)
    assert set(cands) < set(wider) and any(not c.deterministic for c in wider)
    for cfg in wider:
        assert max(backward_smem_bytes(cfg, head_dim, dtype)) <= mosaic_config.MAX_SMEM_BYTES
        assert 1 <= cfg.num_stages <= (3 if cfg.deterministic else 2)
    # the fused dQ's 128-row steps fit at D=64 only
    assert {c.block_q for c in wider if not c.deterministic} == ({64, 128} if head_dim == 64 else {64})


def test_backward_space_members():
    assert len(mosaic_tune.BWD_SPACE) == 28
    assert sum(1 for *_, det in mosaic_tune.BWD_SPACE if det) == 24
    assert {(bq, s) for bq, s, _, _, det in mosaic_tune.BWD_SPACE if not det} == {(64, 1), (64, 2), (128, 1), (128, 2)}
    assert {bq for bq, *_, det in mosaic_tune.BWD_SPACE if det} == {64, 128}


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dim_256_backward_space(dtype):
    # backward_wide.py: deterministic either way, so no fused candidates even when asked; at most 2 stages fit.
    cands = mosaic_tune.backward_candidates(256, dtype, nondeterministic=True)
    assert cands and all(c.deterministic for c in cands)
    assert {(c.block_q, c.num_stages, c.dq_block_kv, c.dq_num_stages) for c in cands} == {(64, 1, 64, 2), (64, 2, 64, 2)}
    for cfg in cands:
        assert max(backward_smem_bytes(cfg, 256, dtype)) <= mosaic_config.MAX_SMEM_BYTES


def test_spaces_include_the_heuristic_defaults(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for head_dim in HEAD_DIMS:
        for causal in (False, True):
            for seq in (4096, 16384):  # the deterministic and the fused dQ
                cfg = _heuristic(head_dim, causal, seq)
                assert cfg.fwd in mosaic_tune.forward_candidates(head_dim, jnp.bfloat16)
                assert cfg.bwd in mosaic_tune.backward_candidates(head_dim, jnp.bfloat16)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tuner_searches_the_fused_dq_unless_determinism_is_requested(head_dim, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    both = mosaic_tune.backward_candidates(head_dim, jnp.bfloat16)
    assert both == mosaic_tune.backward_candidates(head_dim, jnp.bfloat16, nondeterministic=True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert mosaic_tune.backward_candidates(head_dim, jnp.bfloat16) == [c for c in both if c.deterministic]


# --- the backward's dQ mode ------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_backward_fuses_dq_at_long_lengths(cache_dir, monkeypatch, head_dim):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    n = mosaic_config.FUSED_DQ_MIN_SEQ[head_dim, False]
    fused = MosaicBackwardConfig(block_q=128 if head_dim == 64 else 64, num_stages=2, deterministic=False)
    for causal in (False, True):
        short = _heuristic(head_dim, causal, n - 128).bwd
        assert short.deterministic and short == mosaic_config.default_backward(head_dim, jnp.bfloat16, 1, 1)
        # D=64 causal: the fused dQ measured no faster at any length, so it stays deterministic
        want = short if head_dim == 64 and causal else fused
        assert _heuristic(head_dim, causal, n).bwd == want
        assert _heuristic(head_dim, causal, 4 * n).bwd == want
    for seq_q, seq_k in ((n, n // 2), (n // 2, n)):  # both lengths must be long
        got = mosaic_config.default_config(head_dim=head_dim, dtype=jnp.bfloat16, causal=False, seq_q=seq_q,
                                           seq_k=seq_k, gpu="")
        assert got.bwd.deterministic
    # forced either way, at any length
    assert mosaic_config.default_backward(head_dim, jnp.bfloat16, 64, 64, deterministic=False) == fused
    assert mosaic_config.default_backward(head_dim, jnp.bfloat16, n, n, deterministic=True) == short


@pytest.mark.parametrize("head_dim, causal, kv_groups, features, want", [
    (128, True, 1, frozenset(), True),
    (128, True, 1, frozenset({"offsets"}), True),  # ring attention's chunks: the causal diagonal moved
    (128, True, 4, frozenset(), False),  # GQA
    (128, False, 2, frozenset(), False),
    (128, True, 1, frozenset({"window"}), False),
    (128, True, 1, frozenset({"segments"}), False),
    (128, False, 1, frozenset({"lengths"}), False),
    (64, False, 1, frozenset(), True),
    (64, True, 1, frozenset(), False),
    (256, False, 1, frozenset(), False),  # the wide kernels have no fused mode
])
def test_fused_dq_pays_where_it_was_measured_faster(head_dim, causal, kv_groups, features, want, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    n = 16384  # long enough for every head dim's fused mode
    kw = dict(causal=causal, kv_groups=kv_groups, features=features)
    assert mosaic_config.fused_dq_pays(head_dim, n, n, **kw) is want
    assert mosaic_config.default_backward(head_dim, jnp.bfloat16, n, n, **kw).deterministic is not want
    got = mosaic_config.default_config(head_dim=head_dim, dtype=jnp.bfloat16, seq_q=n, seq_k=n, gpu="", **kw)
    assert got.bwd.deterministic is not want


def test_the_backend_passes_the_gqa_ratio_and_features(monkeypatch):
    """``MosaicBackend.default_config`` reads the K/V groups from the shapes and the features from the spec."""
    import jax

    from pallas_flash import backends
    from pallas_flash.validate import attention_call

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(mosaic_config, "gpu_name", lambda: "")  # no tuned entry: the heuristics
    n = mosaic_config.FUSED_DQ_MIN_SEQ[128, True]
    mosaic = backends.get("mosaic")

    def bwd(kv_heads, **kw):
        q = jax.ShapeDtypeStruct((1, n, 8, 128), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((1, n, kv_heads, 128), jnp.bfloat16)
        spec, _ = attention_call(q, k, k, None, None, is_causal=True, **kw)
        return mosaic.default_config(q, k, spec).bwd

    assert not bwd(8).deterministic
    assert bwd(2).deterministic
    assert bwd(8, local_window_size=(256, 0)).deterministic


@pytest.mark.parametrize("flag", ["--xla_gpu_deterministic_ops=true", "--xla_gpu_deterministic_ops",
                                  "--foo=1 --xla_gpu_deterministic_ops=1", "--xla_gpu_deterministic_ops=True",
                                  "--xla_gpu_exclude_nondeterministic_ops=true"])  # the flag XLA's guide names
def test_xla_deterministic_ops_keeps_the_deterministic_backward(cache_dir, monkeypatch, flag):
    monkeypatch.setenv("XLA_FLAGS", flag)
    assert mosaic_config.deterministic_requested()
    n = 16384  # long enough for every head dim's fused mode
    for head_dim in HEAD_DIMS:
        want = mosaic_config.default_backward(head_dim, jnp.bfloat16, 1, 1)
        assert want.deterministic and _heuristic(head_dim, True, n).bwd == want


@pytest.mark.parametrize("flags, want", [
    ("", False),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=0", False),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),  # the last one wins
    ("--xla_gpu_deterministic_ops=false  --xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops_extra=true", False),  # another flag
    ("--xla_gpu_exclude_nondeterministic_ops", True),
    ("--xla_gpu_exclude_nondeterministic_ops=false --xla_gpu_deterministic_ops=0", False),
    ("--xla_gpu_exclude_nondeterministic_ops=1 --xla_gpu_deterministic_ops=false", True),  # either one asks
])
def test_deterministic_requested_reads_xla_flags(flags, want, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert mosaic_config.deterministic_requested() is want
    monkeypatch.delenv("XLA_FLAGS")
    assert mosaic_config.deterministic_requested(flags) is want
    assert mosaic_config.deterministic_requested() is False


def test_deterministic_requested_refuses_a_value_that_is_not_a_bool(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=maybe")
    with pytest.raises(ValueError, match="xla_gpu_deterministic_ops=maybe"):
        mosaic_config.deterministic_requested()


@pytest.mark.parametrize("call", [dict(kv_groups=4), dict(features=frozenset({"segments"}))])
def test_gqa_and_masks_override_a_tuned_fused_entry(cache_dir, monkeypatch, call):
    """The tuner times plain MHA calls: where the fused dQ loses, its fused entry gives way to the heuristic's
    deterministic backward (the forward stays)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    fused = MosaicBackwardConfig(num_stages=1, deterministic=False)
    tuned = MosaicConfig(fwd=MosaicForwardConfig(block_kv=64, num_stages=4), bwd=fused)
    _write_cache({mosaic_config.config_key(128, "bfloat16", True, 4096): tuned.to_dict()})
    kw = dict(head_dim=128, dtype=jnp.bfloat16, causal=True, seq_q=4096, seq_k=4096, gpu=GPU)
    assert mosaic_config.default_config(**kw, features=frozenset({"offsets"})) == tuned
    got = mosaic_config.default_config(**kw, **call)
    assert got.fwd == tuned.fwd and got.bwd == _heuristic_deterministic(128, True, 4096)


def test_xla_deterministic_ops_overrides_a_tuned_fused_entry(cache_dir, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    fused = MosaicBackwardConfig(num_stages=1, deterministic=False)
    tuned = MosaicConfig(fwd=MosaicForwardConfig(block_kv=64, num_stages=4), bwd=fused)
    _write_cache({mosaic_config.config_key(128, "bfloat16", True, 4096): tuned.to_dict()})
    kw = dict(head_dim=128, dtype=jnp.bfloat16, causal=True, seq_q=4096, seq_k=4096, gpu=GPU)
    assert mosaic_config.default_config(**kw) == tuned
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    got = mosaic_config.default_config(**kw)
    assert got.fwd == tuned.fwd and got.bwd == _heuristic_deterministic(128, True, 4096)


# --- to_dict / from_dict ---------------------------------------------------------------------


def test_to_dict_round_trip():
    cfg = MosaicConfig(
        fwd=MosaicForwardConfig(block_kv=192, num_stages=3),
        bwd=MosaicBackwardConfig(num_stages=1, dq_block_kv=128, dq_num_stages=2, deterministic=False),
    )
    d = cfg.to_dict()
    assert set(d) == {"fwd", "bwd"}
    assert MosaicConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert MosaicConfig.from_dict(MosaicConfig().to_dict()) == MosaicConfig()


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda d: d.pop("bwd"), ValueError, r"missing \['bwd'\]"),
        (lambda d: d.update(extra={}), ValueError, r"unknown \['extra'\]"),
        (lambda d: d.update(fwd=[128, 2]), TypeError, "'fwd' must be a dict"),
        (lambda d: d["bwd"].update(block_k=64), ValueError, r"'bwd' has fields \['block_k'\]"),
        (lambda d: d["fwd"].update(block_kv=96), ValueError, "block_kv=96"),
    ],
)
def test_from_dict_rejects_malformed(mutate, error, match):
    d = MosaicConfig().to_dict()
    mutate(d)
    with pytest.raises(error, match=match):
        MosaicConfig.from_dict(d)


def test_from_dict_needs_a_dict():
    with pytest.raises(TypeError, match="needs a dict"):
        MosaicConfig.from_dict([1, 2])


# --- tune_problem with a fake timer ------------------------------------------------------------


def _fake_times(monkeypatch, fwd_best: MosaicForwardConfig, bwd_best: MosaicBackwardConfig, fail=()):
    """Forward/backward timers that favour one config each and raise for the configs in ``fail``; ``calls``
    records each config prepared, ``timed`` each time taken."""
    calls = {"fwd": [], "bwd": []}
    timed = {"fwd": [], "bwd": []}

    def fake(part, best, fast, slow):
        def prepare(p, cfg, xs):
            calls[part].append(cfg)
            if getattr(cfg, part) in fail:
                raise RuntimeError("does not compile")
            t = fast if getattr(cfg, part) == best else slow(cfg)

            def timer(min_time):
                timed[part].append(cfg)
                return t

            return timer

        return prepare

    monkeypatch.setattr(mosaic_tune, "_fwd_timer", fake("fwd", fwd_best, 1.0, lambda c: 2.0 + c.fwd.num_stages))
    monkeypatch.setattr(mosaic_tune, "_bwd_timer", fake("bwd", bwd_best, 0.5, lambda c: 3.0))
    calls["timed"] = timed
    return calls


def _small(head_dim, causal=True):
    return mosaic_tune.Problem(head_dim, "bfloat16", causal, 128, 1, 1)


def test_tune_problem_picks_the_fastest(cache_dir, monkeypatch):
    fwd_best = MosaicForwardConfig(block_kv=192, num_stages=2)
    bwd_best = MosaicBackwardConfig(num_stages=1, dq_block_kv=128, dq_num_stages=3)
    failing = MosaicForwardConfig(block_kv=64, num_stages=2)
    calls = _fake_times(monkeypatch, fwd_best, bwd_best, fail=(failing,))
    logs = []
    search = mosaic_tune.Search(top=2, rounds=3)
    cfg, times = mosaic_tune.tune_problem(_small(64), log=logs.append, search=search)
    assert cfg.fwd == fwd_best and cfg.bwd == bwd_best
    assert times["fwd_ms"] == 1000.0 and times["bwd_ms"] == 500.0
    # every candidate of the spaces is prepared (the heuristic's picks are among them)
    assert [c.fwd for c in calls["fwd"]] == mosaic_tune.forward_candidates(64, "bfloat16")
    assert [c.bwd for c in calls["bwd"]] == mosaic_tune.backward_candidates(64, "bfloat16")
    assert all(c.fwd == fwd_best for c in calls["bwd"])  # the backward is searched with the best forward
    skips = [line for line in logs if "skip" in line]
    assert len(skips) == 1 and "does not compile" in skips[0]
    # screened once each, then the top 2 and the heuristic's pick in 3 rounds
    base = mosaic_config.heuristic_config(head_dim=64, dtype="bfloat16", causal=True, seq_q=128, seq_k=128)
    n_fwd = len(calls["fwd"]) - 1
    assert len(calls["timed"]["fwd"]) == n_fwd + 3 * 3
    first_round = calls["timed"]["fwd"][n_fwd:n_fwd + 3]
    assert first_round[0] == dataclasses.replace(base, fwd=fwd_best) and first_round[2] == base
    assert first_round[1] not in (first_round[0], base)
    assert times["fwd_search"]["pick"] == repr(cfg.__class__(fwd=fwd_best, bwd=base.bwd))
    assert times["fwd_search"]["baseline"] == repr(base)
    assert len(times["fwd_search"]["screen"]) == n_fwd
    assert all(len(v) == 3 for v in times["bwd_search"]["confirm"].values())


def test_tune_problem_head_dim_256_searches_the_wide_backward(cache_dir, monkeypatch):
    bwd_best = MosaicBackwardConfig(num_stages=1, dq_block_kv=64, dq_num_stages=2)
    calls = _fake_times(monkeypatch, MosaicForwardConfig(block_kv=64, num_stages=2), bwd_best)
    cfg, times = mosaic_tune.tune_problem(_small(256, causal=False), log=lambda s: None, nondeterministic=True)
    assert cfg == MosaicConfig(fwd=MosaicForwardConfig(block_kv=64, num_stages=2), bwd=bwd_best)
    assert [c.bwd for c in calls["bwd"]] == mosaic_tune.backward_candidates(256, "bfloat16")
    assert set(times) == {"fwd_ms", "bwd_ms", "fwd_search", "bwd_search"}


def test_tune_problem_raises_when_nothing_compiles(cache_dir, monkeypatch):
    _fake_times(monkeypatch, None, None, fail=tuple(mosaic_tune.forward_candidates(128, "bfloat16")))
    with pytest.raises(RuntimeError, match="no candidate config compiled"):
        mosaic_tune.tune_problem(_small(128), log=lambda s: None)


# --- the command -----------------------------------------------------------------------------


def test_cli_knows_the_mosaic_backend():
    tune, config = tuning_cli.TUNERS["mosaic"]
    assert tune is mosaic_tune and config is mosaic_config
    for name in ("Problem", "tune_problem"):
        assert callable(getattr(tune, name))
    for name in ("config_key", "user_cache_path", "gpu_name"):
        assert callable(getattr(config, name))
    assert "mosaic" in tuning_cli.__doc__ and "triton" in tuning_cli.__doc__


@pytest.mark.skipif(tuning_cli.jax.default_backend() == "gpu", reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_cli_refuses_without_a_gpu(backend, capsys):
    assert tuning_cli.main(["--backend", backend]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
