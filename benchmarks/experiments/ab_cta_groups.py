"""Forward and backward alone, causal, with the one-CTA-per-tile kernels' CTAs handed out by length within groups of
G (batch row, head) pairs (``occupancy.BACKWARD_HEAD_GROUP`` and ``FORWARD_HEAD_GROUP`` both set to G) against no
groups ("default" here: the backward by length on small grids, else heads outermost; the forward heads outermost;
the library's default since NOTES 76 is the backward in groups of 4); interleaved rounds, cuDNN in the same
rounds; outputs and gradients compared with cuDNN's. The forward's persistent configs keep their own order, so a
forward column equal to the default's is the same kernel.

PROBS="D:N:B:H[:KVH],..." HEAD_GROUPS="4,8,16" PYTHONPATH=. python3 benchmarks/experiments/ab_cta_groups.py ROUNDS
Default problems: the headline's causal points (B*N = 16k tokens, heads x D = 2048), GPT-2 124M's 4k (12 heads) and
GQA 32:8 at 8k. Each variant is traced with the switch set and the kernel-trace cache cleared (NOTES 53).
"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import occupancy
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, timed_rounds

DEFAULTS = occupancy.BACKWARD_HEAD_GROUP, occupancy.FORWARD_HEAD_GROUP
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
DEFAULT = ("64:1024:16:32,64:4096:4:32,64:16384:1:32,128:1024:16:16,128:4096:4:16,128:16384:1:16,64:4096:4:12,"
           "128:8192:2:32:8")
# HEAD_GROUPS, not GROUPS: bash ignores assignments to GROUPS (its own array), so GROUPS=4,8 never reached the script
GROUPS = [int(g) for g in os.environ.get("HEAD_GROUPS", "4,8,16").split(",")]
for prob in os.environ.get("PROBS", DEFAULT).split(","):
    D, N, B, H, *KVH = (int(x) for x in prob.split(":"))
    kvh = KVH[0] if KVH else H
    keys = jax.random.split(jax.random.key(1), 4)
    q, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in (keys[0], keys[3]))
    k, v = (jax.random.normal(kk, (B, N, kvh, D), jnp.bfloat16) for kk in keys[1:3])
    fwds, bwds, outs, grads = {}, {}, {}, {}
    for name, group in [("default", None)] + [(f"G{g}", g) for g in GROUPS]:
        occupancy.BACKWARD_HEAD_GROUP = occupancy.FORWARD_HEAD_GROUP = group
        partition._trace.cache_clear()
        f = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")
        fwd = jax.jit(f)
        outs[name] = jax.block_until_ready(fwd(q, k, v))
        fwds[name] = (fwd, (q, k, v))
        bwd, vjp, grads[name] = pullback(f, q, k, v, do)
        bwds[name] = (bwd, (vjp, do))
    occupancy.BACKWARD_HEAD_GROUP, occupancy.FORWARD_HEAD_GROUP = DEFAULTS
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    fwd = jax.jit(f)
    outs["cudnn"] = jax.block_until_ready(fwd(q, k, v))
    fwds["cudnn"] = (fwd, (q, k, v))
    bwd, vjp, grads["cudnn"] = pullback(f, q, k, v, do)
    bwds["cudnn"] = (bwd, (vjp, do))
    flops = 4 * B * H * N * N * D * 0.5
    for pass_name, calls, pass_flops in (("fwd", fwds, flops), ("bwd", bwds, 2.5 * flops)):
        res = timed_rounds(calls, pass_flops, ROUNDS)
        base = np.median(res["cudnn"])

        def err(n):
            if n == "cudnn":
                return ""
            if pass_name == "fwd":
                return f" err {rel_err(outs[n], outs['cudnn']):.1e}"
            return f" err {max(rel_err(a, b) for a, b in zip(grads[n], grads['cudnn'])):.1e}"

        cells = [f"{n} {np.median(x):.1f} ({np.median(x) / base:.3f}) {[round(y) for y in x]}{err(n)}"
                 for n, x in res.items()]
        print(f"{pass_name} D{D} N{N} B{B} H{H}:{kvh}: " + " | ".join(cells), flush=True)
