"""CPU tests of the benchmarks' report formatting (``benchmarks.report``, the tables' cells and ratios) and of the
result files' names and commit stamps (``benchmarks.common``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, harness, report


def _rows(md: str) -> list[list[str]]:
    """The cells of each line of a markdown table."""
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]


def test_cells():
    ok = dict(status="ok", tflops=312.44, time_s=0.0123, checked=True, err=3e-3)
    assert report.speed_cell(ok) == "312.4"
    assert report.speed_cell(dict(ok, checked=False)) == "312.4*"
    assert report.speed_cell(dict(ok, tflops=1.234)) == "1.23"
    assert report.speed_cell(dict(ok, timing=dict(iqr_rel=0.05))) == "312.4"
    assert report.speed_cell(dict(ok, checked=False, timing=dict(iqr_rel=0.49))) == "312.4*~"
    assert report.speed_cell(dict(status="OOM")) == "OOM"
    assert report.time_cell(ok) == "12.3"
    assert report.err_cell(ok) == "3.0e-03"
    assert report.err_cell(dict(status="FAIL", err=0.5)) == "FAIL 5.0e-01"
    assert report.err_cell(dict(status="FAIL", err=float("inf"))) == "FAIL inf"
    assert report.err_cell(dict(status="n/a")) == "n/a"
    assert report.err_cell(dict(ok, err=None, message="f32 ref too large; cudnn ref OOM")) == "unchecked: ref too large"
    assert report.err_cell(dict(ok, ref="cudnn")) == "3.0e-03 (vs cudnn)"
    assert report.seq_label(512) == "512" and report.seq_label(16384) == "16k"


def _speed_rec(impl, tflops, n=1024, causal=False, status="ok", pass_="fwd", **kw):
    return {**dict(kind="speed", impl=impl, status=status, tflops=tflops, time_s=1e-3, checked=True, err=1e-3, tol=2e-2,
                   dtype="bf16", gqa=1, batch=16, seq_q=n, seq_k=n, heads=16, kv_heads=16, head_dim=128, causal=causal,
                   **{"pass": pass_}), **kw}


def test_speed_markdown_has_ratio_column_and_problems():
    recs = [_speed_rec("pallas_flash", 300.0), _speed_rec("cudnn", 400.0),
            _speed_rec("pallas_flash", 0, n=4096, status="FAIL", err=0.3), _speed_rec("cudnn", 410.0, n=4096)]
    md = report.speed_markdown(recs, ["pallas_flash", "cudnn"])
    rows = _rows(md)
    assert rows[0] == ["D", "N", "B", "heads", "causal", "pallas_flash", "cudnn", "pallas_flash/cudnn"]
    assert ["128", "1k", "16", "16", "no", "300.0", "400.0", "0.75×"] in rows
    assert ["128", "4k", "16", "16", "no", "FAIL", "410.0", "—"] in rows
    assert ["128", "4k", "16", "16", "no", "FAIL 3.0e-01", "1.0e-03"] in rows  # the error table
    problems = report.problems_markdown(recs)
    assert "pallas_flash" in problems and "FAIL" in problems and "3.00e-01" in problems
    assert "every configuration" in report.problems_markdown(recs[:2])
    text = report.summary_text(recs, ["pallas_flash", "cudnn"])
    assert "TFLOP/s, forward, bf16, MHA" in text and "0.75×" in text and "1 FAIL" in text
    assert len(report.summary_text(recs * 200, max_chars=2000)) < 2100


def test_masks_markdown_rows_by_problem():
    kw = dict(suite="masks", setup="B=1, T=16384, causal, window (256, 0)", visible=0.0157, name="window256_16k")
    recs = [_speed_rec("pallas_flash", 143.0, pass_="fwd_bwd", **kw), _speed_rec("cudnn", 140.0, pass_="fwd_bwd", **kw),
            _speed_rec("pallas_flash", 401.0, pass_="fwd_bwd", **dict(kw, name="causal_16k", setup="B=1", visible=0.5))]
    recs[0]["time_s"], recs[2]["time_s"] = 0.84e-3, 9.61e-3
    rows = _rows(report.speed_markdown(recs))
    assert rows[0][:3] == ["problem", "setup", "visible"]
    assert ["window256_16k", kw["setup"], "1.57%", "143.0", "140.0", "1.02×"] in rows
    assert ["causal_16k", "B=1", "50.00%", "401.0", "—", "—"] in rows
    lines = report.window_speedups(recs, harness.WINDOW_SPEEDUPS)
    assert lines == ["pallas_flash forward+backward, window256_16k vs causal_16k: 0.84 ms vs 9.61 ms = **11.4x faster** "
                     "(target >= 8x)"]


def test_window_speedups_only_within_one_run_and_one_dtype():
    """The window speed-up divides two times of one run and one dtype: never run a's window by run b's causal time
    (a merge), nor bf16's by fp16's (one run of two dtypes, where the later dtype silently replaced the first)."""
    def rec(name, t, run=None, dtype="bf16"):
        r = _speed_rec("pallas_flash", 1.0, pass_="fwd_bwd", suite="masks", name=name, time_s=t, dtype=dtype)
        return r if run is None else dict(r, run=run)

    pairs = (("window256_16k", "causal_16k"),)
    merged = [rec("window256_16k", 1e-3, "a"), rec("causal_16k", 10e-3, "a"), rec("causal_16k", 20e-3, "b")]
    assert report.window_speedups(merged, pairs) == [
        "pallas_flash forward+backward (run `a`), window256_16k vs causal_16k: 1.00 ms vs 10.00 ms = "
        "**10.0x faster** (target >= 8x)"]
    two_dtypes = [rec("window256_16k", 1e-3), rec("causal_16k", 10e-3), rec("window256_16k", 2e-3, dtype="fp16"),
                  rec("causal_16k", 30e-3, dtype="fp16")]
    lines = report.window_speedups(two_dtypes, pairs)
    assert len(lines) == 2 and "(bf16)" in lines[0] and "**10.0x faster**" in lines[0]
    assert "(fp16)" in lines[1] and "**15.0x faster**" in lines[1]


def test_unique_stem_and_jsonl(tmp_path):
    assert common.unique_stem(tmp_path, "2026-01-01").name == "2026-01-01"
    (tmp_path / "2026-01-01.md").write_text("x")
    assert common.unique_stem(tmp_path, "2026-01-01").name == "2026-01-01-2"
    common.append_jsonl(tmp_path / "a.jsonl", {"kind": "meta", "x": jnp.dtype("bfloat16")})
    common.append_jsonl(tmp_path / "a.jsonl", {"kind": "speed", "y": np.float32(2.0)})
    want = ([{"kind": "speed", "y": 2.0}], [{"kind": "meta", "x": "bfloat16"}])
    assert common.load_jsonl([tmp_path / "a.jsonl"]) == want


def test_git_commit_marks_code_changes_only(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    monkeypatch.delenv("PALLAS_FLASH_COMMIT", raising=False)
    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)
    git("init", "-q")
    (tmp_path / "pallas_flash").mkdir()
    (tmp_path / "pallas_flash" / "op.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    clean = common.git_commit(tmp_path)
    assert clean and "uncommitted" not in clean
    (tmp_path / "driver.sh").write_text("echo\n")  # a script at the root: not the code measured
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "run.md").write_text("x")
    assert common.git_commit(tmp_path) == clean
    (tmp_path / "pallas_flash" / "new.py").write_text("y = 2\n")  # new code
    assert common.git_commit(tmp_path) == clean + " (with uncommitted changes)"
    (tmp_path / "pallas_flash" / "new.py").unlink()
    (tmp_path / "pallas_flash" / "op.py").write_text("x = 2\n")  # an edit to tracked code
    assert common.git_commit(tmp_path) == clean + " (with uncommitted changes)"
