"""Kernel-level breakdown of the backward (pullback alone) and forward: pallas mosaic (default, det) vs cuDNN.

On main: PYTHONPATH=. python3 benchmarks/experiments/profile_backward.py [0,1,...] (problem indices).
"""
import sys, jax, jax.numpy as jnp
from benchmarks.profile import kernel_breakdown
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc

def attn(impl, causal):
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    det = impl == "det"
    def f(q, k, v):
        D, N = q.shape[-1], q.shape[1]
        cfg = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N)
        if det:
            import dataclasses
            cfg = dataclasses.replace(cfg, bwd=mc.default_backward(D, q.dtype, N, N, causal=causal, deterministic=True))
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
    for impl in ("mosaic", "det", "cudnn"):
        f = attn(impl, causal)
        out, vjp = jax.vjp(f, q, k, v)
        bwd = jax.jit(lambda vjp, do: vjp(do))
        fwd = jax.jit(f)
        for name, fn, args in (("fwd", fwd, (q, k, v)), ("bwd", bwd, (vjp, do))):
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
