"""CPU smoke tests of the benchmark harness (``benchmarks.attention``, ``.timing``, ``.report``).

Everything here runs without a GPU: FLOP math, CLI parsing, table formatting,
the chunked float32 reference, and dry runs of the harness on tiny shapes with
``implementation="xla"`` and the Pallas kernels in interpret mode.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as bench
from benchmarks import report, timing
from pallas_flash.testing.shapes import Shape, paper_grid

ON_CPU = jax.default_backend() != "gpu"
# Every axis given, so that the CPU profile's defaults and the GPU's full sweep agree.
TINY = ["--allow-cpu", "--seq-lens", "64", "--head-dims", "16", "--hidden", "32", "--batch-tokens", "128", "--min-time", "0.01",
        "--gqa", "1", "--dtypes", "bf16"]


def opts_for(*argv: str) -> bench.Options:
    return bench.parse_args(list(argv), on_cpu=ON_CPU)


# --- FLOP math and shapes ----------------------------------------------------


def test_flops_standard_count():
    s = Shape("x", 16, 1024, 1024, 16, 16, 128)
    fwd = 4 * 16 * 16 * 1024 * 1024 * 128
    assert s.flops("fwd") == fwd
    assert s.flops("bwd") == 2.5 * fwd
    assert s.flops("fwd_bwd") == 3.5 * fwd
    c = Shape("c", 16, 1024, 1024, 16, 16, 128, causal=True)
    assert c.flops("fwd") == fwd / 2


def test_paper_grid_keeps_tokens_and_hidden():
    grid = paper_grid(head_dims=(64, 128), seq_lens=(1024, 16384), gqa=4)
    assert len(grid) == 2 * 2 * 2
    for s in grid:
        assert s.batch * s.seq_q == 16384
        assert s.num_heads * s.head_dim == 2048
        assert s.num_heads == 4 * s.num_kv_heads


# --- CLI -----------------------------------------------------------------------


def test_parse_seq_len():
    assert bench.parse_seq_len("4k") == 4096
    assert bench.parse_seq_len(" 512 ") == 512
    assert bench.parse_seq_len("32K") == 32768
    for bad in ("4x", "", "-1", "k"):
        with pytest.raises(ValueError):
            bench.parse_seq_len(bad)


def test_quick_defaults_and_overrides():
    o = bench.parse_args(["--quick"])
    assert o.head_dims == (64, 128) and o.seq_lens == (1024, 4096)
    assert o.dtypes == ("bf16",) and o.passes == ("fwd", "fwd_bwd") and o.causal == (False, True)
    assert o.impls == ("pallas_flash", "cudnn")
    assert len(bench.plan(o)) == 8
    o = bench.parse_args(["--quick", "--impls", "pallas_flash,cudnn", "--only", "fwd+bwd", "--causal", "yes", "--dtypes", "fp16,bfloat16"])
    assert o.impls == ("pallas_flash", "cudnn") and o.passes == ("fwd_bwd",) and o.causal == (True,)
    assert o.dtypes == ("fp16", "bf16")


def test_issue_table_plan():
    o = bench.parse_args(
        ["--head-dims", "64,128", "--seq-lens", "1k,4k,16k", "--dtypes", "bf16", "--impls", "pallas_flash,cudnn,pallas_mha", "--only", "fwd,fwd_bwd", "--gqa", "1"]
    )
    shapes = [s for _, _, s in bench.plan(o)]
    assert len(shapes) == 12
    assert {(s.head_dim, s.seq_q, s.causal) for s in shapes} == {
        (d, n, c) for d in (64, 128) for n in (1024, 4096, 16384) for c in (False, True)
    }


def test_full_and_memory_defaults():
    o = bench.parse_args([])
    assert o.head_dims == (64, 128, 256) and o.seq_lens[0] == 512 and o.seq_lens[-1] == 32768
    assert o.gqa == (1, 4) and o.dtypes == ("bf16", "fp16") and set(o.passes) == {"fwd", "bwd", "fwd_bwd"}
    m = bench.parse_args(["--memory"])
    assert m.memory and m.impls == ("pallas_flash", "xla", "cudnn")
    assert m.seq_lens[-1] == 128 * 1024 and m.memory_method == "measured"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--impls", "pallas_flash,flashy"], "unknown value 'flashy'"),
        (["--dtypes", "int8"], "--dtypes"),
        (["--only", "forward"], "--only"),
        (["--head-dims", "96"], "does not divide --hidden"),
        (["--head-dims", "128", "--gqa", "3"], "--gqa 3"),
        (["--seq-lens", "1k,abc"], "cannot parse sequence length 'abc'"),
        (["--min-time", "0"], "--min-time"),
        (["--tag", "a/b"], "--tag"),
        (["--report-from", "/no/such.jsonl"], "no such file"),
    ],
)
def test_bad_cli_input_is_a_clear_error(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--only", "--impls", "--memory", "--out", "--tag", "--gqa", "--causal"):
        assert flag in out


@pytest.mark.skipif(not ON_CPU, reason="checks the no-GPU message")
def test_cpu_without_allow_cpu_says_a_gpu_is_needed(capsys, tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --- timing helpers ------------------------------------------------------------


def test_slugify_and_device_info():
    assert timing.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert timing.slugify("  ") == "unknown-device"
    info = timing.device_info()
    assert info.slug and info.jax_version == jax.__version__


def test_num_input_sets():
    mb = 1024 * 1024
    assert timing.num_input_sets(256 * mb) == 1
    assert timing.num_input_sets(64 * mb) == 2
    assert timing.num_input_sets(1 * mb) == 3


def test_classify_exception():
    assert timing.classify_exception(NotImplementedError("x")) == "n/a"
    assert timing.classify_exception(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")) == "OOM"
    assert timing.classify_exception(ValueError("head_dim 512 is not supported")) == "n/a"
    assert timing.classify_exception(RuntimeError("boom")) == "ERR"
    msg = timing.short_message(RuntimeError("first line\nsecond"), limit=24)
    assert msg.startswith("RuntimeError: first") and len(msg) <= 24


def test_time_fn_rotates_sets_and_reports_median():
    calls = []

    def fn(x):
        calls.append(int(x[0]))
        return x + 1

    sets = [(jnp.full((4,), i),) for i in range(3)]
    t = timing.time_fn(fn, sets, min_time=0.01, warmup=1, min_samples=5, max_samples=7)
    assert 5 <= t.samples <= 7 and t.inner >= 1 and t.input_sets == 3
    assert set(calls) == {0, 1, 2}
    assert t.min_s <= t.median_s and t.median_s > 0
    with pytest.raises(ValueError):
        timing.time_fn(fn, [])


# --- report formatting -----------------------------------------------------------


def test_md_table():
    text = report.md_table(["a", "bb"], [[1, "x"], [22, "yyy"]], "lr")
    lines = text.splitlines()
    assert lines[0] == "| a  |  bb |"
    assert lines[1] == "| :- | --: |"
    assert lines[3] == "| 22 | yyy |"
    with pytest.raises(ValueError):
        report.md_table(["a"], [[1, 2]])


def test_cells():
    ok = dict(status="ok", tflops=312.44, time_s=0.0123, checked=True, err=3e-3)
    assert report.speed_cell(ok) == "312.4"
    assert report.speed_cell(dict(ok, checked=False)) == "312.4*"
    assert report.speed_cell(dict(ok, tflops=1.234)) == "1.23"
    assert report.speed_cell(dict(status="OOM")) == "OOM"
    assert report.speed_cell(None) == "—"
    assert report.time_cell(ok) == "12.3"
    assert report.err_cell(ok) == "3.0e-03"
    assert report.err_cell(dict(status="FAIL", err=0.5)) == "FAIL 5.0e-01"
    assert report.err_cell(dict(status="FAIL", err=float("nan"))) == "FAIL nan"
    assert report.err_cell(dict(status="n/a")) == "n/a"
    assert report.err_cell(dict(ok, err=None, message="ref too large; cuDNN ref OOM")) == "unchecked: ref too large"
    assert report.err_cell(dict(ok, ref="cudnn")) == "3.0e-03 (vs cudnn)"
    assert report.ratio_cell(ok, dict(ok, tflops=156.22)) == "2.00×"
    assert report.ratio_cell(ok, dict(status="ERR")) == "—"
    assert report.seq_label(512) == "512" and report.seq_label(16384) == "16k"


def _speed_rec(impl, tflops, n=1024, causal=False, status="ok", pass_="fwd"):
    return dict(
        kind="speed", impl=impl, status=status, tflops=tflops, time_s=1e-3, checked=True, err=1e-3, tol=2e-2,
        dtype="bf16", gqa=1, batch=16, seq_q=n, seq_k=n, heads=16, kv_heads=16, head_dim=128, causal=causal,
        **{"pass": pass_},
    )


def test_speed_markdown_has_ratio_column_and_problems():
    recs = [
        _speed_rec("pallas_flash", 300.0),
        _speed_rec("cudnn", 400.0),
        _speed_rec("pallas_flash", 0, n=4096, status="FAIL"),
        _speed_rec("cudnn", 410.0, n=4096),
    ]
    recs[2]["err"] = 0.3
    md = report.speed_markdown(recs, ["pallas_flash", "cudnn"])
    assert "pallas_flash/cudnn" in md and "0.75×" in md and "FAIL" in md
    problems = report.problems_markdown(recs)
    assert "pallas_flash" in problems and "FAIL" in problems and "3.00e-01" in problems
    assert "every configuration" in report.problems_markdown(recs[:2])
    text = report.summary_text(recs, ["pallas_flash", "cudnn"])
    assert "TFLOP/s, forward, bf16, MHA" in text and "1 FAIL" in text
    assert len(report.summary_text(recs * 200, max_chars=2000)) < 2100


def test_unique_stem(tmp_path):
    assert report.unique_stem(tmp_path, "2026-01-01").name == "2026-01-01"
    (tmp_path / "2026-01-01.md").write_text("x")
    assert report.unique_stem(tmp_path, "2026-01-01").name == "2026-01-01-2"


# --- the float32 reference ---------------------------------------------------------


def test_chunk_plan():
    gib = 2**30
    assert bench._chunk_plan(16, 16, 1, 1024, 1024, 6, 8 * gib) == (16, 16, 1024)
    b, h, rows = bench._chunk_plan(1, 16, 1, 32768, 32768, 6, 8 * gib)
    assert b == 1 and h == 1 and rows * 32768 * 4 * 6 <= 8 * gib and 32768 % rows == 0
    b, h, rows = bench._chunk_plan(4, 6, 2, 100, 100, 6, 100 * 100 * 4 * 6 * 2 * 3)
    assert rows == 100 and 6 % h == 0 and h == 3 and b == 1
    with pytest.raises(MemoryError):
        bench._chunk_plan(1, 1, 1, 64, 10**9, 6, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_reference_matches_direct(causal):
    shape = Shape("r", 2, 64, 48, 4, 2, 16, causal)
    q, k, v, g = bench.make_inputs(shape, jnp.float32, jax.random.key(1))

    def direct(q, k, v):
        mask = jnp.tril(jnp.ones((64, 48), bool))[None, None] if causal else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    out, pullback = jax.vjp(direct, q, k, v)
    grads = pullback(g)
    # A budget that forces chunks of 16 query rows, one KV head and one batch element.
    budget = 16 * shape.num_heads // shape.num_kv_heads * shape.seq_k * 4 * 6
    assert bench._chunk_plan(2, 2, 2, 64, 48, 6, budget) == (1, 1, 16)
    r_out, r_grads = bench.reference_f32(q, k, v, g, causal, True, budget)
    np.testing.assert_allclose(r_out, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(r_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    r_out2, none = bench.reference_f32(q, k, v, g, causal, False, budget)
    assert none is None
    np.testing.assert_allclose(r_out2, out, rtol=1e-5, atol=1e-5)


# --- dry runs of the harness ---------------------------------------------------------


def test_harness_statuses_with_fake_impls(monkeypatch):
    """Wrong results are FAIL, exceptions are n/a / OOM / ERR, a correct one is ok; all recorded."""

    def wrong(shape):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla") * 1.5

    def unsupported(shape):
        raise NotImplementedError("no such kernel")

    def oom(shape):
        def f(q, k, v):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB")

        return f

    def broken(shape):
        def f(q, k, v):
            raise RuntimeError("kernel exploded")

        return f

    registry = dict(bench.IMPL_REGISTRY)
    for name, build in [("wrong", wrong), ("unsupported", unsupported), ("oom", oom), ("broken", broken)]:
        registry[name] = bench.Impl(name, build)
    monkeypatch.setattr(bench, "IMPL_REGISTRY", registry)
    opts = opts_for(*TINY, "--causal", "yes")
    opts = bench.dataclasses.replace(opts, impls=("xla", "wrong", "unsupported", "oom", "broken"))
    (dtype, g, shape), = bench.plan(opts)
    recs = []
    bench.bench_shape(shape, dtype, g, opts, jax.random.key(0), recs.append)
    status = {(r["impl"], r["pass"]): r["status"] for r in recs}
    assert len(recs) == 5 * 3
    for p in ("fwd", "fwd_bwd", "bwd"):
        assert status[("xla", p)] == "ok"
        assert status[("wrong", p)] == "FAIL"
        assert status[("unsupported", p)] == "n/a"
        assert status[("oom", p)] == "OOM"
        assert status[("broken", p)] == "ERR"
    xla = [r for r in recs if r["impl"] == "xla"]
    assert all(r["checked"] and r["ref"] == "f32-xla" and r["err"] < 2e-2 and r["tflops"] > 0 for r in xla)
    assert set(next(r for r in xla if r["pass"] == "fwd_bwd")["errs"]) == {"out", "dq", "dk", "dv"}
    assert set(next(r for r in xla if r["pass"] == "bwd")["errs"]) == {"dq", "dk", "dv"}
    problems = report.problems_markdown(recs)
    for word in ("wrong", "unsupported", "oom", "broken", "kernel exploded"):
        assert word in problems


def test_main_dry_run_writes_report(tmp_path, capsys):
    rc = bench.main(TINY + ["--impls", "xla,cudnn", "--gqa", "1,2", "--out", str(tmp_path / "{device}"), "--tag", "smoke"])
    assert rc == 0
    out_dir = tmp_path / timing.device_info().slug
    md = next(out_dir.glob("*-smoke.md"))
    text = md.read_text()
    assert "## Throughput" in text and "GQA 2:1" in text and "xla/cudnn" in text and "## Problems" in text
    assert "Command" in text and "jax " + jax.__version__ in text
    lines = [json.loads(ln) for ln in md.with_suffix(".jsonl").read_text().splitlines()]
    speed = [r for r in lines if r["kind"] == "speed"]
    assert len(speed) == 2 * 2 * 2 * 3  # gqa x causal x impls x passes
    assert all(r["status"] == "ok" and r["err"] < 2e-2 for r in speed if r["impl"] == "xla")
    if ON_CPU:
        assert all(r["status"] == "n/a" for r in speed if r["impl"] == "cudnn")
    assert lines[-1]["kind"] == "meta" and lines[-1]["status"] == "complete"
    pngs = list(out_dir.glob("*-smoke-*.png"))
    assert len(pngs) == 2 * 3  # (gqa) x (pass)
    stdout = capsys.readouterr().out
    assert "== TFLOP/s, forward, bf16, MHA ==" in stdout and "Wrote" in stdout

    # Merge the raw records back into a report without running anything.
    rc = bench.main(["--report-from", str(md.with_suffix(".jsonl")), "--no-plots"])
    assert rc == 0
    assert next(out_dir.glob("*-smoke-merged.md")).read_text().count("### ") == 2 * 3


@pytest.mark.skipif(not ON_CPU, reason="interpret-mode path")
def test_pallas_kernels_in_interpret_mode():
    opts = opts_for(*TINY, "--impls", "pallas_flash,pallas_mha", "--batch-tokens", "64", "--gqa", "2", "--causal", "yes")
    (dtype, g, shape), = bench.plan(opts)
    recs = []
    bench.bench_shape(shape, dtype, g, opts, jax.random.key(0), recs.append)
    assert len(recs) == 2 * 3
    for r in recs:
        assert r["status"] == "ok", r
        assert r["checked"] and r["err"] < 2e-2


def test_memory_analysis_point():
    rec = bench.memory_point("xla", 128, "bf16", measure=False, head_dim=16, heads=2)
    assert rec["status"] == "ok", rec
    assert rec["method"] == "analysis" and rec["io_bytes"] == 8 * 128 * 2 * 16 * 2
    assert rec["analysis_bytes"] >= rec["io_bytes"]
    if ON_CPU:
        assert bench.memory_point("cudnn", 128, "bf16", measure=False)["status"] == "n/a"


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU answer of the subprocess path")
def test_memory_subprocess_plumbing():
    """The measured method runs each point in a fresh process and reads back its record."""
    rec = bench._memory_subprocess("xla", 128, "bf16", timeout=120)
    assert rec["kind"] == "memory" and rec["method"] == "measured" and rec["impl"] == "xla"
    assert rec["status"] == "n/a" and "needs a GPU" in rec["message"]
    assert rec["analysis_bytes"] >= rec["io_bytes"]


def test_memory_report_and_plot(tmp_path):
    recs = []
    for impl, scale in (("pallas_flash", 1), ("xla", 4)):
        for n in (1024, 2048, 4096):
            recs.append(
                dict(kind="memory", impl=impl, method="measured", status="ok" if (impl, n) != ("xla", 4096) else "OOM",
                     seq_q=n, seq_k=n, batch=1, heads=16, kv_heads=16, head_dim=128, causal=True, dtype="bf16", gqa=1,
                     io_bytes=8 * n * 16 * 128 * 2, peak_bytes=scale * 10 * n * 16 * 128 * 2, analysis_bytes=scale * 9 * n * 16 * 128 * 2)
            )
    md = report.memory_markdown(recs, ["pallas_flash", "xla"])
    assert "pallas_flash peak" in md and "xla analysis" in md and "OOM" in md
    paths = report.write_report(recs, {"device": "test", "impls": ["pallas_flash", "xla"], "memory_bytes": 2**34}, tmp_path / "x-memory")
    assert [p.name for p in paths] == ["x-memory.md", "x-memory.png"]
    assert "## Peak memory" in paths[0].read_text()
    assert math.isclose(report.GIB, 2**30)
