"""Backward alone with the backward kernels' grids heads outermost, by length (tiles outermost) under the small-grid
rule (``occupancy.SMALL_GRID_BACKWARD_CTAS_PER_SM``, ``THRESHOLD`` CTAs per SM, default the module's), and by length
always; interleaved rounds, cuDNN in the same rounds; gradients compared with cuDNN's.

PROBS="D:N:causal:B:H[:KVH],..." PYTHONPATH=. python3 benchmarks/experiments/ab_bwd_order.py ROUNDS
Default problems: those of the second A/B (NOTES 73), below. Each variant is traced with the switch set and the
kernel-trace cache cleared (NOTES 53).
"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import occupancy
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, tflops_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
THRESHOLD = float(os.environ.get("THRESHOLD", occupancy.SMALL_GRID_BACKWARD_CTAS_PER_SM))
# The second A/B (NOTES 73; the first, on GQA, GPT-2's and the headline's causal points, is in its log): grids near
# the threshold (CTAs per SM of the dK/dV grid: 7.8 to 23) and long ones with few heads.
DEFAULT = ("128:8192:1:2:32:8,64:4096:1:4:12,64:4096:1:4:20,64:4096:1:8:12,64:8192:1:2:12,128:4096:1:2:16,"
           "128:4096:1:4:16,128:16384:1:1:8,64:16384:1:1:12,128:4096:1:4:32:8")
for prob in os.environ.get("PROBS", DEFAULT).split(","):
    D, N, causal, B, H, *KVH = (int(x) for x in prob.split(":"))
    causal, kvh = bool(causal), (KVH[0] if KVH else H)
    keys = jax.random.split(jax.random.key(1), 4)
    q, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in (keys[0], keys[3]))
    k, v = (jax.random.normal(kk, (B, N, kvh, D), jnp.bfloat16) for kk in keys[1:3])
    bwds, grads = {}, {}
    for name, threshold in (("heads_outer", 0), (f"rule<{THRESHOLD:g}", THRESHOLD), ("by_length", 1e9)):
        occupancy.SMALL_GRID_BACKWARD_CTAS_PER_SM = threshold
        partition._trace.cache_clear()
        f = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic")
        bwd, vjp, grads[name] = pullback(f, q, k, v, do)
        bwds[name] = (bwd, vjp)
    occupancy.SMALL_GRID_BACKWARD_CTAS_PER_SM = THRESHOLD
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    bwd, vjp, grads["cudnn"] = pullback(f, q, k, v, do)
    bwds["cudnn"] = (bwd, vjp)
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * (0.5 if causal else 1) * 2.5, ROUNDS)
    cells = [f"{n} {np.median(x):.1f} ({np.median(x) / np.median(res['cudnn']):.3f}) {[round(y) for y in x]}"
             + ("" if n == "cudnn" else f" err {max(rel_err(a, b) for a, b in zip(grads[n], grads['cudnn'])):.1e}")
             for n, x in res.items()]
    print(f"D{D} N{N} c{int(causal)} B{B} H{H}:{kvh}: " + " | ".join(cells), flush=True)
