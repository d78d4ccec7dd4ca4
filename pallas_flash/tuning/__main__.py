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
``backends/<name>/tables/*.json`` are made, over as many runs as it takes).
``--records FILE`` appends every time the search took, one JSON line per
problem. The Mosaic search confirms its shortlist in interleaved rounds
(``--top``, ``--rounds``, ``--margin``) and compiles on ``--threads`` threads
(``pallas_flash.tuning.search``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
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
    try:
        search = Search(**search_args)
    except ValueError as e:
        ap.error(str(e))
    if jax.default_backend() != "gpu":
        print("pallas_flash.tuning needs an NVIDIA GPU: there is nothing to tune in interpret mode.", file=sys.stderr)
        return 2
    tune, config = TUNERS[args.backend]
    gpu = config.gpu_name()
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    table: dict[str, dict] = {}
    done = json.loads(args.out.read_text()) if args.out is not None and args.out.exists() else {}
    for d, dt, c, n in itertools.product(
        [int(x) for x in args.head_dims.split(",")],
        args.dtypes.split(","),
        causals,
        [int(x) for x in args.seq_lens.split(",")],
    ):
        p = tune.Problem(d, jnp.dtype(dt).name, c, n, max(1, args.tokens // n), max(1, args.hidden // d))
        extra = {"nondeterministic": False} if args.deterministic_bwd else {}
        if extra and args.backend != "mosaic":
            ap.error("--deterministic-bwd applies to --backend mosaic only")
        if args.backend == "mosaic":
            extra["search"] = search
        key = config.config_key(d, dt, c, n)
        if key in done:
            print(f"{key}: in {args.out} already, skipped", file=sys.stderr, flush=True)
            continue
        start = time.perf_counter()
        cfg, times = tune.tune_problem(p, log=lambda s: print(s, file=sys.stderr, flush=True), **extra)
        seconds = time.perf_counter() - start
        table[key] = cfg.to_dict()
        print(f"{key}: fwd {times['fwd_ms']:.3f} ms, bwd {times['bwd_ms']:.3f} ms, {cfg} ({seconds:.0f} s)",
              file=sys.stderr, flush=True)
        if args.records is not None:
            with args.records.open("a") as f:
                f.write(json.dumps({"gpu": gpu, "key": key, "problem": vars(p), "config": table[key],
                                    "seconds": seconds, **times}) + "\n")
        if args.out is not None:
            done[key] = table[key]
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
            tmp.replace(args.out)  # never a half-written table
    if args.out is not None:
        print(f"{args.out} holds {len(done)} configs for {gpu!r}")
        return 0
    if args.print_json:
        print(json.dumps(table, indent=1, sort_keys=True))
        return 0
    path = config.user_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(path.read_text()) if path.exists() else {}
    cache.setdefault(gpu, {}).update(table)
    path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    print(f"wrote {len(table)} configs for {gpu!r} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
