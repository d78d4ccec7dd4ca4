"""The persistent causal forward alone with its tiles by length over every (batch row, head) pair ("flat")
against by length within groups of pairs (``occupancy.PERSISTENT_FORWARD_HEAD_GROUP``: ``"auto"``, or G from
``HEAD_GROUPS``), each with and without the snake (``PERSISTENT_FORWARD_SNAKE``: odd rounds to the CTAs in
reverse; both the defaults since NOTES 107); interleaved rounds, cuDNN in the same rounds; outputs compared
with cuDNN's (NOTES 105).
``benchmarks/experiments/model_cta_order.py`` predicts each variant's balance and K/V traffic.

PROBS="D:N:B:H[:persistent],..." HEAD_GROUPS="4,16" PYTHONPATH=. python3 \
    benchmarks/experiments/ab_persistent_groups.py ROUNDS
Each problem runs the config ``config.default_config`` gives it; ``:1`` forces that config persistent (so a
non-persistent default is measured persistent too; ``:0`` or nothing keeps the default, and a problem whose
forward is not persistent then runs one kernel in every column). Default problems: the headline's D=64 causal 1k
(B=16, 32 heads: 512 pairs, the table's persistent pick on both GPUs), GPT-2 124M at T=1024 (B=16, 12 heads) and
T=4096 (B=4, 12 heads: the small-grid persistent forward), D=64 causal 2k (B=8, 32 heads), D=128 causal 1k (B=16,
16 heads) forced persistent; "auto" picks no group for GPT-2's (their K/V fits in L2), so its columns repeat the
default's kernels there. Each variant is traced with the knob set and the kernel-trace cache cleared (NOTES 53).
"""
import dataclasses, os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import config as mc, occupancy
from pallas_flash.sharding import partition  # its kernel-trace cache: cleared per variant
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import timed_rounds

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
DEFAULT = "64:1024:16:32,64:1024:16:12,64:4096:4:12,64:2048:8:32,128:1024:16:16:1"
# HEAD_GROUPS, not GROUPS: bash ignores assignments to GROUPS (its own array)
GROUPS = ["auto"] + [int(g) for g in os.environ.get("HEAD_GROUPS", "").split(",") if g]
VARIANTS = [("flat", None, False), ("snake", None, True)] + [
    (f"G{g}" + ("+snake" if snake else ""), g, snake) for g in GROUPS for snake in (False, True)]
KNOBS = occupancy.PERSISTENT_FORWARD_HEAD_GROUP, occupancy.PERSISTENT_FORWARD_SNAKE
for prob in os.environ.get("PROBS", DEFAULT).split(","):
    D, N, B, H, *force = (int(x) for x in prob.split(":"))
    q, k, v = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in jax.random.split(jax.random.key(1), 3))
    cfg = mc.default_config(head_dim=D, dtype=q.dtype, causal=True, seq_q=N, seq_k=N)
    if force and force[0]:
        cfg = dataclasses.replace(cfg, fwd=dataclasses.replace(cfg.fwd, persistent=True))
    fns, outs = {}, {}
    for name, group, snake in VARIANTS:
        occupancy.PERSISTENT_FORWARD_HEAD_GROUP, occupancy.PERSISTENT_FORWARD_SNAKE = group, snake
        partition._trace.cache_clear()
        fn = jax.jit(lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic",
                                                              config=cfg))
        outs[name] = jax.block_until_ready(fn(q, k, v))  # traced and compiled now, under this variant's knob
        fns[name] = fn
    occupancy.PERSISTENT_FORWARD_HEAD_GROUP, occupancy.PERSISTENT_FORWARD_SNAKE = KNOBS
    partition._trace.cache_clear()
    fns["cudnn"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                        implementation="cudnn"))
    outs["cudnn"] = jax.block_until_ready(fns["cudnn"](q, k, v))
    res = timed_rounds({name: (f, (q, k, v)) for name, f in fns.items()}, 4 * B * H * N * N * D * 0.5, ROUNDS)
    base = np.median(res["cudnn"])
    cells = [f"{n} {np.median(x):.1f} ({np.median(x) / base:.3f}) {[round(y) for y in x]}"
             + ("" if n == "cudnn" else f" err {rel_err(outs[n], outs['cudnn']):.1e}") for n, x in res.items()]
    print(f"D{D} N{N} B{B} H{H} {cfg.fwd}: " + " | ".join(cells), flush=True)
