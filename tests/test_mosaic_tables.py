"""The Mosaic backend's shipped tables (``backends/mosaic_gpu/tables/``) and the tuner's ``--out``/``--records``.

On a CPU: every entry is a valid config of the tuner's spaces that fits, and ``default_config`` returns it at its
bucket (both lengths in it) and nowhere else; the user's cache comes first. On a GPU (``gpu`` marker): each shipped
config through the public API against the float64 reference, at a ragged GQA shape, values and gradients.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu import tune as mosaic_tune
from pallas_flash.backends.mosaic_gpu.config import MosaicConfig, MosaicForwardConfig
from pallas_flash.backends.triton import config as triton_config
from pallas_flash.testing.shapes import Shape
from pallas_flash.tuning import __main__ as tuning_cli
from tests.test_mosaic_gpu import _check

GPU = "NVIDIA H200"
TABLES = {gpu: mosaic_config.shipped_table(gpu) for gpu in mosaic_config.SHIPPED_TABLES}
ENTRIES = [(gpu, key) for gpu, table in TABLES.items() for key in sorted(table)]


def _parse(key: str) -> tuple[int, str, bool, int]:
    d, dtype, causal, n = key.split("|")
    return int(d[1:]), dtype, causal == "causal=True", int(n[1:])


@pytest.fixture
def no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALLAS_FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    triton_config.read_user_table.cache_clear()
    yield tmp_path
    triton_config.read_user_table.cache_clear()


def test_every_gpu_named_has_its_table():
    for gpu, file in mosaic_config.SHIPPED_TABLES.items():
        path = mosaic_config.TABLES_DIR / file
        assert path.exists(), path
        assert TABLES[gpu], f"{path} is empty"
        assert path.read_text() == json.dumps(TABLES[gpu], indent=1, sort_keys=True) + "\n"  # as --out writes it


@pytest.mark.parametrize(
    "device_kind, file",
    [("NVIDIA H200", "h200.json"), ("NVIDIA H200 NVL", "h200.json"), ("NVIDIA H100 80GB HBM3", "h100.json"),
     ("NVIDIA H100 PCIe", "h100.json"), ("NVIDIA A100-SXM4-80GB", None), ("NVIDIA H800", None)],
)
def test_each_gpu_reads_the_table_tuned_on_it(device_kind, file):
    """The device kinds of real GPUs against the file tuned on that GPU (a swapped mapping passed every other
    test: each reads the table through the mapping)."""
    want = json.loads((mosaic_config.TABLES_DIR / file).read_text()) if file else {}
    assert mosaic_config.shipped_table(device_kind) == want


@pytest.mark.parametrize("gpu", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_an_entry_sets_the_backward_mode_for_its_whole_bucket(gpu):
    """The README's statement: the D=64 non-causal 1k entries fuse dQ from 513 keys (their bucket), where the
    heuristic starts at 1k; 512 keys is the 512 bucket's, untuned: the heuristic's deterministic dQ."""
    kw = dict(head_dim=64, dtype=jnp.bfloat16, causal=False)
    for n, deterministic in ((512, True), (513, False), (1000, False), (1024, False)):
        assert mosaic_config.default_config(**kw, seq_q=n, seq_k=n, gpu=gpu).bwd.deterministic is deterministic, n
    assert mosaic_config.default_config(**kw, seq_q=513, seq_k=513, gpu="").bwd.deterministic  # no table


@pytest.mark.parametrize("gpu, key", ENTRIES)
def test_each_entry_is_a_fitting_config_of_the_tuners_spaces(gpu, key):
    head_dim, dtype, causal, n = _parse(key)
    assert key == mosaic_config.config_key(head_dim, dtype, causal, n)
    assert head_dim in mosaic_config.HEAD_DIMS and dtype == "bfloat16"
    cfg = MosaicConfig.from_dict(TABLES[gpu][key])
    cfg.fwd.check_fits(head_dim, dtype)
    cfg.bwd.check_fits(head_dim, dtype)
    assert cfg.fwd in mosaic_tune.forward_candidates(head_dim, dtype)
    assert cfg.bwd in mosaic_tune.backward_candidates(head_dim, dtype, nondeterministic=True)


@pytest.mark.parametrize("gpu, key", ENTRIES)
def test_default_config_takes_the_entry_in_its_bucket_only(gpu, key, no_user_cache):
    head_dim, _, causal, n = _parse(key)
    want = MosaicConfig.from_dict(TABLES[gpu][key])
    for dtype in (jnp.bfloat16, jnp.float16):  # fp16 takes bf16's entries
        for seq_q, seq_k in ((n, n), (n - 37, n), (n, n // 2 + 1)):
            got = mosaic_config.default_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=seq_q,
                                               seq_k=seq_k, gpu=gpu)
            assert got == want, (dtype, seq_q, seq_k)
    # lengths in two buckets, or in a bucket the table does not hold, take the heuristics
    for seq_q, seq_k in ((n, 2 * n), (n // 2, n), (2 * n, 2 * n)):
        if seq_q == seq_k and mosaic_config.config_key(head_dim, "bfloat16", causal, seq_q) in TABLES[gpu]:
            continue
        kw = dict(head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, seq_q=seq_q, seq_k=seq_k)
        assert mosaic_config.default_config(**kw, gpu=gpu) == mosaic_config.default_config(**kw, gpu="")


def test_the_user_cache_comes_before_the_shipped_table(no_user_cache):
    key = next(k for gpu, k in ENTRIES if gpu == "H200")
    head_dim, _, causal, n = _parse(key)
    shipped = MosaicConfig.from_dict(TABLES["H200"][key])
    mine = dataclasses.replace(shipped, fwd=MosaicForwardConfig(block_kv=64, num_stages=2))
    assert mine != shipped
    mosaic_config.user_cache_path().write_text(json.dumps({GPU: {key: mine.to_dict()}}))
    kw = dict(head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, seq_q=n, seq_k=n)
    assert mosaic_config.default_config(**kw, gpu=GPU) == mine
    assert mosaic_config.default_config(**kw, gpu="NVIDIA A100") == mosaic_config.default_config(**kw, gpu="")


def test_a_fused_entry_gives_way_where_the_fused_dq_loses(no_user_cache, monkeypatch):
    fused = [(gpu, k) for gpu, k in ENTRIES if not TABLES[gpu][k]["bwd"]["deterministic"]]
    if not fused:
        pytest.skip("no shipped entry fuses dQ")
    gpu, key = fused[0]
    head_dim, _, causal, n = _parse(key)
    kw = dict(head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, seq_q=n, seq_k=n, gpu=gpu)
    heuristic_det = mosaic_config.default_backward(head_dim, jnp.bfloat16, n, n, causal=causal, deterministic=True)
    assert mosaic_config.default_config(**kw, kv_groups=4).bwd == heuristic_det
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert mosaic_config.default_config(**kw).bwd == heuristic_det


def test_an_invalid_shipped_entry_raises(no_user_cache, monkeypatch):
    key = mosaic_config.config_key(128, "bfloat16", False, 4096)
    bad = {"fwd": {"block_kv": 256, "num_stages": 4}, "bwd": {}}  # does not fit at D=128
    monkeypatch.setattr(mosaic_config, "shipped_table", lambda gpu: {key: bad})
    with pytest.raises(ValueError, match="shipped Mosaic table.*d128"):
        mosaic_config.default_config(head_dim=128, dtype=jnp.bfloat16, causal=False, seq_q=4096, seq_k=4096, gpu=GPU)


# --- the command's --out and --records ------------------------------------------------------------------


def test_out_resumes_and_records_append(tmp_path, monkeypatch, capsys):
    tuned = []

    def fake_tune(p, log=print, **kw):
        tuned.append((p.head_dim, p.causal, p.seq))
        assert isinstance(kw.get("search"), tuning_cli.Search) and kw["search"].rounds == 2
        cfg = MosaicConfig(fwd=MosaicForwardConfig(block_kv=64 if p.causal else 128, num_stages=2))
        return cfg, {"fwd_ms": 1.0, "bwd_ms": 2.0, "fwd_search": {}, "bwd_search": {}}

    monkeypatch.setattr(tuning_cli.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_config, "gpu_name", lambda: GPU)
    monkeypatch.setattr(mosaic_tune, "tune_problem", fake_tune)
    out, records = tmp_path / "table.json", tmp_path / "records.jsonl"
    done_key = mosaic_config.config_key(64, "bfloat16", False, 1024)
    out.write_text(json.dumps({done_key: {"kept": True}}))
    args = ["--backend", "mosaic", "--head-dims", "64", "--seq-lens", "1024,4096", "--rounds", "2",
            "--out", str(out), "--records", str(records)]
    assert tuning_cli.main(args) == 0
    assert tuned == [(64, False, 4096), (64, True, 1024), (64, True, 4096)]  # the entry in --out was skipped
    table = json.loads(out.read_text())
    assert table[done_key] == {"kept": True} and len(table) == 4
    assert out.read_text().endswith("\n") and not out.with_name("table.json.tmp").exists()
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [line["key"] for line in lines] == [mosaic_config.config_key(64, "bfloat16", c, n)
                                             for c, n in ((False, 4096), (True, 1024), (True, 4096))]
    assert all(line["gpu"] == GPU and line["bwd_ms"] == 2.0 for line in lines)
    assert "skipped" in capsys.readouterr().err


def _fake_tuner(monkeypatch, fail_at=None):
    """The command with a fake GPU and ``tune_problem`` (the ``fail_at``-th problem raises); the problems tuned."""
    tuned = []

    def fake_tune(p, log=print, **kw):
        tuned.append((p.head_dim, p.causal, p.seq))
        if len(tuned) == fail_at:
            raise RuntimeError("no candidate config compiled")
        return MosaicConfig(fwd=MosaicForwardConfig(block_kv=64, num_stages=2)), {"fwd_ms": 1.0, "bwd_ms": 2.0}

    monkeypatch.setattr(tuning_cli.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_config, "gpu_name", lambda: GPU)
    monkeypatch.setattr(mosaic_tune, "tune_problem", fake_tune)
    return tuned


def test_the_user_cache_is_saved_after_each_problem(no_user_cache, monkeypatch):
    """A later problem's failure keeps what the earlier ones tuned, merged into the entries already there."""
    path = mosaic_config.user_cache_path()
    path.write_text(json.dumps({"other GPU": {"k": {"fwd": {}}}}))
    tuned = _fake_tuner(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="no candidate"):
        tuning_cli.main(["--backend", "mosaic", "--head-dims", "64", "--seq-lens", "1024,4096"])
    cache = json.loads(path.read_text())
    assert cache["other GPU"] == {"k": {"fwd": {}}} and len(tuned) == 3
    assert sorted(cache[GPU]) == sorted(mosaic_config.config_key(64, "bfloat16", False, n) for n in (1024, 4096))


@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "0"], "--seq-lens takes positive integers"),
    (["--head-dims", "64,x"], "--head-dims takes comma-separated integers"),
    (["--head-dims", "96"], "this backend's kernels take head dims (64, 128, 256)"),
    (["--dtypes", "bf16"], "'bf16' is not a dtype"),
    (["--dtypes", "float32"], "the mosaic kernels take bfloat16, float16"),
    (["--seq-lens", "3000,4096"], "give problems that share a key (d128|bfloat16|causal=False|n4096"),
    (["--tokens", "0"], "--tokens and --hidden take positive integers"),
])
def test_bad_arguments_stop_before_any_tuning(no_user_cache, monkeypatch, capsys, argv, message):
    tuned = _fake_tuner(monkeypatch)
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "mosaic", *argv])
    assert message in capsys.readouterr().err and tuned == []


def test_a_broken_user_cache_stops_before_any_tuning(no_user_cache, monkeypatch, capsys):
    path = mosaic_config.user_cache_path()
    path.write_text('{"NVIDIA H200": {')  # cut short
    tuned = _fake_tuner(monkeypatch)
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "mosaic", "--head-dims", "64", "--seq-lens", "1024"])
    assert "is not readable JSON" in capsys.readouterr().err and tuned == []
    assert path.read_text() == '{"NVIDIA H200": {'  # left for the user to fix


def test_two_runs_writing_one_cache_keep_each_others_entries(no_user_cache, monkeypatch):
    """Two tuning runs on one machine (two GPUs, two shells) write one user cache: each entry is merged into the
    file as it is then, under a lock, so the run finishing last keeps what the other wrote meanwhile (each used to
    rewrite the whole file from its copy read at start)."""
    tuned = _fake_tuner(monkeypatch)
    inner = mosaic_tune.tune_problem

    def tune_while_another_run_finishes(p, log=print, **kw):
        if p.head_dim == 64 and not tuned:  # run A is tuning d64 while run B tunes d128 from start to end
            tuning_cli.main(["--backend", "mosaic", "--head-dims", "128", "--seq-lens", "1024", "--causal", "no"])
        return inner(p, log, **kw)

    monkeypatch.setattr(mosaic_tune, "tune_problem", tune_while_another_run_finishes)
    tuning_cli.main(["--backend", "mosaic", "--head-dims", "64", "--seq-lens", "1024", "--causal", "no"])
    cache = json.loads(mosaic_config.user_cache_path().read_text())
    assert sorted(cache[GPU]) == sorted(mosaic_config.config_key(d, "bfloat16", False, 1024) for d in (64, 128))
    assert [p.name for p in no_user_cache.iterdir() if p.name.endswith(".tmp")] == []


def test_records_in_a_new_folder_and_the_entry_saved_first(tmp_path, monkeypatch):
    """``--records`` in a folder that does not exist yet: made before any tuning (the first problem's append used to
    raise after its tuning, before its entry was saved)."""
    _fake_tuner(monkeypatch)
    out, records = tmp_path / "table.json", tmp_path / "new" / "records.jsonl"
    assert tuning_cli.main(["--backend", "mosaic", "--head-dims", "64", "--seq-lens", "1024", "--causal", "no",
                            "--out", str(out), "--records", str(records)]) == 0
    assert len(json.loads(out.read_text())) == 1 and len(records.read_text().splitlines()) == 1


def test_head_dims_that_pad_alike_and_out_with_print_json_are_refused(no_user_cache, monkeypatch, capsys):
    monkeypatch.setattr(tuning_cli.jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "triton", "--head-dims", "96,128", "--seq-lens", "1024"])
    assert "--head-dims 96,128 and --seq-lens 1024 give problems that share a key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "mosaic", "--out", "t.json", "--print-json"])
    assert "--out and --print-json: give one" in capsys.readouterr().err


def test_search_options_are_for_the_mosaic_backend(monkeypatch):
    monkeypatch.setattr(tuning_cli.jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "triton", "--rounds", "3"])
    with pytest.raises(SystemExit):
        tuning_cli.main(["--backend", "mosaic", "--top", "0"])


# --- on a GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gpu, key", ENTRIES)
def test_gpu_each_shipped_config_against_float64(gpu, key, seed):
    """The entry's config on a ragged GQA problem (lengths not block multiples, Tq != Tk): values, lse, gradients."""
    head_dim, _, causal, _ = _parse(key)
    config = MosaicConfig.from_dict(TABLES[gpu][key])
    _check(Shape("t", 1, 1100, 1300, 4, 2, head_dim), jnp.bfloat16, causal, seed, config, grads=True)
