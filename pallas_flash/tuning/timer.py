"""The one timer: the tuner and the benchmarks time GPU calls with ``time_fn``.

How one function is timed (``time_fn``):

* The caller has already run it once (that call compiles it and is the one
  whose output is checked), and ``time_fn`` runs ``warmup`` more calls.
* ``estimate_calls`` calls (3) are timed alone, each synchronised; their median
  estimates one call's cost (one slow call, a GC pause, say, does not make it: a
  too-high estimate would give too few calls per sample, whose synchronisation
  cost would then stay in the per-call time). From it ``inner`` (how many calls
  one sample dispatches back to back, so that a sample lasts at least
  ``target_sample_s``) and the number of samples are chosen.
* Each sample dispatches ``inner`` calls asynchronously, rotating over the
  input sets, then waits with ``jax.block_until_ready`` and reads the host
  clock: the per-call time is the sample over ``inner``. Back-to-back dispatch
  keeps the GPU queue full, so host dispatch cost is hidden whenever a call
  takes longer on the device than on the host.
* The reported time is the median over the samples; the spread (interquartile
  range over median) is kept beside it.

JAX runs its work on its own CUDA streams, so CUDA events from another library
(``triton.testing.do_bench`` records them on PyTorch's stream) would not
bracket it; host clock plus ``block_until_ready`` is the synchronising method
that does.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax

__all__ = ["L2_BYTES", "Timing", "num_input_sets", "time_fn"]

# The H100's (and H200's) L2 cache. Input sets smaller than twice this are
# rotated so that consecutive calls do not find their inputs in the cache.
L2_BYTES = 50 * 1024 * 1024


def num_input_sets(bytes_per_set: int, cache_bytes: int = L2_BYTES, max_sets: int = 3) -> int:
    """How many input sets to rotate over so that a call's data is not cache-resident.

    One set of ``2 * cache_bytes`` or more is never found in the cache; smaller
    sets get ``ceil(2 * cache / bytes)`` sets, at most ``max_sets``.
    """
    if bytes_per_set <= 0:
        return max_sets
    return max(1, min(max_sets, math.ceil(2 * cache_bytes / bytes_per_set)))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Result of ``time_fn``; times in seconds per call."""

    median_s: float
    min_s: float
    iqr_rel: float  # (p75 - p25) / median over the samples
    samples: int
    inner: int  # calls per sample
    input_sets: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_fn(
    fn: Callable[..., Any],
    arg_sets: Sequence[Sequence[Any]],
    *,
    min_time: float = 0.5,
    warmup: int = 1,
    min_samples: int = 5,
    max_samples: int = 100,
    target_sample_s: float = 5e-3,
    max_inner: int = 200,
    estimate_calls: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Median time of one call of ``fn(*args)``, rotating over ``arg_sets``.

    ``fn`` should already be compiled (called once); see the module docstring
    for the method. ``min_time`` is the total seconds of samples aimed for.
    """
    if not arg_sets:
        raise ValueError("time_fn needs at least one argument set")
    n = len(arg_sets)
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % n]))

    single = []
    for i in range(max(1, estimate_calls)):
        t0 = clock()
        jax.block_until_ready(fn(*arg_sets[i % n]))
        single.append(clock() - t0)
    estimate = max(statistics.median(single), 1e-7)

    inner = max(1, min(max_inner, math.ceil(target_sample_s / estimate)))
    samples = max(min_samples, min(max_samples, math.ceil(min_time / (inner * estimate))))

    per_call = []
    call = 0
    for _ in range(samples):
        t0 = clock()
        out = None
        for _ in range(inner):
            out = fn(*arg_sets[call % n])
            call += 1
        jax.block_until_ready(out)
        per_call.append((clock() - t0) / inner)
        del out

    xs = sorted(per_call)
    med = statistics.median(xs)
    iqr = _quantile(xs, 0.75) - _quantile(xs, 0.25)
    return Timing(
        median_s=med,
        min_s=xs[0],
        iqr_rel=iqr / med if med > 0 else 0.0,
        samples=samples,
        inner=inner,
        input_sets=n,
    )
