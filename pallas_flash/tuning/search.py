"""What the backends' tuners share: the problem, the two timings, the pick of the fastest candidate.

Each backend's ``tune.py`` owns its space and the order of its search; this
module times an attention function's forward and its backward alone (with
``pallas_flash.tuning.timer.time_fn``) and keeps the fastest config that
compiles. Two ways to pick:

* ``fastest``: one timing per candidate, the lowest wins (the Triton tuner).
* ``screen_then_confirm``: every candidate compiled (on ``threads`` threads:
  compiling, not timing, is most of a tuner's time) and timed once, briefly;
  then the ``top`` fastest and a ``baseline`` (the backend's heuristic pick)
  timed again in ``rounds`` interleaved rounds (every other one in reverse
  order), each candidate's time the median of its rounds. A candidate
  replaces the baseline only when it is faster by more than ``margin``: a
  one-pass minimum over tens of candidates is biased low by the timing noise
  (a few percent between identical kernels), and a table should not trade a
  measured heuristic for a lucky sample.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pallas_flash.tuning.timer import time_fn

__all__ = [
    "Problem",
    "Search",
    "fastest",
    "forward_time",
    "backward_time",
    "forward_timer",
    "backward_timer",
    "screen_then_confirm",
]

# A candidate made ready to time: called with a number of seconds of samples, it returns its median seconds per call.
Timer = Callable[[float], float]


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


def forward_timer(attention: Callable, xs) -> Timer:
    """``attention(q, k, v)`` under ``jit``, compiled and run once: a ``Timer``."""
    fn, args = jax.jit(attention), tuple(xs[:3])
    jax.block_until_ready(fn(*args))
    return lambda min_time: time_fn(fn, [args], min_time=min_time, warmup=1).median_s


def backward_timer(attention: Callable, xs) -> Timer:
    """``attention``'s backward alone (``jax.vjp`` run beforehand), compiled and run once: a ``Timer``."""
    q, k, v, do = xs
    _, pullback = jax.vjp(attention, q, k, v)
    # The pullback is a pytree of residuals: passed as an argument, not closed
    # over, so that XLA cannot fold any of the backward into constants.
    fn, args = jax.jit(lambda pullback, do: pullback(do)), (pullback, do)
    jax.block_until_ready(fn(*args))
    return lambda min_time: time_fn(fn, [args], min_time=min_time, warmup=1).median_s


def forward_time(attention: Callable, xs) -> float:
    """Median seconds of ``attention(q, k, v)`` under ``jit``."""
    return forward_timer(attention, xs)(0.2)


def backward_time(attention: Callable, xs) -> float:
    """Median seconds of ``attention``'s backward alone (``jax.vjp`` run beforehand)."""
    return backward_timer(attention, xs)(0.2)


def fastest(candidates: Iterable[Any], timer: Callable[[Any], float], log) -> tuple[Any, float]:
    """The fastest candidate and its time; one that fails (e.g. tiles that do not fit) is logged and skipped."""
    best_cfg, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = timer(cfg)
        except Exception as e:  # e.g. a tile that does not fit in shared memory
            log(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if not math.isfinite(t):  # a timer's failure, never a winner
            log(f"    skip {cfg}: its time is {t}")
            continue
        log(f"    {t * 1e3:8.3f} ms  {cfg}")
        if t < best_t:
            best_cfg, best_t = cfg, t
    if best_cfg is None:
        raise RuntimeError("no candidate config compiled")
    return best_cfg, best_t


@dataclasses.dataclass(frozen=True)
class Search:
    """How ``screen_then_confirm`` picks (see the module docstring); ``threads=1`` compiles in the calling thread."""

    top: int = 3
    rounds: int = 5
    margin: float = 0.01
    screen_s: float = 0.1
    confirm_s: float = 0.1
    threads: int = 1

    def __post_init__(self):
        for name in ("top", "rounds", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Search.{name}={value!r} must be an int >= 1")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"Search.margin={self.margin!r} must be in [0, 1)")
        for name in ("screen_s", "confirm_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Search.{name}={getattr(self, name)!r} must be > 0")


def _prepare_all(candidates: Sequence[Any], prepare: Callable[[Any], Timer], log, threads: int) -> list:
    """``(candidate, timer)`` for each candidate that compiles and runs, in the candidates' order."""

    def attempt(cfg):
        try:
            return cfg, prepare(cfg), None
        except Exception as e:  # e.g. a tile that does not fit, a lowering the candidate cannot take
            return cfg, None, e

    if threads > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(attempt, candidates))
    else:
        results = [attempt(cfg) for cfg in candidates]
    ready = []
    for cfg, timer, error in results:
        if error is not None:
            log(f"    skip {cfg}: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
        else:
            ready.append((cfg, timer))
    return ready


def screen_then_confirm(
    candidates: Sequence[Any], prepare: Callable[[Any], Timer], log, *, baseline: Any = None,
    search: Search = Search(),
) -> tuple[Any, float, dict]:
    """The fastest candidate, its time (median over the confirming rounds) and a record of every time taken.

    ``prepare(cfg)`` compiles one candidate and returns its ``Timer``. ``baseline`` (added to the candidates if
    absent) is kept unless a candidate beats it by more than ``search.margin`` in the confirming rounds. The
    record: ``{"screen": {repr(cfg): seconds}, "confirm": {repr(cfg): [seconds per round]}, "baseline": repr,
    "pick": repr}``. ``RuntimeError`` when no candidate compiles.
    """
    candidates = list(candidates)
    if baseline is not None and baseline not in candidates:
        candidates.append(baseline)
    ready = _prepare_all(candidates, prepare, log, search.threads)
    if not ready:
        raise RuntimeError("no candidate config compiled")
    screen = []  # (seconds, candidate, timer)
    for cfg, timer in ready:
        t = timer(search.screen_s)
        if not math.isfinite(t):  # a timer's failure: not a candidate (nor, then, the baseline)
            log(f"    skip {cfg}: its time is {t}")
            continue
        log(f"    {t * 1e3:8.3f} ms  {cfg}")
        screen.append((t, cfg, timer))
    if not screen:
        raise RuntimeError("no candidate config gave a finite time")
    ranked = sorted(screen, key=lambda item: item[0])
    shortlist = ranked[: search.top]
    if baseline is not None and all(cfg != baseline for _, cfg, _ in shortlist):
        shortlist += [item for item in ranked if item[1] == baseline]
    screened = {repr(cfg): t for t, cfg, _ in screen}
    del ranked, ready, screen  # the other candidates' compiled functions and buffers
    rounds: list[list[float]] = [[] for _ in shortlist]  # per shortlisted candidate, its time in each round
    for r in range(search.rounds):
        # Every other round in reverse order, so that no candidate is always timed first or last (the baseline,
        # appended to the shortlist, used to be last in every round: NOTES 68).
        order = range(len(shortlist)) if r % 2 == 0 else reversed(range(len(shortlist)))
        for i in order:
            rounds[i].append(shortlist[i][2](search.confirm_s))
    # a non-finite time in a round (a timer's failure) puts the candidate last
    medians = [statistics.median(times) if all(map(math.isfinite, times)) else math.inf for times in rounds]
    if not any(map(math.isfinite, medians)):
        raise RuntimeError("no shortlisted candidate gave finite times in the confirming rounds")
    best = min(range(len(shortlist)), key=lambda i: medians[i])
    base = next((i for i, (_, cfg, _) in enumerate(shortlist) if cfg == baseline), None)
    if base is not None and best != base and medians[best] > medians[base] * (1.0 - search.margin):
        best = base
    for i, (_, cfg, _) in enumerate(shortlist):
        mark = " <- pick" if i == best else (" (baseline)" if i == base else "")
        log(f"    confirm {medians[i] * 1e3:8.3f} ms over {search.rounds} rounds  {cfg}{mark}")
    record = {
        "screen": screened,
        "confirm": {repr(cfg): times for times, (_, cfg, _) in zip(rounds, shortlist)},
        "baseline": repr(baseline) if baseline is not None else None,
        "pick": repr(shortlist[best][1]),
    }
    return shortlist[best][1], medians[best], record
