"""Tune a kernel backend's configs on this machine's GPU: ``python -m pallas_flash.tuning``.

``--backend triton`` (the default) tunes the Triton kernels' blocks, warps and
stages (``backends/triton/tune.py``); ``--backend mosaic`` the Mosaic GPU
kernels' key blocks and pipeline depths (``backends/mosaic_gpu/tune.py``).

Tuning never happens implicitly (not at import, not inside a user's ``jit``).
This command times each candidate of the backend's space for every (head dim,
dtype, causal, sequence-length bucket) with ``pallas_flash.tuning.timer`` and
stores the fastest in the backend's user cache, which its ``default_config``
reads first (before the shipped table, where the backend has one).
``--print-json`` prints the result in the shipped table's format instead (how
``backends/<name>/tables/*.json`` are made).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.backends.mosaic_gpu import tune as mosaic_tune
from pallas_flash.backends.triton import config as triton_config
from pallas_flash.backends.triton import tune as triton_tune

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
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("pallas_flash.tuning needs an NVIDIA GPU: there is nothing to tune in interpret mode.", file=sys.stderr)
        return 2
    tune, config = TUNERS[args.backend]
    gpu = config.gpu_name()
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    table: dict[str, dict] = {}
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
        cfg, times = tune.tune_problem(p, log=lambda s: print(s, file=sys.stderr), **extra)
        key = config.config_key(d, dt, c, n)
        table[key] = cfg.to_dict()
        print(f"{key}: fwd {times['fwd_ms']:.3f} ms, bwd {times['bwd_ms']:.3f} ms, {cfg}", file=sys.stderr, flush=True)
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
