"""Interleaved A/B of two or more checkouts with the attention benchmark: ``python -m benchmarks.ab``.

A kernel change that moves speed by 1-3% is inside one run's spread (NOTES 33, 35, 39), so a before/after
pair of single runs cannot resolve it. This runs ``python -m benchmarks.attention`` once per side per round,
each side in a fresh process from its own checkout, the sides alternating (the order reversed every other
round, so neither side always runs first), and reports each point's TFLOP/s per round, the median per side
and the change of each side's median against the first side's.

Sides are directories (checkouts). ``--checkout NAME=REV`` makes one with ``git worktree add`` (locally: the
device machine has no git history), e.g. before a device call::

    python -m benchmarks.ab --checkout old=c69c4f0            # -> .ab/old, then carry ".ab"
    PYTHONPATH=. python3 -m benchmarks.ab --sides old=.ab/old,new=. --rounds 3 --out $OUT -- \\
        --head-dims 128 --seq-lens 4k,16k --causal no --dtypes bf16 --gqa 1 \\
        --impls pallas_flash_mosaic,cudnn --only fwd --ref cudnn --min-time 0.3

Everything after ``--`` goes to ``benchmarks.attention`` unchanged (each side's own copy of it, so the flags
must exist on every side); ``--out`` and ``--tag`` are set per run. A reference implementation (cuDNN) among
the impls shows how much the machine itself drifted between the sides. Writes ``ab.md`` and ``ab.jsonl``
(every timed record, with its side and round) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
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


def summarise(records: list[dict], sides: list[str]) -> pd.DataFrame:
    """One row per point: each side's TFLOP/s per round (``"a / b / c"``), its median, and the change of each
    later side's median against the first side's, in percent."""
    df = pd.DataFrame([r for r in records if r.get("tflops") is not None])
    if df.empty:
        raise ValueError("no timed records to compare (did every run fail? see the runs' logs)")
    keys = [c for c in POINT if c in df.columns and df[c].notna().any()]
    df = df.sort_values("round")
    runs = df.groupby([*keys, "side"], dropna=False).tflops
    rounds = runs.agg(lambda x: " / ".join(f"{v:.4g}" for v in x)).unstack("side")
    medians = runs.median().unstack("side")
    table = pd.DataFrame(index=medians.index)
    for side in sides:
        table[f"{side} (rounds)"] = rounds.get(side)
        table[f"{side} median"] = medians.get(side)
    for side in sides[1:]:
        if side in medians and sides[0] in medians:
            table[f"{side} vs {sides[0]} %"] = (medians[side] / medians[sides[0]] - 1) * 100
    return table.reset_index()


def run_side(side: str, directory: pathlib.Path, round_index: int, out: pathlib.Path, bench_args: list[str]) -> list[dict]:
    """One ``benchmarks.attention`` run in ``directory`` (its own ``pallas_flash`` and harness); its records."""
    run_dir = out / "runs" / f"{side}-{round_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The caller's entries (tokamax's, say) made absolute: the run's working directory is the side's.
    inherited = [str(pathlib.Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(directory.resolve()), *inherited])
    cmd = [sys.executable, "-m", "benchmarks.attention", *bench_args, "--out", str(run_dir.resolve()), "--tag", "ab",
           "--no-plots"]
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, check=False, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"  {side} round {round_index}: exit {rc}, see {run_dir / 'log.txt'}", flush=True)
    records, _ = common.load_jsonl(sorted(run_dir.glob("*.jsonl")))
    return [{**r, "side": side, "round": round_index} for r in records]


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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sides", type=parse_sides, help="NAME=DIR,NAME=DIR[,...]: the checkouts, the first the baseline")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved")
    p.add_argument("--out", type=pathlib.Path, help="directory for ab.md, ab.jsonl and each run's files")
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
    records = []
    for r in range(args.rounds):
        for side in order(names, r):
            print(f"round {r + 1}/{args.rounds}: {side} ({args.sides[side]})", flush=True)
            new = run_side(side, args.sides[side], r, args.out, bench_args)
            for rec in new:
                common.append_jsonl(args.out / "ab.jsonl", rec)
            records += new
    table = summarise(records, names)
    text = (f"# Interleaved A/B ({args.rounds} rounds)\n\n- **Sides**: "
            + ", ".join(f"`{n}` = `{d}`" for n, d in args.sides.items())
            + f"\n- **Benchmark args**: `{' '.join(bench_args)}`\n\nTFLOP/s per round (in run order) and median\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")
    (args.out / "ab.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
