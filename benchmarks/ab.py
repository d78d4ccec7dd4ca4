"""Interleaved A/B of two or more checkouts with the attention benchmark: ``python -m benchmarks.ab``.

A kernel change that moves speed by 1-3% is inside one run's spread (NOTES 33, 35, 39), so a before/after
pair of single runs cannot resolve it. This runs ``python -m benchmarks.attention`` once per side per round,
each side in a fresh process from its own checkout, the sides alternating (the order reversed every other
round, so neither side always runs first), and reports each point's TFLOP/s per round, the median per side
and the change of each side's median against the first side's; a point no round of any side timed (a FAIL on
both sides) is listed under the table with its statuses.

Sides are directories (checkouts). ``--checkout NAME=REV`` makes one with ``git worktree add`` (locally: the
device machine has no git history), e.g. before a device call::

    python -m benchmarks.ab --checkout old=c69c4f0            # -> .ab/old, then carry ".ab"
    PYTHONPATH=. python3 -m benchmarks.ab --sides old=.ab/old,new=. --rounds 3 --out $OUT -- \\
        --head-dims 128 --seq-lens 4k,16k --causal no --dtypes bf16 --gqa 1 \\
        --impls pallas_flash_mosaic,cudnn --only fwd --ref cudnn --min-time 0.3

Everything after ``--`` goes to ``benchmarks.attention`` unchanged (each side's own copy of it, so the flags
must exist on every side); ``--out`` and ``--tag`` are set per run. A reference implementation (cuDNN) among
the impls shows how much the machine itself drifted between the sides. Writes ``ab.md`` and ``ab.jsonl``
(every timed record, with its side and round, and one ``kind: "run"`` line per run) under ``--out``; a later
invocation into the same ``--out`` writes ``ab-2.*``, ``ab-3.*``..., and tags its runs' files the same way
(``runs/<side>-<round>/<date>-ab-2.jsonl`` and ``ab-2.log``), so it reads only its own runs and keeps the
earlier ones' files. A run that exits non-zero or writes no records is reported as failed, not used.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys

import pandas as pd

from benchmarks import common

POINT = ["suite", "name", "pass", "impl", "dtype", "head_dim", "seq_q", "seq_k", "batch", "heads", "kv_heads", "causal"]


def _named(text: str, what: str, form: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must be {form}, got {text!r}")
    return name, value


def parse_sides(text: str) -> dict[str, pathlib.Path]:
    """``"old=.ab/old,new=."`` -> ``{"old": Path(".ab/old"), "new": Path(".")}``: two or more distinct names."""
    sides = dict(_named(part, "each side", "NAME=DIR") for part in text.split(","))
    if len(sides) < 2 or len(sides) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"--sides needs two or more distinct names, got {text!r}")
    return {name: pathlib.Path(d) for name, d in sides.items()}


def order(names: list[str], round_index: int) -> list[str]:
    """The sides' order in a round: as given in even rounds, reversed in odd ones."""
    return names if round_index % 2 == 0 else names[::-1]


def _round_cell(r: dict) -> str:
    """A round's TFLOP/s, or its status where it was not timed (a missing value is NaN in a frame's records)."""
    tflops = r.get("tflops")
    if tflops is not None and tflops == tflops:
        return f"{tflops:.4g}"
    status = r.get("status")
    return status if isinstance(status, str) and status else "not timed"


def _point_keys(df: pd.DataFrame) -> list[str]:
    """The ``POINT`` columns that name a point in these records (present and set somewhere)."""
    return [c for c in POINT if c in df.columns and df[c].notna().any()]


def _cell_records(records: list[dict]) -> list[dict]:
    """The records of timed (or failed) cells: an implementation and a pass, not a run's summary line."""
    return [r for r in records if r.get("impl") is not None and "pass" in r]


def summarise(records: list[dict], sides: list[str]) -> pd.DataFrame:
    """One row per point that was timed at least once: each side's TFLOP/s per round (``"a / b / c"``; a round
    whose record was not timed shows its status, ``FAIL`` say), its median over the timed rounds, and the change of
    each later side's median against the first side's, in percent."""
    timed = pd.DataFrame([r for r in records if r.get("tflops") is not None])
    if timed.empty:
        raise ValueError("no timed records to compare (did every run fail? see the runs' logs)")
    keys = _point_keys(timed)
    points = set(map(tuple, timed[keys].astype(str).itertuples(index=False)))
    df = pd.DataFrame(_cell_records(records))
    df = df[[tuple(x) in points for x in df[keys].astype(str).itertuples(index=False)]].sort_values("round")
    df = df.assign(cell=[_round_cell(r) for r in df.to_dict("records")])
    groups = df.groupby([*keys, "side"], dropna=False)
    rounds = groups.cell.agg(" / ".join).unstack("side")
    medians = groups.tflops.median().unstack("side")
    table = pd.DataFrame(index=medians.index)
    for side in sides:
        table[f"{side} (rounds)"] = rounds.get(side)
        table[f"{side} median"] = medians.get(side)
    for side in sides[1:]:
        if side in medians and sides[0] in medians:
            table[f"{side} vs {sides[0]} %"] = (medians[side] / medians[sides[0]] - 1) * 100
    return table.reset_index()


def never_timed(records: list[dict], sides: list[str]) -> list[str]:
    """A line per point that no round of any side timed (the table has no row for it), with each side's statuses
    per round: a point that fails on every side is still reported. Points that are ``n/a`` everywhere (an
    implementation without the feature) are counted, not listed."""
    rows = _cell_records(records)
    if not rows:
        return []
    df = pd.DataFrame(rows)
    keys = _point_keys(df)
    df = df.assign(cell=[_round_cell(r) for r in df.to_dict("records")], timed=df.get("tflops", pd.Series(
        dtype=float, index=df.index)).notna()).sort_values("round")
    lines, not_applicable = [], 0
    for point, group in df.groupby(keys, dropna=False, sort=True):
        if group.timed.any():
            continue
        if set(group.cell) == {"n/a"}:
            not_applicable += 1
            continue
        label = " ".join(f"{k}={v}" for k, v in zip(keys, point) if k in ("impl", "pass", "name", "dtype"))
        cells = "; ".join(f"{side}: " + " / ".join(group[group.side == side].cell) for side in sides
                          if (group.side == side).any())
        lines.append(f"- {label}: {cells}")
    if not_applicable:
        lines.append(f"- and {not_applicable} point(s) n/a on every side and round")
    return lines


def invocation_name(out: pathlib.Path) -> str:
    """``"ab"``, else ``"ab-2"``, ``"ab-3"``...: the first name that no report in ``out`` and no run's file in its
    run directories uses yet. It names this invocation's report and is each run's ``--tag``, so that each run's
    records file (``<date>-<name>.jsonl``) and log are new files, apart from every earlier invocation's."""
    files = [p.name for p in [*out.glob("*"), *out.glob("runs/*/*")]]
    k = 1
    while True:
        name = "ab" if k == 1 else f"ab-{k}"
        # name.md/.jsonl/.log, or a run's <date>-name.jsonl (-2, -3... where benchmarks.attention found it taken)
        used = re.compile(rf"({name}|.*-{name}(-\d+)?)\.\w+")
        if not any(used.fullmatch(f) for f in files):
            return name
        k += 1


def run_side(side: str, directory: pathlib.Path, round_index: int, out: pathlib.Path, bench_args: list[str],
             name: str = "ab") -> tuple[list[dict], dict]:
    """One ``benchmarks.attention`` run in ``directory`` (its own ``pallas_flash`` and harness), tagged ``name``:
    ``(records, run)``, where ``run`` says how it went (``status`` "ok" or why it failed, its files). The records
    are those of the file this run wrote, and none where it failed."""
    run_dir = out / "runs" / f"{side}-{round_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The caller's entries (tokamax's, say) made absolute: the run's working directory is the side's.
    inherited = [str(pathlib.Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(directory.resolve()), *inherited])
    cmd = [sys.executable, "-m", "benchmarks.attention", *bench_args, "--out", str(run_dir.resolve()), "--tag", name,
           "--no-plots"]
    log_path = run_dir / f"{name}.log"
    with open(log_path, "x") as log:  # "x": never over an earlier run's log
        rc = subprocess.run(cmd, check=False, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    files = sorted(run_dir.glob(f"*-{name}.jsonl"))  # <date>-<name>.jsonl: the name is new, so this run's alone
    run = dict(kind="run", side=side, round=round_index, exit=rc, log=str(log_path), records=[str(f) for f in files])
    if rc != 0 or len(files) != 1:
        why = f"exit {rc}" if rc != 0 else f"{len(files)} records files named *-{name}.jsonl, expected 1"
        print(f"  {side} round {round_index + 1}: failed ({why}), see {log_path}", flush=True)
        return [], dict(run, status=f"failed: {why}")
    records, _ = common.load_jsonl(files)
    return [{**r, "side": side, "round": round_index} for r in records], dict(run, status="ok")


def checkout(name: str, rev: str, root: pathlib.Path) -> pathlib.Path:
    """``root/name``: a detached git worktree at ``rev`` (replacing one of that name)."""
    path = root / name
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=True)
    subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), rev], check=True)
    return path


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0],
                                formatter_class=common.DefaultsHelpFormatter)
    p.add_argument("--sides", type=parse_sides, help="NAME=DIR,NAME=DIR[,...]: the checkouts, the first the baseline")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved")
    p.add_argument("--out", type=pathlib.Path,
                   help="directory for ab.md and ab.jsonl (ab-2.*, ab-3.*... when taken) and each run's files")
    p.add_argument("--checkout", type=lambda t: _named(t, "--checkout", "NAME=REV"), action="append", default=[],
                   help="NAME=REV: make the side .ab/NAME, a git worktree at REV, and exit (repeatable)")
    args = p.parse_args(argv)
    if not args.checkout:
        if args.sides is None or args.out is None:
            p.error("--sides and --out are required (or --checkout to prepare sides)")
        if args.rounds < 1:
            p.error(f"--rounds must be at least 1, got {args.rounds}")
        missing = [f"{n}={d}" for n, d in args.sides.items() if not (d / "pallas_flash").is_dir()]
        if missing:
            p.error(f"--sides: no pallas_flash checkout at {', '.join(missing)}")
    return args, bench_args


def main(argv: list[str] | None = None) -> int:
    args, bench_args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.checkout:
        for name, rev in args.checkout:
            print(f"{name}: {checkout(name, rev, pathlib.Path('.ab'))}")
        return 0
    names = list(args.sides)
    args.out.mkdir(parents=True, exist_ok=True)
    name = invocation_name(args.out)
    jsonl = args.out / f"{name}.jsonl"
    common.append_jsonl(jsonl, dict(kind="meta", name=name, sides={n: str(d) for n, d in args.sides.items()},
                                    rounds=args.rounds, bench_args=bench_args))
    records, failed = [], []
    for r in range(args.rounds):
        for side in order(names, r):
            print(f"round {r + 1}/{args.rounds}: {side} ({args.sides[side]})", flush=True)
            new, run = run_side(side, args.sides[side], r, args.out, bench_args, name)
            for rec in [*new, run]:
                common.append_jsonl(jsonl, rec)
            records += new
            if run["status"] != "ok":
                failed.append(f"- `{side}` round {r + 1}: {run['status']}, see `{run['log']}`")
    text = (f"# Interleaved A/B ({args.rounds} rounds)\n\n- **Sides**: "
            + ", ".join(f"`{n}` = `{d}`" for n, d in args.sides.items())
            + f"\n- **Benchmark args**: `{' '.join(bench_args)}`\n\n"
            + ("**Failed runs** (left out of the table):\n\n" + "\n".join(failed) + "\n\n" if failed else ""))
    try:
        table = summarise(records, names)
        text += "TFLOP/s per round (in run order) and median\n\n" + table.to_markdown(index=False, floatfmt=".4g")
        text += "\n"
    except ValueError as e:  # every run failed: the report says so
        text += f"No table: {e}\n"
    untimed = never_timed(records, names)
    if untimed:
        text += "\n**Never timed** (no row above):\n\n" + "\n".join(untimed) + "\n"
    (args.out / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / f'{name}.md'}, {jsonl}")
    return 1 if len(failed) == args.rounds * len(names) else 0


if __name__ == "__main__":
    raise SystemExit(main())
