"""``pallas_flash.dot_product_attention``: a drop-in for ``jax.nn.dot_product_attention``.

Same signature, layout ``[B, T, N, H]`` and semantics as jax.nn, plus an
``implementation`` that can name the Pallas kernels (``"pallas"``), delegate
to jax.nn (``"xla"``, ``"cudnn"``), or list several to try in order: the first
that does not raise ``NotImplementedError`` wins.

Beyond jax.nn's arguments the Pallas kernels take packed-document segment
ids, ALiBi slopes, a logits soft-cap and attention dropout, all computed inside
the kernels (no ``Tq x Tk`` mask or bias is ever built for them). The
``"xla"``/``"cudnn"`` delegates get segment ids as a mask and ALiBi as a bias;
they have no soft-cap or dropout and raise ``NotImplementedError`` for those.

One deliberate difference from jax.nn's ``"xla"``: a query row that can see no
key at all outputs zeros (jax.nn averages every value uniformly there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_flash import _validate
from pallas_flash import dropout as _dropout
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


def _dense(name: str, x, shape: tuple[int, int, int, int], *, boolean: bool):
    """A mask or bias as a 4-D array whose dims are each 1 or the full ``[B, N, Tq, Tk]`` size."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if boolean and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array (True = attend), got {x.dtype}")
    if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim > 4 or any(d not in (1, full) for d, full in zip((1,) * (4 - x.ndim) + tuple(x.shape), shape)):
        raise ValueError(
            f"{name} must be broadcastable to [batch, heads, q_len, kv_len] = {shape} "
            f"(each dim 1 or full, at most 4 dims), got shape {tuple(x.shape)}"
        )
    return jnp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))


def _slopes(alibi_slopes, batch: int, heads: int):
    if alibi_slopes is None:
        return None
    if not hasattr(alibi_slopes, "shape") or not hasattr(alibi_slopes, "dtype"):
        alibi_slopes = jnp.asarray(alibi_slopes)
    if not jnp.issubdtype(alibi_slopes.dtype, jnp.floating):
        raise TypeError(f"alibi_slopes must have a floating dtype, got {alibi_slopes.dtype}")
    if alibi_slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(
            f"alibi_slopes must have shape [heads] = ({heads},) or [batch, heads] = ({batch}, {heads}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes.reshape((-1, heads))


def _static_float(name: str, value, *, default):
    if value is None:
        return default
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"{name} must be a Python number (static), got {type(value).__name__}") from None


def _soft_cap(logits_soft_cap):
    cap = _static_float("logits_soft_cap", logits_soft_cap, default=None)
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"logits_soft_cap must be a positive finite number, got {logits_soft_cap!r}")
    return cap


def _dropout_args(dropout_rate, dropout_rng):
    rate = _static_float("dropout_rate", dropout_rate, default=0.0)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if rate == 0.0:
        return 0.0, None
    if dropout_rng is None:
        raise ValueError("dropout_rng (a jax.random key) is required when dropout_rate > 0")
    try:
        seed = _dropout.seed_from_key(dropout_rng)
    except (TypeError, ValueError) as e:
        raise TypeError(f"dropout_rng must be a jax.random key, got {getattr(dropout_rng, 'dtype', type(dropout_rng))}: {e}") from None
    return rate, seed


class _Call(NamedTuple):
    """One call's validated arguments, as every implementation receives them."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    scale: float
    is_causal: bool
    q_lengths: jax.Array | None
    kv_lengths: jax.Array | None
    window: tuple[int, int] | None
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    slopes: jax.Array | None
    soft_cap: float | None
    dropout_rate: float
    dropout_seed: jax.Array | None


def _pallas(call: _Call, *, config, interpret):
    query, bias, mask, slopes = call.query, call.bias, call.mask, call.slopes
    _validate.check_kernel_support(query)
    if bias is not None and jnp.dtype(bias.dtype) not in [jnp.dtype(d) for d in _validate.SUPPORTED_DTYPES]:
        raise NotImplementedError(f"the Pallas kernels take a bfloat16, float16 or float32 bias, got {bias.dtype}")
    spec = AttentionSpec(
        scale=call.scale,
        causal=bool(call.is_causal),
        window=call.window,
        has_q_lengths=call.q_lengths is not None,
        has_kv_lengths=call.kv_lengths is not None,
        has_segments=call.q_seg is not None,
        mask_shape=None if mask is None else tuple(mask.shape),
        bias_shape=None if bias is None else tuple(bias.shape),
        has_alibi=slopes is not None,
        soft_cap=call.soft_cap,
        dropout_rate=call.dropout_rate,
    )
    inputs = AttentionInputs(
        call.q_lengths,
        call.kv_lengths,
        call.q_seg,
        call.kv_seg,
        mask=mask,
        bias=bias,
        alibi_slopes=None if slopes is None else slopes.astype(jnp.float32),
        dropout_seed=call.dropout_seed,
    )
    return flash_attention_op(query, call.key, call.value, inputs, spec=spec, config=config, interpret=interpret)


def _alibi_bias(slopes, seq_q: int, seq_k: int):
    """ALiBi as a dense ``[1 or B, N, Tq, Tk]`` bias: ``slope * (j - i)`` (for the jax.nn delegates only)."""
    rel = (jnp.arange(seq_k)[None, :] - jnp.arange(seq_q)[:, None]).astype(jnp.float32)
    return slopes.astype(jnp.float32)[:, :, None, None] * rel


def _jax_nn(call: _Call, *, implementation: str):
    query, key, bias, mask, q_seg, kv_seg = call.query, call.key, call.bias, call.mask, call.q_seg, call.kv_seg
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise NotImplementedError("implementation='cudnn' needs an NVIDIA GPU")
    if call.soft_cap is not None:
        raise NotImplementedError(f"jax.nn {implementation} attention has no logits_soft_cap")
    if call.dropout_rate > 0.0:
        raise NotImplementedError(f"jax.nn {implementation} attention has no attention dropout")
    if q_seg is not None:  # jax.nn has no segment ids: express them as a mask
        seg_mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
        mask = seg_mask if mask is None else (jnp.asarray(mask, bool) & seg_mask)
    if call.slopes is not None:  # nor ALiBi: express it as a bias
        alibi = _alibi_bias(call.slopes, query.shape[1], key.shape[1])
        bias = alibi if bias is None else bias + alibi.astype(bias.dtype)
    try:
        return jax.nn.dot_product_attention(
            query,
            key,
            call.value,
            bias,
            mask,
            scale=call.scale,
            is_causal=call.is_causal,
            query_seq_lengths=call.q_lengths,
            key_value_seq_lengths=call.kv_lengths,
            local_window_size=call.window,
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
    alibi_slopes: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Scaled dot-product attention, ``jax.nn.dot_product_attention``'s drop-in.

    Args:
      query: ``[B, Tq, N, H]``.
      key, value: ``[B, Tk, K, H]``, ``N % K == 0`` (GQA/MQA when ``K < N``).
      bias: additive float logit bias, broadcastable to ``[B, N, Tq, Tk]``
        (each dim 1 or full, as jax.nn); differentiable. The kernels read
        tiles of it in place, never broadcasting it in memory.
      mask: boolean, broadcastable to ``[B, N, Tq, Tk]``; True = attend.
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
      alibi_slopes: float ``[N]`` or ``[B, N]``: adds ``slope * (j - i)`` to the
        logit of query ``i`` and key ``j`` (positions from 0, top-left aligned
        like ``is_causal``; non-positive for the keys a causal query sees when
        the slopes are positive, as in the ALiBi paper). Computed in the
        kernel; differentiable.
      logits_soft_cap: ``cap``: logits become ``cap * tanh(logits / cap)``,
        applied to ``scale * q.k`` before the bias, ALiBi and masks.
      dropout_rate, dropout_rng: attention-weight dropout (``"pallas"`` only):
        each weight is kept with probability ``1 - dropout_rate`` and scaled
        by ``1 / (1 - dropout_rate)``. The keep-mask is a hash of the key and
        the element's (batch, head, query, key) coordinates
        (``pallas_flash.dropout``), regenerated in the backward: the same key
        gives the same result; rate 0 is exactly no dropout.
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
    N = query.shape[2]
    dense_shape = (B, N, Tq, Tk)
    bias = _dense("bias", bias, dense_shape, boolean=False)
    mask = _dense("mask", mask, dense_shape, boolean=True)
    slopes = _slopes(alibi_slopes, B, N)
    soft_cap = _soft_cap(logits_soft_cap)
    dropout_rate, dropout_seed = _dropout_args(dropout_rate, dropout_rng)

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

    call = _Call(
        query, key, value, bias, mask, scale, is_causal, q_lengths, kv_lengths, window, q_seg, kv_seg,
        slopes, soft_cap, dropout_rate, dropout_seed,
    )
    reasons = []
    for impl in order:
        try:
            if impl == "pallas":
                return _pallas(call, config=config, interpret=interpret)
            return _jax_nn(call, implementation=impl)
        except NotImplementedError as e:
            reasons.append(f"{impl}: {e}")
            if auto:
                warnings.warn(f"pallas_flash: falling back from the Pallas kernels to jax.nn xla attention ({e})", stacklevel=2)
    raise NotImplementedError("no implementation supports this call: " + "; ".join(reasons))
