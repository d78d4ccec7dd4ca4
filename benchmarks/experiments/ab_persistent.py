"""Backward alone: one CTA per key tile vs persistent dK/dV kernel (default mode per call), cuDNN in the same rounds.

Needs bwd-persistent.patch applied. FORCE_DET=1 for the deterministic mode; PROBS="D:N:causal,...".
"""
import dataclasses, os, sys, jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, tflops_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "128:4096:0,128:16384:0,64:4096:0,128:4096:1,64:4096:1,64:16384:1,64:1024:1").split(",")]
FORCE_DET = os.environ.get("FORCE_DET") == "1"
rows = []
for D, N, causal in probs:
    B, H = 16384 // N, 2048 // D
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in keys)
    causal = bool(causal)
    base = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N)
    if FORCE_DET:
        base = dataclasses.replace(base, bwd=mc.default_backward(D, q.dtype, N, N, causal=causal, deterministic=True))
    fns = {}
    for name, persistent in (("tile", False), ("pers", True)):
        cfg = dataclasses.replace(base, bwd=dataclasses.replace(base.bwd, persistent=persistent))
        f = lambda q, k, v, cfg=cfg: pf.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
        fns[name] = f
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    bwds, grads = {}, {}
    for name, f in fns.items():
        bwd, vjp, grads[name] = pullback(f, q, k, v, do)
        bwds[name] = (bwd, vjp)
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(grads["tile"], grads["pers"])]
    errs = [rel_err(a, b) for a, b in zip(grads["pers"], grads["cudnn"])]
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * (0.5 if causal else 1) * 2.5, ROUNDS, alternate=False)
    med = {n: float(np.median(x)) for n, x in res.items()}
    print(f"D{D} N{N} c{int(causal)} det={base.bwd.deterministic} tile {med['tile']:.1f} pers {med['pers']:.1f} ({med['pers']/med['tile']-1:+.1%}) cudnn {med['cudnn']:.1f} | pers/cudnn {med['pers']/med['cudnn']:.3f} | rounds tile {[round(x) for x in res['tile']]} pers {[round(x) for x in res['pers']]} | tile-pers maxdiff {max(diffs):.2e} err-vs-cudnn {max(errs):.1e}", flush=True)
