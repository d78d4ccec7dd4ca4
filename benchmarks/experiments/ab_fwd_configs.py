"""The forward alone under several Mosaic forward configs, interleaved rounds, cuDNN (and tokamax's Mosaic kernel,
where it is importable) in the same rounds; outputs compared with cuDNN's. Configs differ in their fields, so each
gets its own kernel trace.

PROBS="D:N:causal[:B:H],..." VARIANTS="name=block_kv:num_stages:overlap:persistent[:compute_wgs],..." \
    PYTHONPATH=. python3 benchmarks/experiments/ab_fwd_configs.py ROUNDS
B and H default to B*N = 16k tokens and heads*D = 2048 (the headline's shapes). A variant ``default`` (no fields)
takes ``config.default_config``'s forward for the call; ``compute_wgs`` defaults to 2.
``PEERS=0`` leaves cuDNN and tokamax out of the rounds (ratios are then to the first variant); ``PEERS=init`` too,
after one cuDNN call before the rounds (NOTES 69: does cuDNN's presence in the process, or its kernels between
ours, slow the persistent forward?).
"""
import dataclasses, os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import timed_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "128:16384:0").split(",")]
variants = dict(v.split("=") for v in os.environ.get("VARIANTS", "default=,kv192=192:2:1:0").split(","))
try:
    import tokamax
except ImportError:
    tokamax = None
for D, N, causal, *BH in probs:
    causal = bool(causal)
    B, H = BH if BH else (16384 // N, 2048 // D)
    q, k, v = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in jax.random.split(jax.random.key(1), 3))
    base = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N)
    fns = {}
    for name, fields in variants.items():
        cfg = base
        if fields:
            bkv, st, ov, pers, *wgs = (int(x) for x in fields.split(":"))
            extra = dict(compute_wgs=wgs[0]) if wgs else {}
            cfg = dataclasses.replace(base, fwd=mc.MosaicForwardConfig(
                block_kv=bkv, num_stages=st, overlap=bool(ov), persistent=bool(pers), **extra))
        fns[name] = jax.jit(lambda q, k, v, cfg=cfg, causal=causal: pf.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic", config=cfg))
    peers = os.environ.get("PEERS", "1") == "1"  # 0: our configs alone, ratios to the first variant; init: the same
    if os.environ.get("PEERS") == "init":  # after one cuDNN call (its process-wide setup) outside the rounds
        jax.block_until_ready(jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    if peers:
        fns["cudnn"] = jax.jit(lambda q, k, v, causal=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"))
    if peers and tokamax is not None:
        fns["tokamax"] = jax.jit(lambda q, k, v, causal=causal: tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic"))
    outs = {}
    for name in list(fns):
        try:
            outs[name] = jax.block_until_ready(fns[name](q, k, v))
        except Exception as e:  # a config that does not compile (registers, shared memory) is reported, not fatal
            print(f"D{D} N{N} c{int(causal)}: {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del fns[name]
    res = timed_rounds({name: (f, (q, k, v)) for name, f in fns.items()},
                       4 * B * H * N * N * D * (0.5 if causal else 1), ROUNDS)
    ref = "cudnn" if peers else next(iter(variants))
    cells = [f"{n} {np.median(x):.1f} ({np.median(x) / np.median(res[ref]):.3f}) {[round(y) for y in x]}"
             + ("" if n == ref else f" err {rel_err(outs[n], outs[ref]):.1e}")
             for n, x in res.items()]
    print(f"D{D} N{N} c{int(causal)} B{B} H{H}: " + " | ".join(cells), flush=True)
