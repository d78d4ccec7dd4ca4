"""Backward alone, fused mode: dQ staged in 1 vs 2 float32 buffers per warpgroup (monkeypatched), cuDNN in the same rounds.

Needs dq-double-buffer.patch applied. PROBS="D:N:causal[:stages],..." PYTHONPATH=. python3 benchmarks/experiments/ab_dq_buffers.py ROUNDS
"""
import dataclasses, os, sys, jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc, backward_dkdv
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, tflops_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "64:4096:0,64:16384:0,64:4096:1,64:16384:1,128:16384:0").split(",")]
real = backward_dkdv.fused_dq_buffers
for D, N, causal, *stages in probs:
    causal = bool(causal)
    B, H = 16384 // N, 2048 // D
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in keys)
    base = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N)
    bwd_cfg = mc.default_backward(D, q.dtype, N, N, causal=causal, deterministic=False)
    if stages:
        bwd_cfg = dataclasses.replace(bwd_cfg, num_stages=stages[0])
    cfg = dataclasses.replace(base, bwd=bwd_cfg)
    f = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
    variants = {"buf1": (lambda *a: 1), "buf2": real, "cudnn": None}
    bwds, grads = {}, {}
    for name, patch in variants.items():
        if name == "cudnn":
            g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        else:
            g = lambda q, k, v: f(q, k, v)
            backward_dkdv.fused_dq_buffers = patch
            partition._trace.cache_clear()
        bwd, vjp, grads[name] = pullback(g, q, k, v, do)
        backward_dkdv.fused_dq_buffers = real
        bwds[name] = (bwd, vjp)
    errs = {n: max(rel_err(a, b) for a, b in zip(grads[n], grads["cudnn"])) for n in ("buf1", "buf2")}
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * (0.5 if causal else 1) * 2.5, ROUNDS)
    med = {n: float(np.median(x)) for n, x in res.items()}
    print(f"D{D} N{N} c{int(causal)} stages={bwd_cfg.num_stages} buf1 {med['buf1']:.1f} buf2 {med['buf2']:.1f} ({med['buf2']/med['buf1']-1:+.1%}) cudnn {med['cudnn']:.1f} | buf2/cudnn {med['buf2']/med['cudnn']:.3f} | rounds buf1 {[round(x) for x in res['buf1']]} buf2 {[round(x) for x in res['buf2']]} | err-vs-cudnn {errs['buf1']:.1e}/{errs['buf2']:.1e}", flush=True)
