"""``pallas_flash.dot_product_attention``: a drop-in for ``jax.nn.dot_product_attention``.

Same signature, layout ``[B, T, N, H]`` and semantics as jax.nn, plus an
``implementation`` that can name the Pallas kernels (``"pallas"``), delegate
to jax.nn (``"xla"``, ``"cudnn"``), or list several to try in order: the first
that does not raise ``NotImplementedError`` wins.

One deliberate difference from jax.nn's ``"xla"``: a query row that can see no
key at all outputs zeros (jax.nn averages every value uniformly there).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_flash import _validate
from pallas_flash.attention import flash_attention_op
from pallas_flash.config import FlashConfig
from pallas_flash.spec import AttentionInputs, AttentionSpec

__all__ = ["dot_product_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("pallas", "xla", "cudnn")


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
        left = right = local_window_size
    elif (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in local_window_size)
    ):
        left, right = local_window_size
    else:
        raise TypeError(f"local_window_size must be an int or a pair of ints (left, right), got {local_window_size!r}")
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
    return int(left), int(right)


def _lengths(name: str, lengths, batch: int):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = ({batch},), got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {lengths.dtype}")
    return lengths.astype(jnp.int32)


def _segments(q_segment_ids, kv_segment_ids, batch: int, seq_q: int, seq_k: int):
    if q_segment_ids is None and kv_segment_ids is None:
        return None, None
    if q_segment_ids is None or kv_segment_ids is None:
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    for name, ids, t in (("q_segment_ids", q_ids, seq_q), ("kv_segment_ids", kv_ids, seq_k)):
        if ids.shape != (batch, t):
            raise ValueError(f"{name} must have shape [batch, seq] = ({batch}, {t}), got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {ids.dtype}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _pallas(query, key, value, bias, mask, *, scale, is_causal, q_lengths, kv_lengths, window, q_seg, kv_seg, config, interpret):
    _validate.check_kernel_support(query)
    if bias is not None or mask is not None:
        raise NotImplementedError("the Pallas kernels do not take a dense bias or mask yet")
    spec = AttentionSpec(
        scale=scale,
        causal=bool(is_causal),
        window=window,
        has_q_lengths=q_lengths is not None,
        has_kv_lengths=kv_lengths is not None,
        has_segments=q_seg is not None,
    )
    inputs = AttentionInputs(q_lengths, kv_lengths, q_seg, kv_seg)
    return flash_attention_op(query, key, value, inputs, spec=spec, config=config, interpret=interpret)


def _jax_nn(query, key, value, bias, mask, *, scale, is_causal, q_lengths, kv_lengths, window, q_seg, kv_seg, implementation):
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise NotImplementedError("implementation='cudnn' needs an NVIDIA GPU")
    if q_seg is not None:  # jax.nn has no segment ids: express them as a mask
        seg_mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
        mask = seg_mask if mask is None else (jnp.asarray(mask, bool) & seg_mask)
    try:
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=scale,
            is_causal=is_causal,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
            local_window_size=window,
            implementation=implementation,
        )
    except (ValueError, TypeError) as e:
        if implementation == "cudnn":  # cuDNN's own limits (head dims, dtypes, masks)
            raise NotImplementedError(f"jax.nn cudnn attention does not support this call: {e}") from e
        raise


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | Sequence[str] | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Scaled dot-product attention, ``jax.nn.dot_product_attention``'s drop-in.

    Args:
      query: ``[B, Tq, N, H]``.
      key, value: ``[B, Tk, K, H]``, ``N % K == 0`` (GQA/MQA when ``K < N``).
      bias, mask: as jax.nn (``xla``/``cudnn`` only for now).
      scale: logit scale, ``None`` for ``1/sqrt(H)``.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, also for Tq != Tk).
      query_seq_lengths, key_value_seq_lengths: ``int [B]`` valid lengths.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right``.
      implementation: ``None`` (the Pallas kernels, in interpret mode where
        there is no GPU, falling back to ``"xla"`` with a warning for what the
        kernels do not implement), ``"pallas"``, ``"xla"``, ``"cudnn"``, or a
        sequence of these tried in order: the first that does not raise
        ``NotImplementedError`` is used.
      q_segment_ids, kv_segment_ids: ``int [B, Tq]``, ``int [B, Tk]``: a query
        sees only keys with the same id (packed documents).
      config: explicit kernel block config (``"pallas"`` only).
      interpret: force Pallas interpret mode on or off (``"pallas"`` only).

    Returns:
      ``[B, Tq, N, H]`` in the query's dtype.
    """
    _validate.check_qkv(query, key, value)
    B, Tq, _, H = query.shape
    Tk = key.shape[1]
    scale = _validate.check_scale(scale, H)
    window = _window(local_window_size)
    q_lengths = _lengths("query_seq_lengths", query_seq_lengths, B)
    kv_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths, B)
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, B, Tq, Tk)

    auto = implementation is None
    if auto:
        order: tuple[str, ...] = ("pallas", "xla")
    elif isinstance(implementation, str):
        order = (implementation,)
    elif isinstance(implementation, Sequence) and implementation:
        order = tuple(implementation)
    else:
        raise TypeError(f"implementation must be None, a string or a non-empty sequence of strings, got {implementation!r}")
    for impl in order:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} (or a sequence of them), got {impl!r}")

    common = dict(
        scale=scale, is_causal=is_causal, q_lengths=q_lengths, kv_lengths=kv_lengths, window=window, q_seg=q_seg, kv_seg=kv_seg
    )
    reasons = []
    for impl in order:
        try:
            if impl == "pallas":
                return _pallas(query, key, value, bias, mask, config=config, interpret=interpret, **common)
            return _jax_nn(query, key, value, bias, mask, implementation=impl, **common)
        except NotImplementedError as e:
            reasons.append(f"{impl}: {e}")
            if auto:
                warnings.warn(f"pallas_flash: falling back from the Pallas kernels to jax.nn xla attention ({e})", stacklevel=2)
    raise NotImplementedError("no implementation supports this call: " + "; ".join(reasons))
