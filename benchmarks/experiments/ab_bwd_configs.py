"""Backward alone under several Mosaic backward configs, interleaved rounds, cuDNN in the same rounds; gradients
compared with cuDNN's. Configs differ in their fields, so each gets its own kernel trace (no cache clearing needed).

PROBS="D:N:causal[:kv_heads[:heads]],..." VARIANTS="name=block_q:num_stages:deterministic[:field=value...],..." \
    PYTHONPATH=. python3 benchmarks/experiments/ab_bwd_configs.py ROUNDS
B*N = 16k tokens, 2048 / D query heads unless ``heads`` says, as many K/V heads unless ``kv_heads`` says (GQA 32:8 at
D=128, the headline's GQA point: ``128:8192:1:8:32``).
A variant ``default`` (no fields) takes ``config.default_backward`` for the call; further ``field=value`` items set
other ``MosaicBackwardConfig`` fields (strings as written, digits as ints, true/false as bools), e.g.
``a3=64:3:0:dq_add=atomic_v2``; a variant starting with ``+`` changes only the fields it names in the default,
e.g. ``det=+deterministic=true`` (``one_launch=true`` too with ``one-launch.patch`` applied).
"""
import dataclasses, os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, tflops_rounds


def _fields(items):
    """``field=value`` items as config fields: digits as ints, true/false as bools, the rest as strings."""
    parse = lambda value: int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return {key: parse(value) for key, value in (x.split("=") for x in items)}


ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "64:4096:0").split(",")]
variants = dict(v.split("=", 1) for v in os.environ.get("VARIANTS", "default=,rows128=128:2:0").split(","))
for D, N, causal, *kv in probs:
    causal = bool(causal)
    B, H = 16384 // N, kv[1] if len(kv) > 1 else 2048 // D
    KVH = kv[0] if kv else H
    q, do, k, v = (jax.random.normal(kk, (B, N, H if i < 2 else KVH, D), jnp.bfloat16)
                   for i, kk in enumerate(jax.random.split(jax.random.key(1), 4)))
    base = mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N, kv_groups=H // KVH)
    fns = {}
    for name, fields in variants.items():
        bwd = mc.default_backward(D, q.dtype, N, N, causal=causal, kv_groups=H // KVH)
        if fields.startswith("+"):  # the default with fields changed
            bwd = dataclasses.replace(bwd, **_fields(fields[1:].split(":")))
        elif fields:
            bq, st, det, *extra = fields.split(":")
            bwd = dataclasses.replace(bwd, block_q=int(bq), num_stages=int(st), deterministic=bool(int(det)),
                                      **_fields(extra))
        cfg = dataclasses.replace(base, bwd=bwd)
        fns[name] = lambda q, k, v, cfg=cfg, causal=causal: pf.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
    fns["cudnn"] = lambda q, k, v, causal=causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                               implementation="cudnn")
    bwds, grads = {}, {}
    for name, g in fns.items():
        bwd, vjp, grads[name] = pullback(g, q, k, v, do)
        bwds[name] = (bwd, vjp)
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * (0.5 if causal else 1) * 2.5, ROUNDS)
    cells = [f"{n} {np.median(x):.1f} ({np.median(x) / np.median(res['cudnn']):.3f}) {[round(y) for y in x]}"
             + ("" if n == "cudnn" else f" err {max(rel_err(a, b) for a, b in zip(grads[n], grads['cudnn'])):.1e}")
             for n, x in res.items()]
    print(f"D{D} N{N} c{int(causal)}" + (f" GQA {H}:{KVH}" if KVH != H else "") + ": " + " | ".join(cells), flush=True)
