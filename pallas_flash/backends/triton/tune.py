"""Tune the kernels' block configs on this machine's GPU: ``python -m pallas_flash.tune``.

Tuning never happens implicitly (not at import, not inside a user's ``jit``).
This command times candidate configs for each (head dim, dtype, causal,
sequence-length bucket) and stores the fastest in the user cache
(``pallas_flash.config.user_cache_path()``), which ``default_config`` reads
before the shipped table. ``--print-json`` prints the result in the shipped
table's format instead (how ``pallas_flash/configs/*.json`` are made).

The search is coordinate-wise: the forward config alone (timing the forward),
then the dK/dV kernel's block shape and launch parameters with the dQ kernel
fixed, then the dQ kernel's with the best dK/dV (timing the backward alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from pallas_flash.attention import flash_attention
from pallas_flash.config import (
    FlashConfig,
    ForwardConfig,
    config_key,
    default_config,
    gpu_name,
    user_cache_path,
)

# Candidates: (block_q, block_k, num_warps, num_stages).
# Candidates, (block_q, block_k, num_warps, num_stages) each: the ones that
# won somewhere on an H100 plus their neighbours (see benchmarks/NOTES.md).
FWD_SPACE = [
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 128, 4, 3),
]
DKDV_SPACE = [  # the dK/dV kernel's
    (32, 64, 4, 3),
    (64, 128, 8, 3),
    (32, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 8, 2),
]
DQ_SPACE = [  # the dQ kernel's
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 32, 4, 3),
]


def time_call(fn: Callable, args, *, min_time_s: float = 0.2, samples: int = 7) -> float:
    """Median seconds per call: compiled and warmed up, back-to-back calls, device-synchronised."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(min_time_s / samples / one))
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Problem:
    head_dim: int
    dtype: str
    causal: bool
    seq: int
    batch: int
    heads: int

    def inputs(self):
        keys = jax.random.split(jax.random.key(0), 4)
        shape = (self.batch, self.seq, self.heads, self.head_dim)
        return [jax.random.normal(k, shape, jnp.dtype(self.dtype)) for k in keys]


def _fwd_time(p: Problem, cfg: FlashConfig, xs) -> float:
    f = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=p.causal, config=cfg))
    return time_call(f, xs[:3])


def _bwd_time(p: Problem, cfg: FlashConfig, xs) -> float:
    q, k, v, do = xs
    _, pullback = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=p.causal, config=cfg), q, k, v)
    # The pullback is a pytree of residuals: passed as an argument, not closed
    # over, so that XLA cannot fold any of the backward into constants.
    return time_call(jax.jit(lambda pullback, do: pullback(do)), (pullback, do))


def _best(candidates: Iterable[FlashConfig], timer: Callable[[FlashConfig], float], log) -> tuple[FlashConfig, float]:
    best, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = timer(cfg)
        except Exception as e:  # e.g. a tile that does not fit in shared memory
            log(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("no candidate config compiled")
    return best, best_t


def tune_problem(p: Problem, log=print) -> tuple[FlashConfig, dict]:
    """The fastest forward and backward configs for one problem."""
    xs = p.inputs()
    base = default_config(head_dim=p.head_dim, dtype=p.dtype, causal=p.causal, seq_q=p.seq, seq_k=p.seq)
    fwd_cands = [dataclasses.replace(base, fwd=ForwardConfig(*c)) for c in FWD_SPACE]
    best_fwd, t_fwd = _best(fwd_cands, lambda c: _fwd_time(p, c, xs), log)

    def with_dkdv(c):
        return FlashConfig(best_fwd.fwd, dataclasses.replace(base.bwd, block_q_dkv=c[0], block_k_dkv=c[1], num_warps_dkv=c[2], num_stages_dkv=c[3]))

    best_dkdv, _ = _best([with_dkdv(c) for c in DKDV_SPACE], lambda c: _bwd_time(p, c, xs), log)

    def with_dq(c):
        return FlashConfig(best_fwd.fwd, dataclasses.replace(best_dkdv.bwd, block_q_dq=c[0], block_k_dq=c[1], num_warps_dq=c[2], num_stages_dq=c[3]))

    best, t_bwd = _best([with_dq(c) for c in DQ_SPACE], lambda c: _bwd_time(p, c, xs), log)
    return best, {"fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pallas_flash.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--seq-lens", default="1024,4096,16384", help="comma-separated sequence lengths, one bucket each")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes (bfloat16, float16)")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seq per problem (default 16384)")
    ap.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default 2048)")
    ap.add_argument("--print-json", action="store_true", help="print the table instead of writing the user cache")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("pallas_flash.tune needs an NVIDIA GPU: there is nothing to tune in interpret mode.", file=sys.stderr)
        return 2
    gpu = gpu_name()
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    table: dict[str, dict] = {}
    for d, dt, c, n in itertools.product(
        [int(x) for x in args.head_dims.split(",")],
        args.dtypes.split(","),
        causals,
        [int(x) for x in args.seq_lens.split(",")],
    ):
        p = Problem(d, jnp.dtype(dt).name, c, n, max(1, args.tokens // n), max(1, args.hidden // d))
        cfg, times = tune_problem(p, log=lambda s: print(s, file=sys.stderr))
        key = config_key(d, dt, c, n)
        table[key] = cfg.to_dict()
        print(f"{key}: fwd {times['fwd_ms']:.3f} ms, bwd {times['bwd_ms']:.3f} ms, {cfg}", file=sys.stderr, flush=True)
    if args.print_json:
        print(json.dumps(table, indent=1, sort_keys=True))
        return 0
    path = user_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(path.read_text()) if path.exists() else {}
    cache.setdefault(gpu, {}).update(table)
    path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    print(f"wrote {len(table)} configs for {gpu!r} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
