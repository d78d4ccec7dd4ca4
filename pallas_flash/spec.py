"""The static description of one attention call, shared by every backend.

``AttentionSpec`` holds everything a kernel is specialised on (compiled per
value): scale, causal and window shape, which optional per-batch inputs are
present. The dynamic inputs (lengths, segment ids) travel as arrays in
``AttentionInputs``. Backends read both; the public API builds them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    scale: float
    causal: bool = False
    # (left, right) window, keys j with i - left <= j <= i + right. With
    # ``causal`` the right side is folded to min(right, 0) by ``make``.
    window: tuple[int, int] | None = None
    has_q_lengths: bool = False
    has_kv_lengths: bool = False
    has_segments: bool = False

    @property
    def right(self) -> int | None:
        """The largest j - i that is visible, or None when unbounded."""
        r = None
        if self.window is not None:
            r = self.window[1]
        if self.causal:
            r = 0 if r is None else min(r, 0)
        return r

    @property
    def left(self) -> int | None:
        """The largest i - j that is visible, or None when unbounded."""
        return None if self.window is None else self.window[0]

    @property
    def needs_block_ranges(self) -> bool:
        return self.has_segments


class AttentionInputs(NamedTuple):
    """Per-call arrays beside q, k, v (each may be None)."""

    q_lengths: jax.Array | None = None  # int32 [B]
    kv_lengths: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, Tq]
    kv_segment_ids: jax.Array | None = None  # int32 [B, Tk]
