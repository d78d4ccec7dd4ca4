"""What the in-process A/Bs in this folder share: each backward variant's jitted pullback, built and run once (it
compiles then, under whatever switch the script has set), and the interleaved timing rounds (forward or backward)."""

from __future__ import annotations

import jax

from pallas_flash.tuning.timer import time_fn


def pullback(f, q, k, v, do):
    """``(bwd, vjp, grads)``: the jitted pullback of ``f`` at ``(q, k, v)``, its residuals, and the gradients under
    the cotangent ``do`` from its first call (which traces and compiles it)."""
    _, vjp = jax.vjp(f, q, k, v)
    bwd = jax.jit(lambda vjp, do: vjp(do))
    return bwd, vjp, jax.block_until_ready(bwd(vjp, do))


def timed_rounds(calls: dict, flops: float, rounds: int, *, alternate: bool = True,
                 min_time: float = 0.3) -> dict[str, list[float]]:
    """TFLOP/s of each ``name: (fn, args)`` per round (``time_fn``'s median of ``fn(*args)``); with ``alternate``
    every other round runs the variants in reverse order."""
    res = {name: [] for name in calls}
    for r in range(rounds):
        items = list(calls.items())
        for name, (fn, args) in (reversed(items) if alternate and r % 2 else items):
            res[name].append(flops / time_fn(fn, [args], min_time=min_time).median_s / 1e12)
    return res


def tflops_rounds(pullbacks: dict, do, flops: float, rounds: int, **kw) -> dict[str, list[float]]:
    """``timed_rounds`` of each ``name: (bwd, vjp)`` pullback under the cotangent ``do``."""
    return timed_rounds({name: (bwd, (vjp, do)) for name, (bwd, vjp) in pullbacks.items()}, flops, rounds, **kw)
