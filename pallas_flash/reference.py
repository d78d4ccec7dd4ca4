"""The one reference implementation: plain ``jax.numpy``, any precision.

Tests run it in float64 on the CPU; it materialises the full ``[B, N, Tq, Tk]``
logits, so it is for checking, not for speed. It follows the library's
semantics, which are ``jax.nn.dot_product_attention``'s, with one deliberate
difference: a query row that can see no key (every logit masked) outputs zeros
and gets zero gradients, where jax.nn would average all values uniformly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["attention_reference", "visibility_mask"]


def visibility_mask(
    seq_q: int,
    seq_k: int,
    *,
    batch: int,
    causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    mask=None,
    q_offset: int = 0,
    k_offset: int = 0,
):
    """Boolean ``[B, 1 or N, Tq, Tk]``: True where query i may attend key j.

    Causal and window compare global positions (``q_offset + i``, ``k_offset + j``);
    lengths compare the arrays' rows.
    """
    qi = jnp.arange(seq_q)[:, None]
    kj = jnp.arange(seq_k)[None, :]
    gi, gj = qi + q_offset, kj + k_offset
    vis = jnp.ones((batch, 1, seq_q, seq_k), dtype=bool)
    if causal:
        vis = vis & (gj <= gi)
    if local_window_size is not None:
        # A side wider than every distance between positions is no limit: clipped there, so that int32 positions
        # cannot overflow (a window of 2**31 - 1, "no limit", would wrap ``gi - left``).
        reach = seq_q + seq_k + abs(q_offset) + abs(k_offset)
        left, right = (min(int(w), reach) for w in local_window_size)
        vis = vis & (gj >= gi - left) & (gj <= gi + right)
    if query_seq_lengths is not None:
        vis = vis & (qi < jnp.asarray(query_seq_lengths)[:, None, None, None])
    if key_value_seq_lengths is not None:
        vis = vis & (kj < jnp.asarray(key_value_seq_lengths)[:, None, None, None])
    if q_segment_ids is not None:
        qs = jnp.asarray(q_segment_ids)[:, None, :, None]
        ks = jnp.asarray(kv_segment_ids)[:, None, None, :]
        vis = vis & (qs == ks)
    if mask is not None:
        vis = vis & jnp.asarray(mask, dtype=bool)
    return vis


def attention_reference(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    alibi_slopes=None,
    logits_soft_cap: float | None = None,
    dropout_mask=None,
    dropout_rate: float = 0.0,
    return_lse: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
):
    """Attention on ``[B, T, N, H]`` inputs in the inputs' own dtype.

    Logits: ``scale * q.k``, then ``cap * tanh(logits / cap)`` with
    ``logits_soft_cap``, then ``+ bias`` and ``+ slope[b, h] * (j - i)`` with
    ``alibi_slopes`` (``[N]`` or ``[B, N]``; query ``i``, key ``j`` counted
    from 0, top-left aligned like ``is_causal``), then the masks.
    ``dropout_mask``, when given, is the boolean keep-mask ``[B, N, Tq, Tk]``
    (the kernels generate theirs in place with ``pallas_flash.dropout``; tests
    pass ``pallas_flash.dropout.full_keep_mask`` here): kept weights are scaled
    by ``1 / (1 - dropout_rate)``, after the softmax.
    ``q_offset``/``k_offset`` place the arrays' rows in a longer sequence
    (``pallas_flash.attention_with_lse``): causal, window and ALiBi use the
    global positions.
    Returns the output ``[B, Tq, N, H]`` and, with ``return_lse``, the natural
    log-sum-exp ``[B, N, Tq]`` (``-inf`` for rows that see no key).
    """
    B, Tq, N, H = query.shape
    _, Tk, K, _ = key.shape
    G = N // K
    if scale is None:
        scale = 1.0 / np.sqrt(H)
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    k = jnp.repeat(key, G, axis=2)
    v = jnp.repeat(value, G, axis=2)
    logits = jnp.einsum("bqnh,bknh->bnqk", query, k) * scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    if bias is not None:
        logits = logits + jnp.asarray(bias, logits.dtype)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, logits.dtype)
        slopes = slopes.reshape((1, N) if slopes.ndim == 1 else (B, N))[:, :, None, None]
        rel = (jnp.arange(Tk)[None, :] + k_offset - jnp.arange(Tq)[:, None] - q_offset).astype(logits.dtype)
        logits = logits + slopes * rel
    vis = visibility_mask(
        Tq,
        Tk,
        batch=B,
        causal=is_causal,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        q_offset=q_offset,
        k_offset=k_offset,
    )
    vis = jnp.broadcast_to(vis, logits.shape)
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    masked = jnp.where(vis, logits, neg)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    row_max = jax.lax.stop_gradient(row_max)
    e = jnp.where(vis, jnp.exp(masked - row_max), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    # A row that sees no key has denom == 0 exactly; NaN (from a NaN or infinite logit or value) stays.
    safe = jnp.where(denom != 0, denom, 1.0)
    probs = e / safe
    if dropout_mask is not None and dropout_rate > 0.0:
        probs = jnp.where(dropout_mask, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)
    if not return_lse:
        return out
    lse = jnp.where(denom[..., 0] != 0, jnp.log(safe[..., 0]) + row_max[..., 0], -jnp.inf)
    return out, lse
