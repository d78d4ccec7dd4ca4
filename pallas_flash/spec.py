"""The static description of one attention call, shared by every backend.

``AttentionSpec`` holds everything a kernel is specialised on (compiled per
value): scale, causal and window shape, the position offsets of the query and
key arrays, which optional per-batch inputs are present, the soft-cap and the
dropout rate. The dynamic inputs (lengths, segment ids, mask, bias, ALiBi
slopes, dropout seed) travel as arrays in ``AttentionInputs``. The public API
validates the call and builds both once (``validate.attention_call``); every
backend reads the same two records.

Every optional feature is a static field, so a kernel compiled without it
contains no trace of it: the plain path is the same code as before.
``DefaultConfig`` marks a call whose caller passed no config: its kernels take
the default for the arrays they run on (a device's shard, under sharding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name

LOG2E = math.log2(math.e)

#: The names the kernels' residuals carry (``jax.ad_checkpoint.checkpoint_name``): the forward's output and its
#: log-sum-exp, all the backward needs beyond q, k and v. Under ``jax.checkpoint`` with
#: ``jax.checkpoint_policies.save_only_these_names(*CHECKPOINT_NAMES)`` (or a policy naming them among others)
#: they are saved, and the backward does not run the forward kernels again; any policy that saves neither reruns
#: them. Both are needed: saving the output alone still reruns the forward for the log-sum-exp.
CHECKPOINT_NAMES = ("pallas_flash_attention_out", "pallas_flash_attention_lse")


def named_residuals(out, lse2):
    """``(out, lse2)`` under ``CHECKPOINT_NAMES`` (the identity outside ``jax.checkpoint``)."""
    return checkpoint_name(out, CHECKPOINT_NAMES[0]), checkpoint_name(lse2, CHECKPOINT_NAMES[1])


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
    # Dense mask / bias: the 4-D shape of the array as passed to the kernels,
    # each dim either 1 (broadcast) or the full [B, N, Tq, Tk] size.
    mask_shape: tuple[int, int, int, int] | None = None
    bias_shape: tuple[int, int, int, int] | None = None
    # ALiBi: logits += slope[b, h] * (j - i); the slopes are float32 [1 or B, N].
    has_alibi: bool = False
    # logits = cap * tanh(logits / cap), applied to the scaled q.k before bias/ALiBi.
    soft_cap: float | None = None
    # Probability of dropping an attention weight; 0 means no dropout at all.
    dropout_rate: float = 0.0
    # Global positions of row 0 of the query and key arrays: a block of a longer
    # sequence (ring attention, split-K decoding) gets the causal/window mask,
    # ALiBi distances and dropout bits of its place in the whole. Lengths,
    # segment ids, masks and biases still describe the arrays as passed.
    q_offset: int = 0
    k_offset: int = 0
    # (Tq, Tk) of the arrays, set by a kernel launcher (``within``): ``left`` and
    # ``right`` are then clamped to bounds that change no visibility, so that
    # block arithmetic never overflows int32 for windows or offsets up to 2**31 - 1.
    clip_to: tuple[int, int] | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_shape is not None

    @property
    def has_bias(self) -> bool:
        return self.bias_shape is not None

    @property
    def has_dropout(self) -> bool:
        return self.dropout_rate > 0.0

    def features(self) -> dict[str, str]:
        """The optional features this call uses, by key, each with the phrase errors name it by.

        Keys: ``window``, ``mask``, ``bias``, ``lengths``, ``segments``, ``alibi``,
        ``soft_cap``, ``dropout``, ``offsets``. A backend or a parallel scheme that
        lacks some refuses a call with the phrases of those present.
        """
        present = {
            "window": (self.window is not None, "a local window"),
            "mask": (self.has_mask, "a mask"),
            "bias": (self.has_bias, "a bias"),
            "lengths": (self.has_q_lengths or self.has_kv_lengths, "sequence lengths"),
            "segments": (self.has_segments, "segment ids"),
            "alibi": (self.has_alibi, "ALiBi slopes"),
            "soft_cap": (self.soft_cap is not None, "a logits soft-cap"),
            "dropout": (self.has_dropout, "dropout"),
            "offsets": (bool(self.q_offset or self.k_offset), "position offsets"),
        }
        return {key: phrase for key, (used, phrase) in present.items() if used}

    @property
    def plain_logits(self) -> bool:
        """Logits are just ``scale * q.k`` (no soft-cap, bias or ALiBi)."""
        return self.soft_cap is None and not self.has_bias and not self.has_alibi

    @property
    def shift(self) -> int:
        """``q_offset - k_offset``: add it to a local ``j - i`` bound to get the global one."""
        return self.q_offset - self.k_offset

    @property
    def right(self) -> int | None:
        """The largest visible ``j - i`` in array rows (offsets folded in), or None when unbounded."""
        r = None
        if self.window is not None:
            r = self.window[1]
        if self.causal:
            r = 0 if r is None else min(r, 0)
        if r is None:
            return None
        r += self.shift
        if self.clip_to is not None:  # j - i lies in [1 - Tq, Tk - 1]
            r = min(max(r, -self.clip_to[0]), self.clip_to[1])
        return r

    @property
    def left(self) -> int | None:
        """The largest visible ``i - j`` in array rows (offsets folded in), or None when unbounded."""
        if self.window is None:
            return None
        left = self.window[0] - self.shift
        if self.clip_to is not None:  # i - j lies in [1 - Tk, Tq - 1]
            left = min(max(left, -self.clip_to[1]), self.clip_to[0])
        return left

    def within(self, seq_q: int, seq_k: int) -> "AttentionSpec":
        """This spec for arrays of ``seq_q`` queries and ``seq_k`` keys (``left``/``right`` clamped)."""
        return dataclasses.replace(self, clip_to=(seq_q, seq_k))


class AttentionInputs(NamedTuple):
    """Per-call arrays beside q, k, v (each may be None)."""

    q_lengths: jax.Array | None = None  # int32 [B]
    kv_lengths: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, Tq]
    kv_segment_ids: jax.Array | None = None  # int32 [B, Tk]
    mask: jax.Array | None = None  # bool, spec.mask_shape
    bias: jax.Array | None = None  # float, spec.bias_shape
    alibi_slopes: jax.Array | None = None  # float32 [1 or B, N]
    dropout_seed: jax.Array | None = None  # uint32 [2]


@dataclasses.dataclass(frozen=True)
class DefaultConfig:
    """The config of a call whose caller passed none: ``config`` is the default for the whole arrays. The kernels
    take their backend's default for the arrays they run on instead (``KernelBackend.shard_config``, called by
    ``sharding.partition``): a device's shard may hold fewer batch rows and heads than the call, and a config can
    depend on those (the Mosaic forward's small-grid rule). ``config`` stays in the static arguments, so that a
    change of the default (a new tuned cache, ``XLA_FLAGS``) makes a new trace."""

    config: Any
