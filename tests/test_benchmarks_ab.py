"""benchmarks/ab.py: the interleaved A/B of checkouts (its plumbing on the CPU; the timing is the harness's)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess

import pytest

from benchmarks import ab

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_order_alternates_so_no_side_always_runs_first():
    assert ab.order(["old", "new"], 0) == ["old", "new"]
    assert ab.order(["old", "new"], 1) == ["new", "old"]
    assert ab.order(["a", "b", "c"], 3) == ["c", "b", "a"]


def test_parse_sides():
    assert ab.parse_sides("old=.ab/old,new=.") == {"old": pathlib.Path(".ab/old"), "new": pathlib.Path(".")}
    for bad in ["old=.ab/old", "old=a,old=b", "old,new=.", "=a,new=."]:
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_sides(bad)


def _rec(side, rnd, tflops, impl="mosaic", seq=4096):
    return dict(suite="attention", name=f"n{seq}", impl=impl, dtype="bf16", head_dim=128, seq_q=seq, seq_k=seq,
                batch=1, heads=16, kv_heads=16, causal=False, side=side, round=rnd, tflops=tflops, **{"pass": "fwd"})


def test_summarise_medians_rounds_and_change():
    records = [_rec("old", 0, 100.0), _rec("new", 0, 90.0), _rec("new", 1, 110.0), _rec("old", 1, 104.0),
               _rec("old", 2, 102.0), _rec("new", 2, 99.0), _rec("old", 0, None, impl="cudnn")]
    table = ab.summarise(records, ["old", "new"])
    assert len(table) == 1  # the untimed cudnn record (a FAIL, say) is left out
    row = table.iloc[0]
    assert row["old (rounds)"] == "100 / 104 / 102" and row["new (rounds)"] == "90 / 110 / 99"
    assert row["old median"] == 102.0 and row["new median"] == 99.0
    assert row["new vs old %"] == pytest.approx((99 / 102 - 1) * 100)


def test_summarise_without_timed_records_says_so():
    with pytest.raises(ValueError, match="no timed records"):
        ab.summarise([_rec("old", 0, None)], ["old", "new"])


@pytest.mark.parametrize("argv, fragment", [
    (["--sides", "a=.,b=."], "--sides and --out are required"),
    (["--sides", "a=.", "--out", "x"], "two or more distinct names"),
    (["--sides", "a=.,b=/nonexistent", "--out", "x"], "no pallas_flash checkout at b=/nonexistent"),
    (["--sides", "a=.,b=.", "--out", "x", "--rounds", "0"], "--rounds must be at least 1"),
    (["--sides", "a=.,b", "--out", "x"], "each side must be NAME=DIR, got 'b'"),
    (["--checkout", "old"], "--checkout must be NAME=REV, got 'old'"),
])
def test_bad_cli_input_is_a_clear_error(argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        ab.parse_args(argv)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_two_rounds_of_two_sides_on_the_cpu(tmp_path, monkeypatch):
    """The same checkout as both sides, the XLA implementation at a tiny shape: four runs, interleaved."""
    monkeypatch.chdir(ROOT)
    bench = ["--allow-cpu", "--seq-lens", "64", "--head-dims", "16", "--hidden", "32", "--batch-tokens", "128",
             "--min-time", "0.01", "--gqa", "1", "--dtypes", "bf16", "--impls", "xla", "--only", "fwd", "--causal", "no"]
    assert ab.main(["--sides", "a=.,b=.", "--rounds", "2", "--out", str(tmp_path), "--", *bench]) == 0
    lines = [json.loads(x) for x in (tmp_path / "ab.jsonl").read_text().splitlines()]
    timed = [r for r in lines if r.get("tflops")]
    assert [(r["round"], r["side"]) for r in timed] == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    assert all(r["impl"] == "xla" and r["pass"] == "fwd" and r["tflops"] > 0 for r in timed)
    report = (tmp_path / "ab.md").read_text()
    assert "a median" in report and "b vs a %" in report and "--impls xla" in report


def test_checkout_makes_and_replaces_a_worktree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    for text in ("one", "two"):
        (tmp_path / "f.txt").write_text(text)
        subprocess.run(["git", "add", "f.txt"], check=True)
        subprocess.run([*git, "commit", "-qm", text], check=True)
    assert ab.main(["--checkout", "old=HEAD~1"]) == 0
    assert (tmp_path / ".ab" / "old" / "f.txt").read_text() == "one"
    assert ab.main(["--checkout", "old=HEAD"]) == 0  # replaced, not refused
    assert (tmp_path / ".ab" / "old" / "f.txt").read_text() == "two"


def test_run_side_puts_the_side_first_and_keeps_the_callers_paths_absolute(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, *, check, cwd, env, stdout, stderr):
        seen.update(cmd=cmd, cwd=cwd, path=env["PYTHONPATH"].split(os.pathsep))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([".", "site", ""]))
    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    side = tmp_path / "old"
    assert ab.run_side("old", pathlib.Path("old"), 0, tmp_path / "out", ["--quick"]) == []
    assert seen["path"] == [str(side), str(tmp_path), str(tmp_path / "site")]
    assert seen["cwd"] == pathlib.Path("old") and seen["cmd"][-6:] == ["--quick", "--out",
                                                                       str(tmp_path / "out" / "runs" / "old-0"),
                                                                       "--tag", "ab", "--no-plots"]
