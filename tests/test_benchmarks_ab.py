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
    records, run = ab.run_side("old", pathlib.Path("old"), 0, tmp_path / "out", ["--quick"], "ab-2")
    assert records == [] and run["status"].startswith("failed: 0 records files")  # it wrote none
    assert seen["path"] == [str(side), str(tmp_path), str(tmp_path / "site")]
    assert seen["cwd"] == pathlib.Path("old") and seen["cmd"][-6:] == ["--quick", "--out",
                                                                       str(tmp_path / "out" / "runs" / "old-0"),
                                                                       "--tag", "ab-2", "--no-plots"]


def _fake_attention(tflops: dict, exits: dict | None = None):
    """A stand-in for ``benchmarks.attention``'s process: one record at ``tflops[side]`` in
    ``--out/<date>-<--tag>.jsonl``, as the real one names it; the exit status ``exits.get(side, 0)``."""

    def fake_run(cmd, *, check, cwd, env, stdout, stderr):
        out, tag = pathlib.Path(cmd[cmd.index("--out") + 1]), cmd[cmd.index("--tag") + 1]
        side = out.name.split("-")[0]
        stem = ab.common.unique_stem(out, f"2026-01-01-{tag}")
        ab.common.append_jsonl(stem.with_suffix(".jsonl"), dict(kind="meta"))
        ab.common.append_jsonl(stem.with_suffix(".jsonl"), _rec(None, None, tflops[side]))
        stdout.write(f"{side} {tag}\n")
        return subprocess.CompletedProcess(cmd, (exits or {}).get(side, 0))

    return fake_run


def _sides(tmp_path):
    for s in ("a", "b"):
        (tmp_path / s / "pallas_flash").mkdir(parents=True)
    return ["--sides", f"a={tmp_path / 'a'},b={tmp_path / 'b'}", "--rounds", "1", "--out", str(tmp_path / "out")]


def test_a_second_ab_into_the_same_out_reads_only_its_own_runs(tmp_path, monkeypatch):
    """The first invocation's run files are not this one's records; its report, records and logs stay as they were."""
    argv, out = _sides(tmp_path), tmp_path / "out"
    monkeypatch.setattr(ab.subprocess, "run", _fake_attention(dict(a=100.0, b=100.0)))
    assert ab.main(argv) == 0
    first = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(ab.subprocess, "run", _fake_attention(dict(a=100.0, b=200.0)))  # side b changed: +100 %
    assert ab.main(argv) == 0
    assert {p: p.read_text() for p in first} == first
    row = [ln.split("|") for ln in (out / "ab-2.md").read_text().splitlines() if "| mosaic" in ln][0]
    assert [c.strip() for c in row[-6:-1]] == ["100", "100", "200", "200", "100"]  # a, a median, b, b median, b vs a %
    assert sorted(p.name for p in (out / "runs" / "b-0").iterdir()) == [
        "2026-01-01-ab-2.jsonl", "2026-01-01-ab.jsonl", "ab-2.log", "ab.log"]
    assert (out / "runs" / "b-0" / "ab.log").read_text() == "b ab\n"
    lines = [json.loads(x) for x in (out / "ab-2.jsonl").read_text().splitlines()]
    assert [r["tflops"] for r in lines if r.get("tflops")] == [100.0, 200.0]


def test_a_failed_run_is_reported_failed_not_filled_from_other_files(tmp_path, monkeypatch):
    argv, out = _sides(tmp_path), tmp_path / "out"
    monkeypatch.setattr(ab.subprocess, "run", _fake_attention(dict(a=100.0, b=100.0)))
    assert ab.main(argv) == 0
    # Side b crashes this time (after writing a record): its round is failed, neither its record nor the earlier
    # invocation's stands in for it.
    monkeypatch.setattr(ab.subprocess, "run", _fake_attention(dict(a=100.0, b=200.0), exits=dict(b=1)))
    assert ab.main(argv) == 0
    report = (out / "ab-2.md").read_text()
    assert "**Failed runs**" in report and "`b` round 1: failed: exit 1" in report
    row = [ln.split("|") for ln in report.splitlines() if "| mosaic" in ln][0]
    assert [c.strip() for c in row[-5:-1]] == ["100", "100", "", ""]  # a, a median, b, b median: b has no rounds
    runs = [json.loads(x) for x in (out / "ab-2.jsonl").read_text().splitlines() if '"run"' in x]
    assert [(r["side"], r["status"]) for r in runs] == [("a", "ok"), ("b", "failed: exit 1")]
    # Every run failing: the report says so (no traceback), and the exit status is 1.
    monkeypatch.setattr(ab.subprocess, "run", _fake_attention(dict(a=1.0, b=1.0), exits=dict(a=2, b=2)))
    assert ab.main(argv) == 1
    assert "No table: no timed records" in (out / "ab-3.md").read_text()


def test_invocation_name_skips_every_name_in_use(tmp_path):
    assert ab.invocation_name(tmp_path) == "ab"
    (tmp_path / "table.md").write_text("")  # an unrelated file is no reason to move on
    assert ab.invocation_name(tmp_path) == "ab"
    (tmp_path / "runs" / "a-0").mkdir(parents=True)
    (tmp_path / "runs" / "a-0" / "2026-01-01-ab-2.jsonl").write_text("")  # from before: tag ab, name taken
    (tmp_path / "runs" / "a-0" / "2026-01-01-ab.jsonl").write_text("")
    assert ab.invocation_name(tmp_path) == "ab-3"


def test_points_never_timed_are_listed_with_their_statuses():
    """A point that fails on every side in every round has no row in the table: the report lists it."""
    records = [_rec("old", 0, 100.0), _rec("new", 0, 90.0),
               dict(_rec("old", 0, None, seq=8192), status="FAIL"), dict(_rec("new", 0, None, seq=8192), status="OOM"),
               dict(_rec("old", 0, None, impl="cudnn"), status="n/a"),
               dict(_rec("new", 0, None, impl="cudnn"), status="n/a")]
    lines = ab.never_timed(records, ["old", "new"])
    assert lines == ["- name=n8192 pass=fwd impl=mosaic dtype=bf16: old: FAIL; new: OOM",
                     "- and 1 point(s) n/a on every side and round"]
    assert ab.never_timed(records[:2], ["old", "new"]) == []


def test_summarise_shows_a_round_that_was_not_timed():
    """A side's FAIL in one round is in its rounds (not a silent two-round median that reads as a speed-up)."""
    records = [_rec("old", 0, 100.0), dict(_rec("new", 0, None), status="FAIL"), _rec("new", 1, 110.0),
               _rec("old", 1, 104.0), _rec("old", 2, 102.0), _rec("new", 2, 99.0)]
    row = ab.summarise(records, ["old", "new"]).iloc[0]
    assert row["new (rounds)"] == "FAIL / 110 / 99" and row["old (rounds)"] == "100 / 104 / 102"
    assert row["new median"] == 104.5  # the median of the timed rounds
