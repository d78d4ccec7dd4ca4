"""What the backends' tuners share: the problem, the two timings, the pick of the fastest candidate.

Each backend's ``tune.py`` owns its space and the order of its search; this
module times an attention function's forward and its backward alone (with
``pallas_flash.tuning.timer.time_fn``) and keeps the fastest config that
compiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_flash.tuning.timer import time_fn

__all__ = ["Problem", "fastest", "forward_time", "backward_time"]


@dataclasses.dataclass(frozen=True)
class Problem:
    head_dim: int
    dtype: str
    causal: bool
    seq: int
    batch: int
    heads: int

    def inputs(self):
        """q, k, v and an output cotangent, ``[batch, seq, heads, head_dim]`` each."""
        keys = jax.random.split(jax.random.key(0), 4)
        shape = (self.batch, self.seq, self.heads, self.head_dim)
        return [jax.random.normal(k, shape, jnp.dtype(self.dtype)) for k in keys]


def forward_time(attention: Callable, xs) -> float:
    """Median seconds of ``attention(q, k, v)`` under ``jit``."""
    return time_fn(jax.jit(attention), [xs[:3]], min_time=0.2, warmup=2).median_s


def backward_time(attention: Callable, xs) -> float:
    """Median seconds of ``attention``'s backward alone (``jax.vjp`` run beforehand)."""
    q, k, v, do = xs
    _, pullback = jax.vjp(attention, q, k, v)
    # The pullback is a pytree of residuals: passed as an argument, not closed
    # over, so that XLA cannot fold any of the backward into constants.
    return time_fn(jax.jit(lambda pullback, do: pullback(do)), [(pullback, do)], min_time=0.2, warmup=2).median_s


def fastest(candidates: Iterable[Any], timer: Callable[[Any], float], log) -> tuple[Any, float]:
    """The fastest candidate and its time; one that fails (e.g. tiles that do not fit) is logged and skipped."""
    best_cfg, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = timer(cfg)
        except Exception as e:  # e.g. a tile that does not fit in shared memory
            log(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        log(f"    {t * 1e3:8.3f} ms  {cfg}")
        if t < best_t:
            best_cfg, best_t = cfg, t
    if best_cfg is None:
        raise RuntimeError("no candidate config compiled")
    return best_cfg, best_t
