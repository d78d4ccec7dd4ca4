"""The Mosaic forward alone with parts of its softmax dropped (results wrong, times only): where its time goes.

Needs forward-ablation.patch applied.
PROBS="D:N:causal,..." VARIANTS="shipped,rescale,..." PYTHONPATH=. python3 \
    benchmarks/experiments/ablate_forward.py ROUNDS
Variants: the shipped kernel; without the O rescale, the row sum, the row max, the exp2; without all four;
with ``LAZY_RESCALE`` 0 (O rescaled only when a row's max grew) and 8 (FlashAttention-4's threshold): on the H200
``lazy8`` was 11% slower and, compiled, wrong with the overlapped schedule and two warpgroups (NOTES 102), so
do not land it as it is;
``padall``: warpgroups wholly past Tq compute all the CTA's key blocks, as before NOTES 101 (exact, slower).
Each variant is compiled with ``forward_schedules.ABLATE`` set and the kernel-trace cache cleared; cuDNN in the rounds.
Then (``GROWTH=0`` skips it) the lazy variants compiled, on logits that grow along the keys, against float64.
"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.testing.errors import rel_err
from pallas_flash.backends.mosaic_gpu import forward_schedules
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant

from benchmarks.experiments.pullbacks import timed_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "128:16384:0").split(",") if p]
VARIANTS = {"shipped": (), "rescale": ("rescale",), "sum": ("sum",), "max": ("max",), "exp": ("exp",),
            "all4": ("rescale", "sum", "max", "exp"), "lazy0": 0.0, "lazy8": 8.0, "padall": ("padded",)}
VARIANTS = {n: VARIANTS[n] for n in os.environ.get("VARIANTS", ",".join(VARIANTS)).split(",")}
for D, N, causal in probs:
    causal = bool(causal)
    B, H = 16384 // N, 2048 // D
    q, k, v = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in jax.random.split(jax.random.key(1), 3))
    fns = {}
    for name, parts in VARIANTS.items():
        lazy = isinstance(parts, float)  # a LAZY_RESCALE threshold (a real variant: results checked)
        forward_schedules.ABLATE = frozenset() if lazy else frozenset(parts)
        forward_schedules.LAZY_RESCALE = parts if lazy else None
        partition._trace.cache_clear()
        f = jax.jit(lambda q, k, v, causal=causal: pf.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic"))
        jax.block_until_ready(f(q, k, v))  # compiles under this ABLATE
        fns[name] = f
    forward_schedules.ABLATE, forward_schedules.LAZY_RESCALE = frozenset(), None
    outs = {n: f(q, k, v) for n, f in fns.items()}
    fns["cudnn"] = jax.jit(lambda q, k, v, causal=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"))
    res = timed_rounds({n: (f, (q, k, v)) for n, f in fns.items()}, 4 * B * H * N * N * D * (0.5 if causal else 1),
                       ROUNDS)
    ref = fns["cudnn"](q, k, v)
    print(f"D{D} N{N} c{int(causal)}: " + " | ".join(
        f"{n} {np.median(x):.0f} {[round(y) for y in x]}"
        + (f" err {rel_err(outs[n], ref):.1e}" if n in outs else "") for n, x in res.items()), flush=True)

if os.environ.get("GROWTH", "1") == "1":  # the lazy rescale compiled, on logits that grow along the keys
    from pallas_flash.backends.mosaic_gpu import MosaicConfig, MosaicForwardConfig
    from pallas_flash.reference import attention_reference

    for D, causal in ((64, False), (128, True)):
        rng = np.random.default_rng(D)
        T = int(os.environ.get("GROWTH_T", "1000"))  # not a block multiple
        q = rng.standard_normal((2, T, 4, D)) * 0.3 + 1.0
        k = rng.standard_normal((2, T, 4, D)) * 0.3 + np.linspace(0, 3.0, T)[None, :, None, None]
        v = rng.standard_normal((2, T, 4, D))
        q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        with jax.enable_x64(True):
            ref = np.asarray(attention_reference(
                *(jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)), is_causal=causal))
        errs = []
        for lazy in (None, 0.0, 8.0):
            for ov, wgs in ((False, 2), (True, 2), (True, 3)):
                forward_schedules.LAZY_RESCALE = lazy
                partition._trace.cache_clear()
                cfg = MosaicConfig(fwd=MosaicForwardConfig(64, 128, 2, overlap=ov, compute_wgs=wgs))
                try:
                    out = pf.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
                    errs.append(f"{lazy}/{'ov' if ov else 'turns'}{wgs} {rel_err(out, ref):.2e}")
                except Exception as e:  # a config that does not fit (registers, shared memory)
                    errs.append(f"{lazy}/{'ov' if ov else 'turns'}{wgs} failed {type(e).__name__}")
        forward_schedules.LAZY_RESCALE = None
        print(f"growth D{D} c{int(causal)}: " + " | ".join(errs), flush=True)
