"""Fused backward alone at D=128 16k and D=64 4k non-causal: ablations of the dQ path (results wrong, times only).

Needs fused-ablation.patch applied. PYTHONPATH=. python3 benchmarks/experiments/ablate_fused.py ROUNDS
"""
import dataclasses, os, sys, jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc, backward_dkdv
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant

from benchmarks.experiments.pullbacks import pullback, tflops_rounds
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
VARIANTS = ["", "noreduce", "nostore", "noproduct", "nowait", "all", "allnods", "det"]
for D, N in ((128, 16384), (64, 4096)):
    B, H = 16384 // N, 2048 // D
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in keys)
    base = mc.default_config(head_dim=D, dtype=q.dtype, causal=False, seq_q=N, seq_k=N)
    bwds = {}
    for var in VARIANTS:
        det = var == "det"
        cfg = dataclasses.replace(base, bwd=mc.default_backward(D, q.dtype, N, N, causal=False, deterministic=det))
        g = lambda q, k, v, cfg=cfg: pf.dot_product_attention(q, k, v, implementation="mosaic", config=cfg)
        backward_dkdv.ABLATE = "" if det else var
        partition._trace.cache_clear()
        bwd, vjp, _ = pullback(g, q, k, v, do)
        backward_dkdv.ABLATE = ""
        bwds[var or "fused"] = (bwd, vjp)
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * 2.5, ROUNDS)
    print(f"D{D} N{N} nc: " + "  ".join(f"{n} {np.median(x):.0f} {[round(y) for y in x]}" for n, x in res.items()), flush=True)
