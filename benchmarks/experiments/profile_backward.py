"""Kernel-level breakdown of the backward (pullback alone) and forward: pallas mosaic vs cuDNN.

On main: PYTHONPATH=. python3 benchmarks/experiments/profile_backward.py [0,1,...] (problem indices).
IMPLS (default "mosaic,det,cudnn"): ``mosaic`` the default config; ``det`` / ``fused`` its forward with the
heuristics' deterministic / fused backward (``default_backward(..., deterministic=...)``). PASSES (default "fwd,bwd").
"""
import os, sys, jax, jax.numpy as jnp
from benchmarks.profile import kernel_breakdown
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc

def attn(impl, causal):
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    def f(q, k, v):
        D, N = q.shape[-1], q.shape[1]
        cfg = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N)
        if impl in ("det", "fused"):
            import dataclasses
            cfg = dataclasses.replace(cfg, bwd=mc.default_backward(D, q.dtype, N, N, causal=causal,
                                                                   deterministic=impl == "det"))
        return pf.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
    return f

probs = [(128, 4096, False), (128, 16384, False), (64, 4096, False), (64, 4096, True), (64, 1024, True)]
if len(sys.argv) > 1:
    probs = [p for i, p in enumerate(probs) if str(i) in sys.argv[1].split(",")]
for D, N, causal in probs:
    B, H = 16384 // N, 2048 // D
    if D == 64 and N in (1024, 4096) and causal:  # GPT-2's shapes
        B, H = 16384 // N, 12
    key = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in key)
    for impl in os.environ.get("IMPLS", "mosaic,det,cudnn").split(","):
        f = attn(impl, causal)
        out, vjp = jax.vjp(f, q, k, v)
        bwd = jax.jit(lambda vjp, do: vjp(do))
        fwd = jax.jit(f)
        passes = {"fwd": (fwd, (q, k, v)), "bwd": (bwd, (vjp, do))}
        for name in os.environ.get("PASSES", "fwd,bwd").split(","):
            fn, args = passes[name]
            jax.block_until_ready(fn(*args)); jax.block_until_ready(fn(*args))
            steps = 20
            def run():
                r = None
                for _ in range(steps):
                    r = fn(*args)
                jax.block_until_ready(r)
            s = kernel_breakdown(run, steps)
            tot = s["kernel_ms_per_step"]
            tops = "; ".join(f"{n[:110]} {ms*1e3:.0f}us" for n, ms in s["top"][:6])
            print(f"D{D} N{N} B{B} H{H} c{int(causal)} {impl:6s} {name}: kernels {tot*1e3:.0f}us idle {s['idle_ms_per_step']*1e3:.0f}us | {tops}", flush=True)
