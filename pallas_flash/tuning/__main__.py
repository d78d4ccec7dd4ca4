"""Tune a kernel backend's configs on this machine's GPU: ``python -m pallas_flash.tuning``.

``--backend triton`` (the default) tunes the Triton kernels' blocks, warps and
stages (``backends/triton/tune.py``); ``--backend mosaic`` the Mosaic GPU
kernels' key blocks and pipeline depths (``backends/mosaic_gpu/tune.py``).

Tuning never happens implicitly (not at import, not inside a user's ``jit``).
This command times each candidate of the backend's space for every (head dim,
dtype, causal, sequence-length bucket) with ``pallas_flash.tuning.timer`` and
stores the fastest in the backend's user cache, which its ``default_config``
reads first (before the shipped table, where the backend has one).
``--print-json`` prints the result in the shipped table's format instead;
``--out FILE`` writes it there after each problem, keeping the entries the
file already holds and skipping their problems (how
``backends/<name>/tables/*.json`` are made, over as many runs as it takes);
with ``--retune`` it tunes those problems again and replaces their entries.
``--records FILE`` appends every time the search took, one JSON line per
problem. Each entry is merged into the file as it stands, under a lock
(``<file>.lock``), so two runs writing one cache or table keep each other's.
The Mosaic search confirms its shortlist in interleaved rounds (``--top``,
``--rounds``, ``--margin``) and compiles on ``--threads`` threads
(``pallas_flash.tuning.search``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu import tune as mosaic_tune
from pallas_flash.backends.triton import config as triton_config
from pallas_flash.backends.triton import tune as triton_tune
from pallas_flash.tuning.search import Search

# Per backend: (its tuning module with Problem and tune_problem, its config module with config_key,
# user_cache_path and gpu_name).
TUNERS = {"triton": (triton_tune, triton_config), "mosaic": (mosaic_tune, mosaic_config)}


# The dtypes each backend's kernels take (the Mosaic kernels: 16-bit only).
DTYPES = {"triton": ("bfloat16", "float16", "float32"), "mosaic": ("bfloat16", "float16")}


def _positive_ints(ap, flag: str, text: str, allowed=None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        ap.error(f"{flag} takes comma-separated integers, got {text!r}")
    if any(v <= 0 for v in values):
        ap.error(f"{flag} takes positive integers, got {text!r}")
    if allowed is not None and any(v not in allowed for v in values):
        ap.error(f"{flag}: this backend's kernels take head dims {allowed}, got {text!r}")
    return values


def _dtypes(ap, text: str, backend: str) -> list[str]:
    names = []
    for x in text.split(","):
        try:
            names.append(jnp.dtype(x).name)
        except TypeError:
            ap.error(f"--dtypes: {x!r} is not a dtype (use bfloat16, float16 or float32)")
    if any(n not in DTYPES[backend] for n in names):
        ap.error(f"--dtypes: the {backend} kernels take {', '.join(DTYPES[backend])}, got {text!r}")
    return names


def _read_json(ap, path: pathlib.Path, what: str, gpu: str | None = None) -> dict:
    """``path``'s table (``triton_config.read_table_file``; ``{}`` when there is none), read before any tuning: a
    broken file stops the run before it has anything to lose."""
    try:
        return triton_config.read_table_file(path, gpu)
    except ValueError as e:
        ap.error(f"{what} {e}; fix or delete it, then run again")


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """Hold an exclusive lock on ``path``'s lock file (``<name>.lock`` beside it): two tuning runs writing one file
    (two GPUs of a host, two shells) take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_entry(path: pathlib.Path, key: str, entry: dict, gpu: str | None = None) -> dict:
    """Add ``entry`` at ``key`` (in ``gpu``'s section for the user cache) to the JSON table at ``path``, and return
    the table written. Under the lock the file is read again, so entries another run wrote since this one started
    are kept; it is written to a temporary file of this process and moved into place, never half-written. A file
    made unreadable meanwhile raises ``ValueError`` with the entry in the message, so that it is not lost."""
    with _locked(path):
        try:
            data = triton_config.read_table_file(path, gpu)
        except ValueError as e:
            raise ValueError(f"{e}, since this run started; this problem's entry, to add by hand: "
                             f"{json.dumps({key: entry})}") from None
        (data.setdefault(gpu, {}) if gpu else data)[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pallas_flash.tuning", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=sorted(TUNERS), default="triton", help="which backend's configs to tune")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--seq-lens", default="1024,4096,16384", help="comma-separated sequence lengths, one bucket each")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes (bfloat16, float16)")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seq per problem (default 16384)")
    ap.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default 2048)")
    ap.add_argument("--deterministic-bwd", action="store_true",
                    help="mosaic: keep the backward search to the deterministic mode (bit-identical reruns); by "
                         "default it includes the fused-dQ mode unless XLA_FLAGS sets --xla_gpu_deterministic_ops")
    ap.add_argument("--print-json", action="store_true", help="print the table instead of writing the user cache")
    ap.add_argument("--out", type=pathlib.Path, help="write the table to this file after each problem (resuming: "
                    "problems whose key it holds are skipped) instead of the user cache")
    ap.add_argument("--retune", action="store_true", help="with --out: tune the problems whose key the file holds "
                    "as well, replacing their entries (a shipped table checked again on new kernels or a new GPU)")
    ap.add_argument("--records", type=pathlib.Path, help="append every time taken, a JSON line per problem")
    defaults = Search()
    ap.add_argument("--top", type=int, default=defaults.top, help="mosaic: candidates confirmed after the screen")
    ap.add_argument("--rounds", type=int, default=defaults.rounds, help="mosaic: interleaved confirming rounds")
    ap.add_argument("--margin", type=float, default=defaults.margin,
                    help="mosaic: how much faster than the heuristic's pick a candidate must be to replace it")
    ap.add_argument("--threads", type=int, default=defaults.threads, help="mosaic: threads compiling candidates")
    args = ap.parse_args(argv)
    search_args = {name: getattr(args, name) for name in ("top", "rounds", "margin", "threads")}
    if args.backend != "mosaic" and any(v != getattr(defaults, k) for k, v in search_args.items()):
        ap.error("--top, --rounds, --margin and --threads apply to --backend mosaic only")
    if args.out is not None and args.print_json:
        ap.error("--out and --print-json: give one (--out writes the table to a file, --print-json prints it)")
    if args.retune and args.out is None:
        ap.error("--retune applies to --out (the user cache is always written over)")
    if args.deterministic_bwd and args.backend != "mosaic":
        ap.error("--deterministic-bwd applies to --backend mosaic only")
    for name in ("top", "rounds", "threads"):  # checked here too, so that the error names the flag, not Search's field
        if search_args[name] < 1:
            ap.error(f"--{name} takes an integer >= 1, got {search_args[name]}")
    if not 0.0 <= args.margin < 1.0:
        ap.error(f"--margin takes a fraction in [0, 1) (0.01: 1% faster), got {args.margin}")
    search = Search(**search_args)
    if args.tokens <= 0 or args.hidden <= 0:
        ap.error(f"--tokens and --hidden take positive integers, got {args.tokens} and {args.hidden}")
    tune, config = TUNERS[args.backend]
    head_dims = _positive_ints(ap, "--head-dims", args.head_dims,
                               mosaic_config.HEAD_DIMS if args.backend == "mosaic" else None)
    seq_lens = _positive_ints(ap, "--seq-lens", args.seq_lens)
    dtypes = _dtypes(ap, args.dtypes, args.backend)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    problems = list(itertools.product(head_dims, dtypes, causals, seq_lens))
    keys = [config.config_key(*problem) for problem in problems]
    if len(set(keys)) != len(keys):  # two problems with one key: the second would overwrite the first's entry
        shared = sorted({key for key in keys if keys.count(key) > 1})
        ap.error(f"--head-dims {args.head_dims} and --seq-lens {args.seq_lens} give problems that share a key "
                 f"({', '.join(shared)}): head dims that pad to the same size, or lengths in one sequence bucket; "
                 "give one of each")
    if jax.default_backend() != "gpu":
        print("pallas_flash.tuning needs an NVIDIA GPU: there is nothing to tune in interpret mode.", file=sys.stderr)
        return 2
    gpu = config.gpu_name()
    table: dict[str, dict] = {}
    done = _read_json(ap, args.out, "--out") if args.out is not None else {}
    cache_path = config.user_cache_path()
    if args.out is None and not args.print_json:
        _read_json(ap, cache_path, "the user cache", gpu)  # a broken cache stops the run before any tuning
    if args.records is not None:  # its folder, before any tuning (a record is written after each problem)
        args.records.parent.mkdir(parents=True, exist_ok=True)
    for (d, dt, c, n), key in zip(problems, keys):
        p = tune.Problem(d, dt, c, n, max(1, args.tokens // n), max(1, args.hidden // d))
        extra = {"nondeterministic": False} if args.deterministic_bwd else {}
        if args.backend == "mosaic":
            extra["search"] = search
        if key in done and not args.retune:
            print(f"{key}: in {args.out} already, skipped", file=sys.stderr, flush=True)
            continue
        start = time.perf_counter()
        cfg, times = tune.tune_problem(p, log=lambda s: print(s, file=sys.stderr, flush=True), **extra)
        seconds = time.perf_counter() - start
        table[key] = cfg.to_dict()
        print(f"{key}: fwd {times['fwd_ms']:.3f} ms, bwd {times['bwd_ms']:.3f} ms, {cfg} ({seconds:.0f} s)",
              file=sys.stderr, flush=True)
        # Saved after each problem: a later problem's failure keeps what was tuned before it.
        if args.out is not None:
            done = _save_entry(args.out, key, table[key])
        elif not args.print_json:
            _save_entry(cache_path, key, table[key], gpu=gpu)
        if args.records is not None:
            with args.records.open("a") as f:
                f.write(json.dumps({"gpu": gpu, "key": key, "problem": vars(p), "config": table[key],
                                    "seconds": seconds, **times}) + "\n")
    if args.out is not None:
        print(f"{args.out} holds {len(done)} configs for {gpu!r}")
    elif args.print_json:
        print(json.dumps(table, indent=1, sort_keys=True))
    else:
        print(f"wrote {len(table)} configs for {gpu!r} to {cache_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
