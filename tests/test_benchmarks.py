"""CPU smoke tests of the benchmark harness (``benchmarks.attention``, ``.harness``, ``.report``, ``.common``)
and of the library pieces it stands on (``pallas_flash.testing.errors``, the timer; the chunked float32 reference
in test_chunked_reference.py).

Everything here runs without a GPU: FLOP math, CLI parsing, the timer (table formatting: test_benchmarks_report.py),
and dry runs of the harness on tiny shapes with ``implementation="xla"`` and the
Pallas kernels in interpret mode.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as bench
from benchmarks import common, harness, report
from pallas_flash.testing.errors import rel_err
from pallas_flash.testing.shapes import Shape, paper_grid
from pallas_flash.tuning.timer import num_input_sets, time_fn
from tests.test_benchmarks_report import _rows, _speed_rec

ON_CPU = jax.default_backend() != "gpu"
# Every axis given, so that the CPU profile's defaults and the GPU's full sweep agree.
TINY = ["--allow-cpu", "--seq-lens", "64", "--head-dims", "16", "--hidden", "32", "--batch-tokens", "128", "--min-time", "0.01",
        "--gqa", "1", "--dtypes", "bf16"]


def opts_for(*argv: str) -> argparse.Namespace:
    return bench.parse_args(list(argv), on_cpu=ON_CPU)


def with_(opts, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(opts), **changes})


# --- FLOP math and problems ------------------------------------------------------


def test_flops_standard_count():
    s = Shape("x", 16, 1024, 1024, 16, 16, 128)
    fwd = 4 * 16 * 16 * 1024 * 1024 * 128
    assert (s.flops("fwd"), s.flops("bwd"), s.flops("fwd_bwd")) == (fwd, 2.5 * fwd, 3.5 * fwd)
    assert Shape("c", 16, 1024, 1024, 16, 16, 128, causal=True).flops("fwd") == fwd / 2
    assert harness.Problem(s).flops("fwd_bwd") == 3.5 * fwd  # the grid uses the standard count


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("layout", ["plain", "docs", "padded"])
def test_visible_pairs_match_a_brute_force_mask(causal, window, layout):
    """Every combination the masks suite could build, counted from an explicit [Tq, Tk] mask: the window applies
    within each document and each padded row (it used to be dropped there), and a window (w, 0) sees nothing to
    the right of the query even without the causal flag."""
    t = 24
    docs, lens = {"docs": ((7, 11, 6), None), "padded": (None, (24, 9, 1)), "plain": (None, None)}[layout]
    prob = harness.Problem(Shape("x", 1, t, t, 1, 1, 8, causal), window=window, doc_lens=docs, seq_lens=lens)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    base = np.ones((t, t), bool)
    if causal or window is not None:
        base &= j <= i
    if window is not None:
        base &= i - j <= window
    if docs is not None:
        doc = np.repeat(np.arange(len(docs)), docs)
        base &= doc[:, None] == doc[None, :]
    rows = [base] if lens is None else [base & (i < n) & (j < n) for n in lens]
    assert prob.visible_pairs() == sum(int(m.sum()) for m in rows) / len(rows)


def test_mask_problems_count_visible_pairs():
    probs = harness.mask_problems()
    packed = probs["packed_docs_16k"]
    assert list(probs)[-1] == "packed_docs_16k" and sum(packed.doc_lens) == 16384
    assert all(1024 <= n <= 4096 for n in packed.doc_lens)
    assert packed.visible_pairs() == sum(n * (n + 1) // 2 for n in packed.doc_lens)
    w = probs["window256_16k"]
    assert w.visible_pairs() == sum(min(i + 1, 257) for i in range(16384))
    assert w.flops("fwd_bwd") == 3.5 * 4 * 16 * 128 * w.visible_pairs()
    assert probs["causal_4k"].visible_pairs() == 4096 * 4097 // 2
    padded = probs["padded_4k"]  # causal rows of their own lengths: the mean over the batch
    assert max(padded.seq_lens) == 4096 and min(padded.seq_lens) >= 1024 and len(padded.seq_lens) == 4
    assert padded.visible_pairs() == sum(n * (n + 1) // 2 for n in padded.seq_lens) / 4
    assert padded.flops("fwd") == 4 * 4 * 16 * 128 * padded.visible_pairs()
    assert w.fields()["setup"] == "B=1, T=16384, causal, window (256, 0)"
    assert {n for n, p in probs.items() if harness.IMPLS["cudnn_packed"].applies(p)} == {"packed_docs_16k"}
    assert not any(harness.IMPLS["pallas_mha"].applies(p) for p in probs.values() if p.masked)


def test_paper_grid_keeps_tokens_and_hidden():
    grid = paper_grid(head_dims=(64, 128), seq_lens=(1024, 16384), gqa=4)
    assert len(grid) == 2 * 2 * 2
    for s in grid:
        assert s.batch * s.seq_q == 16384 and s.num_heads * s.head_dim == 2048 and s.num_heads == 4 * s.num_kv_heads


# --- CLI -----------------------------------------------------------------------------


def test_parse_seq_len():
    assert bench.parse_seq_len("4k") == 4096
    assert bench.parse_seq_len(" 512 ") == 512
    assert bench.parse_seq_len("32K") == 32768
    for bad in ("4x", "", "-1", "k"):
        with pytest.raises(ValueError):
            bench.parse_seq_len(bad)


def test_quick_defaults_and_overrides():
    o = bench.parse_args(["--quick"])
    assert o.suite == "attention" and o.head_dims == (64, 128) and o.seq_lens == (1024, 4096)
    assert o.dtypes == ("bf16",) and o.passes == ("fwd", "fwd_bwd") and o.causal == (False, True)
    assert o.impls == ("pallas_flash", "cudnn") and o.min_time == 0.2
    assert len(bench.plan(o)) == 8
    o = bench.parse_args(["--quick", "--impls", "pallas_flash,cudnn", "--only", "fwd+bwd", "--causal", "yes", "--dtypes", "fp16,bfloat16"])
    assert o.impls == ("pallas_flash", "cudnn") and o.passes == ("fwd_bwd",) and o.causal == (True,)
    assert o.dtypes == ("fp16", "bf16")


def test_issue_table_plan():
    o = bench.parse_args(["--head-dims", "64,128", "--seq-lens", "1k,4k,16k", "--dtypes", "bf16", "--impls",
                          "pallas_flash,cudnn,pallas_mha", "--only", "fwd,fwd_bwd", "--gqa", "1"])
    shapes = [p.shape for p in bench.plan(o)]
    assert len(shapes) == 12
    assert {(s.head_dim, s.seq_q, s.causal) for s in shapes} == {(d, n, c) for d in (64, 128) for n in (1024, 4096, 16384) for c in (False, True)}


def test_full_masks_and_memory_defaults():
    o = bench.parse_args([])
    assert o.head_dims == (64, 128, 256) and o.seq_lens[0] == 512 and o.seq_lens[-1] == 32768
    assert o.gqa == (1, 4) and o.dtypes == ("bf16", "fp16") and set(o.passes) == {"fwd", "bwd", "fwd_bwd"}
    assert o.impls == ("pallas_flash", "pallas_flash_mosaic", "pallas_flash_mosaic_deterministic", "pallas_flash_mosaic_fused", "tokamax_mosaic", "cudnn", "xla", "pallas_mha")
    m = bench.parse_args(["--memory"])
    assert m.memory and m.suite == "memory" and m.impls == ("pallas_flash", "xla", "cudnn")
    assert m.seq_lens[-1] == 128 * 1024 and m.memory_method == "measured"
    assert bench.parse_args(["--suite", "memory", "--memory-method", "analysis"]).memory
    k = bench.parse_args(["--suite", "masks"])
    assert k.impls == ("pallas_flash", "cudnn", "xla", "cudnn_packed") and k.passes == ("fwd", "fwd_bwd")
    assert k.time_budget == 420 and k.min_time == 0.3 and k.dtypes == ("bf16",)
    assert [p.name for p in bench.plan(k)] == list(harness.mask_problems())
    k = bench.parse_args(["--suite", "masks", "--problems", "window4k_16k,causal_16k"])
    assert [p.name for p in bench.plan(k)] == ["window4k_16k", "causal_16k"]


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
        (["--suite", "masks", "--problems", "causal_16k,nope"], "unknown value 'nope'"),
        (["--problems", "causal_16k"], "--problems goes with --suite masks"),
        (["--suite", "sparse"], "invalid choice"),
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
    for flag in ("--quick", "--suite", "--only", "--impls", "--memory", "--out", "--tag", "--gqa", "--causal", "--problems"):
        assert flag in out


@pytest.mark.skipif(not ON_CPU, reason="checks the no-GPU message")
def test_cpu_without_allow_cpu_says_a_gpu_is_needed(capsys, tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert bench.main(["--suite", "masks", "--out", str(tmp_path)]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --- common helpers and the timer ---------------------------------------------------------


def test_slug_and_device_info():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("  ") == "unknown-device"
    info = common.device_info()
    assert info["device_slug"] == common.slug(info["device"]) and info["jax_version"] == jax.__version__


def test_classify_exception():
    assert common.classify_exception(NotImplementedError("x")) == "n/a"
    assert common.classify_exception(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")) == "OOM"
    assert common.classify_exception(ValueError("head_dim 512 is not supported")) == "n/a"
    assert common.classify_exception(RuntimeError("boom")) == "ERR"
    msg = common.short_message(RuntimeError("first line\nsecond"), limit=24)
    assert msg.startswith("RuntimeError: first") and len(msg) <= 24


def test_num_input_sets():
    mb = 1024 * 1024
    assert (num_input_sets(256 * mb), num_input_sets(64 * mb), num_input_sets(1 * mb)) == (1, 2, 3)


def test_time_fn_rotates_sets_and_reports_median():
    calls = []

    def fn(x):
        calls.append(int(x[0]))
        return x + 1

    sets = [(jnp.full((4,), i),) for i in range(3)]
    t = time_fn(fn, sets, min_time=0.01, warmup=1, min_samples=5, max_samples=7)
    assert 5 <= t.samples <= 7 and t.inner >= 1 and t.input_sets == 3
    assert set(calls) == {0, 1, 2}
    assert t.min_s <= t.median_s and t.median_s > 0
    with pytest.raises(ValueError):
        time_fn(fn, [])


def test_time_fn_one_slow_call_does_not_set_the_calls_per_sample(monkeypatch):
    """One slow call among those that estimate a call's cost must not shrink ``inner``: with one call per sample
    each sample's synchronisation (20 us here) stays in the per-call time (a 50 us call read as 70 us)."""
    call_s, sync_s, now, calls = 50e-6, 20e-6, [0.0], [0]

    def fn(x, slow_call):
        calls[0] += 1
        now[0] += call_s * (100 if calls[0] == slow_call else 1)
        return x

    def block_until_ready(x):  # the host's wait for the device: a fixed cost per synchronisation
        now[0] += sync_s
        return x

    monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
    x = jnp.zeros(4)
    for slow_call in (None, 2):  # call 1 is the warm-up, call 2 the first that estimates the cost
        calls[0] = 0
        t = time_fn(lambda x: fn(x, slow_call), [(x,)], clock=lambda: now[0])
        assert t.inner > 50 and t.median_s == pytest.approx(call_s, rel=0.01), (slow_call, t)


def test_rel_err():
    ref = np.array([3.0, 4.0])
    assert rel_err(ref, ref) == 0.0
    assert math.isclose(rel_err(np.array([3.0, 4.5]), ref), 0.1)
    assert math.isclose(rel_err(jnp.array([3.0, 4.5], jnp.bfloat16), ref), 0.1)
    assert rel_err(np.array([1.0, 0.0]), np.zeros(2)) == 1.0  # ||x - 0||
    for bad in (np.nan, np.inf):
        assert rel_err(np.array([3.0, bad]), ref) == float("inf")


# --- dry runs of the harness --------------------------------------------------------------------


def test_harness_statuses_with_fake_impls(monkeypatch):
    """Wrong results are FAIL, exceptions are n/a / OOM / ERR, a correct one is ok; all recorded."""

    def raising(message):
        def f(q, k, v):
            raise RuntimeError(message)

        return lambda p: f

    def unsupported(p):
        raise NotImplementedError("no such kernel")

    wrong = lambda p: lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla") * 1.5  # noqa: E731
    fakes = dict(wrong=wrong, unsupported=unsupported, broken=raising("kernel exploded"),
                 oom=raising("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB"))
    for name, build in fakes.items():
        monkeypatch.setitem(harness.IMPLS, name, harness.Impl(name, build))
    monkeypatch.setitem(harness.IMPLS, "never", harness.Impl("never", wrong, applies=lambda p: False))
    opts = with_(opts_for(*TINY, "--causal", "yes"), impls=("xla", *fakes, "never"))
    (problem,) = bench.plan(opts)
    recs = []
    harness.bench_problem(problem, opts.impls, opts, jax.random.key(0), recs.append)
    status = {(r["impl"], r["pass"]): r["status"] for r in recs}
    assert len(recs) == 5 * 3  # no record for "never"
    for p in ("fwd", "fwd_bwd", "bwd"):
        assert [status[(i, p)] for i in ("xla", "wrong", "unsupported", "oom", "broken")] == ["ok", "FAIL", "n/a", "OOM", "ERR"]
    xla = [r for r in recs if r["impl"] == "xla"]
    assert all(r["checked"] and r["ref"] == "f32-xla" and r["err"] < 2e-2 and r["tflops"] > 0 for r in xla)
    assert set(next(r for r in xla if r["pass"] == "fwd_bwd")["errs"]) == {"out", "dq", "dk", "dv"}
    assert set(next(r for r in xla if r["pass"] == "bwd")["errs"]) == {"dq", "dk", "dv"}
    problems = report.problems_markdown(recs)
    for word in ("wrong", "unsupported", "oom", "broken", "kernel exploded"):
        assert word in problems


@pytest.mark.parametrize("where", ["inputs", "reference"])
def test_a_problem_whose_setup_fails_records_every_cell_and_the_run_goes_on(where, monkeypatch):
    """Inputs or a reference that cannot be made (out of memory) used to end the whole run with no report: now each
    applicable implementation and pass of that problem is recorded with the cause."""
    from pallas_flash.testing import chunked_reference

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB")

    target = (harness, "make_inputs") if where == "inputs" else (chunked_reference, "compute_reference")
    monkeypatch.setattr(*target, oom)
    monkeypatch.setitem(harness.IMPLS, "never", harness.Impl("never", lambda p: None, applies=lambda p: False))
    opts = with_(opts_for(*TINY, "--causal", "yes"), impls=("xla", "never"))
    (problem,) = bench.plan(opts)
    recs = []
    harness.bench_problem(problem, opts.impls, opts, jax.random.key(0), recs.append)
    assert sorted(r["pass"] for r in recs) == sorted(opts.passes) and {r["impl"] for r in recs} == {"xla"}
    assert all(r["status"] == "OOM" and r["message"].startswith(f"the {where}: ") for r in recs)


def test_memory_report_keeps_each_problem_apart(tmp_path, capsys):
    """Runs merged by ``--report-from`` may differ in dtype: each problem gets its own table, none is dropped or
    labelled with another's dtype. Runs of different devices are not merged into one report."""

    def mem(dtype, seq, gib):
        return dict(kind="memory", impl="pallas_flash", method="measured", status="ok", seq_q=seq, seq_k=seq, batch=1,
                    heads=16, kv_heads=16, head_dim=128, causal=True, dtype=dtype, gqa=1, io_bytes=2**30,
                    peak_bytes=gib * 2**30, analysis_bytes=gib * 2**30)

    recs = [mem("bf16", 1024, 1), mem("bf16", 2048, 2), mem("fp32", 1024, 3), mem("fp32", 2048, 5)]
    tables = report.memory_markdown(recs).split("Peak device memory")[1:]
    assert len(tables) == 2 and "bf16" in tables[0] and "fp32" in tables[1]
    assert [r[2] for r in _rows(tables[0])[2:]] == ["1.00", "2.00"]  # under the header and its rule
    assert [r[2] for r in _rows(tables[1])[2:]] == ["3.00", "5.00"]

    files = []
    for name, device in (("a", "NVIDIA H100 80GB HBM3"), ("b", "NVIDIA H200")):
        files.append(tmp_path / f"{name}.jsonl")
        common.append_jsonl(files[-1], dict(kind="meta", device=device, device_slug=common.slug(device)))
        common.append_jsonl(files[-1], mem("bf16", 1024, 1))
    assert bench.main(["--report-from", *map(str, files), "--no-plots"]) == 2
    assert "the files come from 2 devices" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # nothing written


def test_report_from_ratios_only_within_one_run_and_lists_duplicates(tmp_path, capsys):
    """Merged runs: pallas_flash/cudnn never divides one run's number by another's, and a cell's earlier record
    (replaced in the tables by a later run's) is listed, not dropped without a note."""
    runs = {"a": [_speed_rec("cudnn", 100.0), _speed_rec("pallas_flash", 110.0), _speed_rec("cudnn", 200.0, n=4096),
                  _speed_rec("pallas_flash", 100.0, n=4096)],
            "b": [_speed_rec("pallas_flash", 300.0)]}
    for name, recs in runs.items():
        common.append_jsonl(tmp_path / f"{name}.jsonl", dict(kind="meta", device="H100", device_slug="h100",
                                                             commit=f"{name * 4}111", impls=["pallas_flash", "cudnn"]))
        for r in recs:
            common.append_jsonl(tmp_path / f"{name}.jsonl", r)
    assert bench.main(["--report-from", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--no-plots"]) == 0
    assert "1 record(s) replaced" in capsys.readouterr().out
    text = (tmp_path / "a-merged.md").read_text()
    rows = _rows(text)
    assert ["128", "1k", "16", "16", "no", "300.0", "100.0", "runs differ"] in rows  # not 3.00×
    assert ["128", "4k", "16", "16", "no", "100.0", "200.0", "0.50×"] in rows  # both from run a
    assert "- **pallas_flash** fwd bf16 D=128 N=1k: 110.0 TFLOP/s (run `a.jsonl`); the tables show 300.0 TFLOP/s " \
           "(run `b.jsonl`)" in text
    assert "**Commit**: aaaa111, bbbb111" in text and "`b.jsonl`: commit bbbb111" in text
    # Merging the merged file again keeps each record's run: still no ratio across runs.
    assert bench.main(["--report-from", str(tmp_path / "a-merged.jsonl"), "--no-plots"]) == 0
    again = (tmp_path / "a-merged-merged.md").read_text()
    assert ["128", "1k", "16", "16", "no", "300.0", "100.0", "runs differ"] in _rows(again)
    assert "`a.jsonl`: commit aaaa111" in again and "the tables show 300.0 TFLOP/s (run `b.jsonl`)" in again


def test_report_from_keeps_each_runs_jax_version(tmp_path):
    """A merge of runs made under two JAX versions says so: the header is not the last file's version alone."""
    runs = (("a", "0.4.30", _speed_rec("cudnn", 100.0)), ("b", "0.7.0", _speed_rec("pallas_flash", 1.0)))
    for name, version, rec in runs:
        common.append_jsonl(tmp_path / f"{name}.jsonl", dict(kind="meta", device="H100", device_slug="h100",
                                                             jax_version=version, jaxlib_version=version,
                                                             commit=name * 7, impls=["pallas_flash", "cudnn"]))
        common.append_jsonl(tmp_path / f"{name}.jsonl", rec)
    assert bench.main(["--report-from", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--no-plots"]) == 0
    text = (tmp_path / "a-merged.md").read_text()
    assert "- **JAX**: jax 0.4.30, 0.7.0, jaxlib 0.4.30, 0.7.0" in text
    assert "`a.jsonl`: commit aaaaaaa, ?, ?, jax 0.4.30" in text
    assert "`b.jsonl`: commit bbbbbbb, ?, ?, jax 0.7.0" in text
    merged_meta = common.load_jsonl([tmp_path / "a-merged.jsonl"])[1][0]
    assert [r["jax_version"] for r in merged_meta["runs"]] == ["0.4.30", "0.7.0"]


def test_main_dry_run_writes_report(tmp_path, capsys):
    rc = bench.main(TINY + ["--impls", "xla,cudnn", "--gqa", "1,2", "--out", str(tmp_path / "{device}"), "--tag", "smoke"])
    assert rc == 0
    out_dir = tmp_path / common.device_info()["device_slug"]
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
    assert len(list(out_dir.glob("*-smoke-*.png"))) == 2 * 3  # (gqa) x (pass)
    stdout = capsys.readouterr().out
    assert "== TFLOP/s, forward, bf16, MHA ==" in stdout and "xla/cudnn" in stdout and "Wrote" in stdout

    # Merge the raw records back into a report without running anything.
    assert bench.main(["--report-from", str(md.with_suffix(".jsonl")), "--no-plots"]) == 0
    assert next(out_dir.glob("*-smoke-merged.md")).read_text().count("### ") == 2 * 3


@pytest.mark.skipif(not ON_CPU, reason="interpret-mode path")
def test_pallas_kernels_in_interpret_mode():
    opts = opts_for(*TINY, "--impls", "pallas_flash,pallas_mha", "--batch-tokens", "64", "--gqa", "2", "--causal", "yes")
    (problem,) = bench.plan(opts)
    recs = []
    harness.bench_problem(problem, opts.impls, opts, jax.random.key(0), recs.append)
    assert len(recs) == 2 * 3
    for r in recs:
        assert r["status"] == "ok", r
        assert r["checked"] and r["err"] < 2e-2


@pytest.mark.skipif(not ON_CPU, reason="on a GPU the masks suite itself runs (python -m benchmarks.masks)")
def test_masks_suite_smoke(tmp_path):
    """``python -m benchmarks.masks --smoke``: tiny problems run in interpret mode, are checked and make the table."""
    from benchmarks import masks

    rc = masks.main(["--smoke", "--problems", "causal,window16,packed_docs", "--impls", "pallas_flash,xla,cudnn_packed",
                     "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    md = next(tmp_path.glob("*-masks.md"))
    records = [json.loads(line) for line in md.with_suffix(".jsonl").read_text().splitlines()]
    speed = [r for r in records if r.get("kind") == "speed"]
    ours = [r for r in speed if r["impl"] == "pallas_flash"]
    assert len(ours) == 6 and all(r["status"] == "ok" and r["err"] < 2e-2 for r in ours)
    assert all(set(r["errs"]) == {"out", "dq", "dk", "dv"} for r in ours if r["pass"] == "fwd_bwd")
    assert {r["name"] for r in speed if r["impl"] == "cudnn_packed"} == {"packed_docs"}  # n/a on a CPU; no row elsewhere
    text = md.read_text()
    assert "window16 vs causal" in text and "| packed_docs" in text and "masks, forward + backward" in text


def test_memory_analysis_point():
    rec = harness.memory_point("xla", 128, "bf16", measure=False, head_dim=16, heads=2)
    assert rec["status"] == "ok", rec
    assert rec["method"] == "analysis" and rec["io_bytes"] == 8 * 128 * 2 * 16 * 2
    assert rec["analysis_bytes"] >= rec["io_bytes"]
    if ON_CPU:
        assert harness.memory_point("cudnn", 128, "bf16", measure=False)["status"] == "n/a"


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU answer of the subprocess path")
def test_memory_subprocess_plumbing():
    """The measured method runs each point in a fresh process (``common.run_worker``) and reads back its record."""
    rec = bench.memory_record(opts_for("--memory", "--allow-cpu"), "xla", 128)
    assert rec["kind"] == "memory" and rec["method"] == "measured" and rec["impl"] == "xla"
    assert rec["status"] == "n/a" and "needs a GPU" in rec["message"]
    assert rec["analysis_bytes"] >= rec["io_bytes"]
    dead = common.run_worker("benchmarks.no_such_module", {}, timeout=60)
    assert dead["ok"] is False and dead["status"] == "ERR" and "No module named" in dead["error"]


def test_memory_report_and_plot(tmp_path):
    recs = [dict(kind="memory", impl=impl, method="measured", status="ok" if (impl, n) != ("xla", 4096) else "OOM",
                 seq_q=n, seq_k=n, batch=1, heads=16, kv_heads=16, head_dim=128, causal=True, dtype="bf16", gqa=1,
                 io_bytes=8 * n * 16 * 128 * 2, peak_bytes=scale * 10 * n * 16 * 128 * 2, analysis_bytes=scale * 9 * n * 16 * 128 * 2)
            for impl, scale in (("pallas_flash", 1), ("xla", 4)) for n in (1024, 2048, 4096)]
    md = report.memory_markdown(recs, ["pallas_flash", "xla"])
    rows = _rows(md)
    assert rows[0] == ["N", "inputs+outputs", "pallas_flash peak", "pallas_flash analysis", "xla peak", "xla analysis"]
    assert rows[-1] == ["4k", "0.12", "0.16", "0.14", "OOM", "0.56"]
    paths = report.write_report(recs, {"device": "test", "impls": ["pallas_flash", "xla"], "memory_bytes": 2**34}, tmp_path / "x-memory")
    assert [p.name for p in paths] == ["x-memory.md", "x-memory.png"]
    assert "## Peak memory" in paths[0].read_text()
    assert math.isclose(report.GIB, 2**30)
