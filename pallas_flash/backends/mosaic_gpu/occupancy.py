"""How many CTAs a call's grid gives each SM: the forward for calls whose grid is small, and the order in which the
backward kernels hand out their CTAs.

A causal forward with one CTA per query tile gives its CTAs unequal work (the last rows see every key), so
when each SM gets only a few of them, the last wave leaves SMs idle; a persistent kernel, whose CTAs walk
the tiles longest first, fills them. The three-warpgroup causal forward (192-row tiles, one CTA per tile:
``config._default_forward``, and the H200 table at D=64 4k) was chosen at B*N = 16k tokens and 32 heads,
about 21 CTAs per SM at 4k. With fewer heads it loses to the persistent two-warpgroup forward (H200, bf16,
D=64 causal, forward alone, 7 interleaved rounds, ``benchmarks/experiments/ab_fwd_configs.py``, NOTES 71),
TFLOP/s, three warpgroups one CTA per tile / two warpgroups persistent 128 x 3 (CTAs per SM of the first):
4k B=4 H=12 329 / 368 (8), H=20 348 / 362 (13), B=8 H=12 356 / 356 (16), B=4 H=32 357 / 336 (21); 8k B=2
H=12 385 / 396 (8). GPT-2 124M at T=4096 (B=4, 12 heads) is the first of these.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

__all__ = ["sm_count", "forward_ctas_per_sm", "SMALL_GRID_CTAS_PER_SM", "SMALL_GRID_FORWARD",
           "backward_by_length", "SMALL_GRID_BACKWARD_CTAS_PER_SM", "BY_LENGTH_MAX_TILES", "BACKWARD_HEAD_GROUP",
           "FORWARD_HEAD_GROUP", "PERSISTENT_FORWARD_HEAD_GROUP", "PERSISTENT_FORWARD_SNAKE", "persistent_schedule",
           "cta_work", "persistent_forward_group", "head_group", "group_size"]

# SMs of an H100 SXM / H200, for when no GPU is visible (interpret mode, a CPU tracing for a GPU).
DEFAULT_SM_COUNT = 132
# Under this many CTAs per SM a three-warpgroup causal forward with one CTA per tile gives way to
# ``SMALL_GRID_FORWARD`` (level at 16, +4% at 13, +12% at 8: the table above).
SMALL_GRID_CTAS_PER_SM = 16
# The forward taken then: two compute warpgroups, 128-key blocks in three stages, persistent (as fields, so that
# this module needs no import of ``config``).
SMALL_GRID_FORWARD = dict(block_kv=128, num_stages=3, overlap=False, persistent=True, compute_wgs=2)


@functools.cache
def sm_count() -> int:
    """The first GPU's SM count (``DEFAULT_SM_COUNT`` when there is no GPU or it does not say)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return DEFAULT_SM_COUNT
    count = getattr(devices[0], "core_count", None) if devices else None
    return count if isinstance(count, int) and count > 0 else DEFAULT_SM_COUNT


def forward_ctas_per_sm(batch_heads: int, seq_q: int, rows_per_cta: int, sms: int | None = None) -> float:
    """CTAs per SM of a forward with one CTA per ``rows_per_cta`` query rows, ``batch_heads`` = batch x query heads."""
    tiles = -(-seq_q // rows_per_cta)
    return batch_heads * tiles / (sm_count() if sms is None else sms)


# Under causal, a backward kernel (one CTA per batch row, head and 128-row tile) whose grid gives each SM fewer than
# this many CTAs puts the tile outermost, so that every head's longest tiles start first (``common.backward_grid``).
# With heads outermost the last head's longest tiles start last and the last wave leaves SMs idle. H200, bf16,
# backward alone, 5 interleaved rounds (``benchmarks/experiments/ab_bwd_order.py``, NOTES 73), heads outermost -> this
# rule, TFLOP/s (the dK/dV grid's CTAs per SM): GQA 32:8 D=128 8k B=2 409 -> 423 (7.8; its dQ grid, 31, stays), D=64
# 4k B=4 H=12 307 -> 319 (11.6), D=128 4k B=2 H=16 361 -> 374 (7.8), D=64 8k B=2 H=12 340 -> 344 (11.6); GQA 32:8
# D=128 4k B=4 388 -> 384 (7.8, inside the rounds' spread). Tiles outermost at every grid lost 1-6% from 15.5 CTAs per
# SM up (D=64 4k B=4 H=32: 330 -> 311, B=8 H=12: 323 -> 304), where the CTAs at work at once span more heads and their
# rows fall out of L2.
SMALL_GRID_BACKWARD_CTAS_PER_SM = 14
# ... and only up to this many tiles per head (8k rows): at 16k it lost 2-3% even at 8-12 CTAs per SM (D=128 B=1
# H=8: 471 -> 460; D=64 B=1 H=12: 371 -> 359).
BY_LENGTH_MAX_TILES = 64


def backward_by_length(ctas: int, tiles: int, *, causal: bool, sms: int | None = None) -> bool:
    """Whether a causal backward kernel's grid of ``ctas`` CTAs, ``tiles`` per head, runs tiles outermost
    (``SMALL_GRID_BACKWARD_CTAS_PER_SM``, ``BY_LENGTH_MAX_TILES``)."""
    return (causal and tiles <= BY_LENGTH_MAX_TILES
            and ctas < SMALL_GRID_BACKWARD_CTAS_PER_SM * (sm_count() if sms is None else sms))


# Under causal the backward's two kernels hand out their CTAs by length within groups of this many (batch row, head)
# pairs, group after group: the longest tiles of a group's heads first, then the next length (``common.CtaOrder``).
# Heads outermost leaves a tail (the last head's longest tile starts when its head comes up); tiles outermost streams
# every head's rows at once, past L2 (entry 73's losses above); FlashAttention-3's scheduler goes by length within
# a few heads too. H200, bf16, backward alone, 5 interleaved rounds (``benchmarks/experiments/ab_cta_groups.py``,
# NOTES 76), TFLOP/s, the rules above / groups of 4 / 8 / 16 / cuDNN: D=64 4k B=4 H=32 327 / 328 / 328 / 323 / 330;
# 16k B=1 H=32 364 / 369 / 368 / 363 / 394; D=128 4k B=4 H=16 380 / 393 / 393 / 385 / 399; 16k B=1 H=16 468 / 473 /
# 462 / 454 / 482; D=64 4k B=4 H=12 (GPT-2) 316 / 328 / 311 / 315 / 306; GQA 32:8 D=128 8k B=2 420 / 431 / 423 /
# 421 / 448. None: the small-grid rule alone (``backward_by_length``), which also decides when the pairs have no
# divisor from 2 to the group (a prime count of pairs).
BACKWARD_HEAD_GROUP: int | None = 4
# The one-CTA-per-tile causal forward (not persistent) in such groups too; None: heads outermost. Groups lost there
# (same run, forward alone, heads outermost / groups of 4 / 8): D=128 16k 572 / 553 / 555, D=64 16k 435 / 432 / 427,
# level elsewhere (D=64 4k 357 / 361 / 365, D=128 4k 488 / 486 / 487): so None. The knob stays for A/Bs.
FORWARD_HEAD_GROUP: int | None = None
# The persistent causal forward's order (``forward.py``'s ``tile_coords``; NOTES 105, 107). By length over every pair,
# a head's tiles run about (pairs / SMs) rounds apart; at D=64 causal 1k (512 pairs, 256 KiB of K/V each) its K/V
# leaves L2 between them and every tile reads its K/V from HBM, about 700 MB per call against 256 MB read once.
# ``PERSISTENT_FORWARD_HEAD_GROUP``: by length within groups of that many pairs instead (None: over every pair;
# "auto": ``persistent_forward_group``'s pick). ``PERSISTENT_FORWARD_SNAKE``: every other round hands its tiles to
# the CTAs in reverse, so that a CTA given the longest tile of one round gets the shortest of the next (the CTAs
# stride over the order, so on small grids some get more work than others: GPT-2 124M at T=1024, 7% above the mean
# for the busiest, by ``cta_work``). Measured on an H100 (2026-12-06, forward alone, cuDNN in the same rounds,
# ``benchmarks/experiments/ab_persistent_groups.py``; TFLOP/s over every pair / snake / "auto" / "auto" + snake):
# D=64 causal 1k 258 / 258 / 312 / 305 (cuDNN 275), D=64 causal 2k 312 / 307 / 353 / 359 (341), D=128 causal 1k
# 271 / 270 / 396 / 409 (333), GPT-2 T=1024 276 / 278 / 270 / 284 (253); so "auto" and the snake.
PERSISTENT_FORWARD_HEAD_GROUP: int | str | None = "auto"
PERSISTENT_FORWARD_SNAKE: bool = True
# "auto" groups only when the K/V of all pairs exceeds this (half the L2 of an H100/H200: it is two halves) ...
GROUP_ABOVE_KV_BYTES = 25 * 2**20
# ... and takes the smallest group (of at most this many pairs) whose busiest CTA is within this of the ungrouped's.
AUTO_GROUP_MAX, AUTO_GROUP_SLACK = 64, 0.01


def persistent_schedule(pairs: int, q_tiles: int, group: int | None, ctas: int, snake: bool):
    """``(cta, round, pair, rank)`` per tile of a persistent causal forward, in ``tile_coords``'s order: by length over
    every pair, or within groups of ``group`` pairs; ``rank`` 0 is a pair's longest tile (its last rows). CTA ``c``
    takes position ``round * ctas + c`` (with ``snake``, ``ctas - 1 - c`` in odd rounds)."""
    t = np.arange(pairs * q_tiles)
    if group is None:
        pair, rank = t % pairs, t // pairs
    else:
        in_group = t % (group * q_tiles)
        pair, rank = t // (group * q_tiles) * group + in_group % group, in_group // group
    rounds, lane = t // ctas, t % ctas
    cta = np.where(rounds % 2 == 1, ctas - 1 - lane, lane) if snake else lane
    return cta, rounds, pair, rank


def cta_work(pairs: int, q_tiles: int, group: int | None, ctas: int, snake: bool) -> np.ndarray:
    """Each CTA's share of a persistent causal forward's work (``persistent_schedule``; a tile of rank ``r`` counts
    ``q_tiles - r``, its key blocks at Tq = Tk)."""
    cta, _, _, rank = persistent_schedule(pairs, q_tiles, group, ctas, snake)
    return np.bincount(cta, weights=q_tiles - rank, minlength=ctas)


def persistent_forward_group(pairs: int, q_tiles: int, kv_bytes: int, ctas: int) -> int | None:
    """The group of pairs the persistent causal forward takes its tiles by length within
    (``PERSISTENT_FORWARD_HEAD_GROUP``; None: over every pair). "auto": none while the pairs' K/V (``kv_bytes``, all
    of it) fits ``GROUP_ABOVE_KV_BYTES``; else the smallest divisor of ``pairs`` from 2 to ``AUTO_GROUP_MAX`` whose
    busiest CTA (``cta_work``) is within ``AUTO_GROUP_SLACK`` of the order without groups."""
    knob = PERSISTENT_FORWARD_HEAD_GROUP
    if knob is None:
        return None
    if knob != "auto":
        if isinstance(knob, bool) or not isinstance(knob, int) or knob < 1:
            raise ValueError(f"occupancy.PERSISTENT_FORWARD_HEAD_GROUP must be None, 'auto' or a positive int, "
                             f"got {knob!r}")
        return head_group(pairs, knob)
    if kv_bytes <= GROUP_ABOVE_KV_BYTES:
        return None
    peak = lambda group: cta_work(pairs, q_tiles, group, ctas, PERSISTENT_FORWARD_SNAKE).max()
    limit = peak(None) * (1 + AUTO_GROUP_SLACK)
    return next((g for g in range(2, min(AUTO_GROUP_MAX, pairs - 1) + 1) if pairs % g == 0 and peak(g) <= limit),
                None)


def head_group(pairs: int, target: int | None) -> int | None:
    """``group_size``'s group for a kernel's ``head_group`` argument: None for no groups (no target, or a group of
    one pair, which is heads outermost)."""
    group = 1 if target is None else group_size(pairs, target)
    return None if group == 1 else group


def group_size(batch_heads: int, target: int) -> int:
    """The largest divisor of ``batch_heads`` at most ``target`` (groups of equal size: a grid is a box)."""
    return max(d for d in range(1, min(target, batch_heads) + 1) if batch_heads % d == 0)
