"""What the in-process backward A/Bs in this folder share: each variant's jitted pullback, built and run once (it
compiles then, under whatever switch the script has set), and the interleaved timing rounds."""

from __future__ import annotations

import jax

from pallas_flash.tuning.timer import time_fn


def pullback(f, q, k, v, do):
    """``(bwd, vjp, grads)``: the jitted pullback of ``f`` at ``(q, k, v)``, its residuals, and the gradients under
    the cotangent ``do`` from its first call (which traces and compiles it)."""
    _, vjp = jax.vjp(f, q, k, v)
    bwd = jax.jit(lambda vjp, do: vjp(do))
    return bwd, vjp, jax.block_until_ready(bwd(vjp, do))


def tflops_rounds(pullbacks: dict, do, flops: float, rounds: int, *, alternate: bool = True,
                  min_time: float = 0.3) -> dict[str, list[float]]:
    """TFLOP/s of each ``name: (bwd, vjp)`` per round (``time_fn``'s median); with ``alternate`` every other
    round runs the variants in reverse order."""
    res = {name: [] for name in pullbacks}
    for r in range(rounds):
        items = list(pullbacks.items())
        for name, (bwd, vjp) in (reversed(items) if alternate and r % 2 else items):
            res[name].append(flops / time_fn(bwd, [(vjp, do)], min_time=min_time).median_s / 1e12)
    return res
