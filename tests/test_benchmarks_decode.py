"""The decode benchmark's command line and table (the timing itself needs a GPU: ``python -m benchmarks.decode``)."""

from __future__ import annotations

import json

import pytest

from benchmarks import decode as bench


def test_defaults_and_overrides():
    a = bench.parse_args([])
    assert a.batches == (1, 8, 32) and a.tokens == (1024, 8192, 32768, 131072) and a.layers == 1
    assert a.impls == bench.DEFAULT_IMPLS
    b = bench.parse_args(["--batches", "2", "--tokens", "4k,640", "--page-size", "64", "--layers", "32"])
    assert b.batches == (2,) and b.tokens == (4096, 640) and b.layers == 32


@pytest.mark.parametrize("argv", [["--tokens", "1000"], ["--impls", "bogus"], ["--batches", "x"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_table_ratios_are_cudnn_time_over_each():
    recs = [
        dict(batch=8, tokens=8192, impl="cudnn", status="ok", time_s=2e-4, kv_tbps=1.0),
        dict(batch=8, tokens=8192, impl="pallas_flash", status="ok", time_s=1e-4, kv_tbps=2.0),
        dict(batch=8, tokens=8192, impl="xla", status="OOM"),
    ]
    t = bench.table(recs, ["pallas_flash", "cudnn", "xla"])
    row = t.iloc[0]
    assert row["pallas_flash vs cuDNN"] == "2.00x" and row["xla ms"] == "OOM" and row["tokens"] == "8k"


@pytest.mark.parametrize("argv, fragment", [
    (["--page-size", "0"], "--page-size must be a positive multiple of 16 dividing every --tokens value, got 0"),
    (["--page-size", "-64"], "--page-size must be a positive multiple of 16"),
    (["--page-size", "48"], "--page-size must be a positive multiple of 16 dividing every --tokens value, got 48"),
    (["--batches", "0"], "--batches and --tokens must be positive"),
    (["--time-budget", "0"], "--time-budget must be positive"),
])
def test_bad_values_are_usage_errors_naming_the_flag(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--sweep", "--impls", "xla", "--batches", "2", "--tokens", "1k"], "drop --batches, --tokens, --impls"),
    (["--sweep", "--page-size", "32"], "drop --page-size"),
])
def test_sweep_refuses_the_flags_it_would_ignore(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert bench.parse_args(["--sweep", "--quick", "--layers", "4"]).sweep  # the flags it uses are fine


def test_time_budget_records_the_points_it_skips(tmp_path, monkeypatch):
    """A point not run for the time budget is named in the .md and in the .jsonl's last meta line."""
    import types

    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bench.common, "device_info", lambda: dict(device="FAKE", device_slug="fake", jax_version="x"))
    clock = iter(range(0, 1000, 10))  # 10 s per call: the first point starts within 15 s, the others not
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))

    def fake_point(batch, tokens, impls, opts, on_record):
        for name in impls:
            on_record(dict(kind="decode", batch=batch, tokens=tokens, impl=name, status="ok", time_s=1e-3, kv_tbps=1.0))

    monkeypatch.setattr(bench, "bench_point", fake_point)
    argv = ["--batches", "1,8,32", "--tokens", "1k", "--impls", "xla", "--time-budget", "15", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (jsonl,) = tmp_path.glob("*-decode.jsonl")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["batch"] for r in lines if r["kind"] == "decode"] == [1]
    assert lines[0]["status"] == "running" and lines[-1]["kind"] == "meta"
    assert lines[-1]["status"] == "partial: time budget of 15 s reached, 2 of 3 points not run"
    assert lines[-1]["skipped"] == [[8, 1024], [32, 1024]]
    md = jsonl.with_suffix(".md").read_text()
    assert "partial: time budget of 15 s reached, 2 of 3 points not run" in md
    assert "- B=8 tokens=1k: not run, the time budget of 15 s was reached" in md
    assert "- B=32 tokens=1k: not run" in md


def _gqa_attention(q, k, v, lengths, kp, vp, tables):
    """Plain GQA attention over the whole cache, for fake implementations on the CPU."""
    import jax
    import jax.numpy as jnp

    g = q.shape[2] // k.shape[2]
    kk, vv = (jnp.repeat(x, g, axis=2).astype(jnp.float32) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) / q.shape[-1] ** 0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vv).astype(q.dtype)


def test_bench_point_bytes_and_checks(monkeypatch):
    """TB/s counts every byte a decode call moves (K/V read, q read, the output written); the reference's own cell
    and a cell with no reference are not recorded as checked, and the table marks them ``*``."""
    import argparse

    from pallas_flash.tuning import timer

    def broken():
        raise RuntimeError("this reference does not run")

    monkeypatch.setattr(timer, "time_fn", lambda fn, sets, **kw: timer.Timing(1e-3, 1e-3, 0.0, 5, 1, len(sets)))
    monkeypatch.setitem(bench.IMPLS, "cudnn", (lambda: broken, "fails"))
    opts = argparse.Namespace(max_sets=1, layers=1, page_size=64, seed=0, min_time=0.0)
    recs = []
    bench.bench_point(1, 1024, {"pallas_flash": _gqa_attention, "xla": _gqa_attention}, opts, recs.append)
    kv = 2 * 1024 * bench.KV_HEADS * bench.HEAD_DIM * 2
    q_out = 2 * bench.HEADS * bench.HEAD_DIM * 2
    mine, ref = recs
    assert mine["status"] == ref["status"] == "ok"
    assert ref["err"] is None and ref["ref"] is None and ref["reference"]  # not checked against itself
    assert mine["tbps"] == pytest.approx((kv + q_out) / 1e-3 / 1e12) and mine["kv_tbps"] == pytest.approx(kv / 1e9)
    assert mine["ref"] == "xla" and mine["err"] == 0.0  # the same function as the reference here
    assert bench.point_bytes(1, 1024) == (kv, kv + q_out)
    row = bench.table(recs, ["pallas_flash", "xla"]).iloc[0]
    assert row["pallas_flash TB/s"] == f"{(kv + q_out) / 1e9:.2f}" and row["xla TB/s"].endswith("*")

    monkeypatch.setitem(bench.IMPLS, "xla", (lambda: broken, "fails"))  # no reference runs at all
    recs = []
    bench.bench_point(1, 1024, {"pallas_flash": _gqa_attention}, opts, recs.append)
    assert recs[0]["status"] == "ok" and recs[0]["err"] is None and recs[0]["ref"] is None
    assert bench.table(recs, ["pallas_flash"]).iloc[0]["pallas_flash TB/s"].endswith("*")
