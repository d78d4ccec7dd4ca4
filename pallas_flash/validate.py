"""Argument checks of the public entry points, and the one record they build.

``attention_call`` validates a ``jax.nn.dot_product_attention``-style call and
returns ``(AttentionSpec, AttentionInputs)``: the static description and the
side arrays that every backend reads as they are. User errors raise
``ValueError``/``TypeError`` naming the argument and the shapes; what a
backend does not implement is that backend's ``supports`` to refuse, with
``NotImplementedError``.
"""

from __future__ import annotations

import math
import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_flash import dropout as _dropout
from pallas_flash.spec import AttentionInputs, AttentionSpec

INT32_MAX = 2**31 - 1


def check_array(name: str, x) -> None:
    """``x`` has a shape and a dtype (a JAX or NumPy array), else a ``TypeError`` naming ``name``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def check_qkv(query, key, value) -> None:
    """Shapes and dtypes of ``[B, T, N, H]`` query, key and value."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_array(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    B, _, N, H = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got key {key.shape} and value {value.shape}")
    Bk, _, K, Hk = key.shape
    if Bk != B:
        raise ValueError(f"query and key must have the same batch size, got query {query.shape} and key {key.shape}")
    if Hk != H:
        raise ValueError(f"query and key must have the same head_dim, got query {query.shape} and key {key.shape}")
    if H == 0:  # (the default scale 1/sqrt(head_dim) would divide by zero)
        raise ValueError(f"head_dim must be at least 1, got query {query.shape}")
    if (K == 0 and N != 0) or (K != 0 and N % K != 0):
        raise ValueError(
            f"the number of query heads ({N}) must be a multiple of the number of key/value heads ({K}); "
            f"got query {query.shape} and key {key.shape}"
        )


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a Python number (static), got {type(scale).__name__}; for a learned "
                        "temperature t, pass query * t") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def int_at_least(name: str, value, minimum: int) -> int:
    """``value`` (a Python or NumPy integer, not a bool: what ``operator.index`` takes) as a Python int >= ``minimum``;
    ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def optional_positive_int(name: str, value) -> int | None:
    """``None``, or a positive Python or NumPy integer (not a bool) as a Python int; ``TypeError``/``ValueError``
    naming ``name`` otherwise."""
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be None or a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be None or a positive int, got {value}")
    return int(value)


def window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if is_int(local_window_size):
        left = right = local_window_size
    elif (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(is_int(w) for w in local_window_size)
    ):
        left, right = local_window_size
    else:
        raise TypeError(f"local_window_size must be an int or a pair of ints (left, right), got {local_window_size!r}")
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
    return int(left), int(right)


def _wide_ints(x):
    """``x`` as an array: a JAX array as it is, anything else through NumPy, whose integers keep their width
    (``jnp.asarray`` would wrap int64 to int32 without x64)."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _lengths(name: str, lengths, batch: int):
    if lengths is None:
        return None
    lengths = _wide_ints(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = ({batch},), got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {lengths.dtype}")
    # A length past the sequence is the whole sequence, below 0 none: clip, never wrap. Only a dtype wider than
    # int32 needs it, and the bounds then fit its range (clipping an int8 array to int32's bounds would cast them
    # to int8, where they wrap to 0 and -1).
    info = jnp.iinfo(lengths.dtype)
    if info.min < -INT32_MAX - 1 or info.max > INT32_MAX:
        xp = np if isinstance(lengths, np.ndarray) else jnp
        lengths = xp.clip(lengths, max(info.min, -INT32_MAX - 1), INT32_MAX)
    return jnp.asarray(lengths).astype(jnp.int32)


def _segments(q_segment_ids, kv_segment_ids, batch: int, seq_q: int, seq_k: int):
    if q_segment_ids is None and kv_segment_ids is None:
        return None, None
    if q_segment_ids is None or kv_segment_ids is None:
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    q_ids, kv_ids = _wide_ints(q_segment_ids), _wide_ints(kv_segment_ids)
    for name, ids, t in (("q_segment_ids", q_ids, seq_q), ("kv_segment_ids", kv_ids, seq_k)):
        if ids.shape != (batch, t):
            raise ValueError(f"{name} must have shape [batch, seq] = ({batch}, {t}), got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {ids.dtype}")
        # The kernels compare int32 ids: a wider one would wrap onto another document's. Checked where the
        # values are known (a traced id array of a wider dtype is the caller's to keep in range).
        if ids.dtype != jnp.int32 and ids.size and not isinstance(ids, jax.core.Tracer):
            lo, hi = int(np.min(ids)), int(np.max(ids))
            if lo < -INT32_MAX - 1 or hi > INT32_MAX:
                raise ValueError(f"{name} must fit int32 (the kernels compare int32 ids), got values in [{lo}, {hi}]")
    return jnp.asarray(q_ids).astype(jnp.int32), jnp.asarray(kv_ids).astype(jnp.int32)


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


def check_soft_cap(logits_soft_cap) -> float | None:
    """A static soft-cap: ``None``, or a positive finite Python number."""
    cap = _static_float("logits_soft_cap", logits_soft_cap, default=None)
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"logits_soft_cap must be a positive finite number, got {logits_soft_cap!r}")
    return cap


def check_dropout_rate(dropout_rate, name: str = "dropout_rate") -> float:
    """A static dropout rate in [0, 1) (the Flax module checks its own at construction with this)."""
    rate = _static_float(name, dropout_rate, default=0.0)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_rate!r}")
    return rate


def _dropout_args(dropout_rate, dropout_rng):
    rate = check_dropout_rate(dropout_rate)
    if rate == 0.0:
        return 0.0, None
    if dropout_rng is None:
        raise ValueError("dropout_rng (a jax.random key) is required when dropout_rate > 0")
    try:
        seed = _dropout.seed_from_key(dropout_rng)
    except (TypeError, ValueError) as e:
        raise TypeError(f"dropout_rng must be a jax.random key, got {getattr(dropout_rng, 'dtype', type(dropout_rng))}: {e}") from None
    return rate, seed


def _offset(name: str, value, length: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int (static), got {type(value).__name__}")
    if not 0 <= value <= INT32_MAX - length:
        raise ValueError(f"{name} must be in [0, 2**31 - 1 - length] = [0, {INT32_MAX - length}] (positions are int32), got {value}")
    return value


def attention_call(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    alibi_slopes=None,
    logits_soft_cap=None,
    dropout_rate=0.0,
    dropout_rng=None,
    q_offset: int = 0,
    k_offset: int = 0,
) -> tuple[AttentionSpec, AttentionInputs]:
    """Validate one call; return its static spec and its side arrays."""
    check_qkv(query, key, value)
    B, Tq, N, H = query.shape
    Tk = key.shape[1]
    dense_shape = (B, N, Tq, Tk)
    bias = _dense("bias", bias, dense_shape, boolean=False)
    mask = _dense("mask", mask, dense_shape, boolean=True)
    slopes = _slopes(alibi_slopes, B, N)
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, B, Tq, Tk)
    rate, seed = _dropout_args(dropout_rate, dropout_rng)
    spec = AttentionSpec(
        scale=check_scale(scale, H),
        causal=bool(is_causal),
        window=window(local_window_size),
        has_q_lengths=query_seq_lengths is not None,
        has_kv_lengths=key_value_seq_lengths is not None,
        has_segments=q_seg is not None,
        mask_shape=None if mask is None else tuple(mask.shape),
        bias_shape=None if bias is None else tuple(bias.shape),
        has_alibi=slopes is not None,
        soft_cap=check_soft_cap(logits_soft_cap),
        dropout_rate=rate,
        q_offset=_offset("q_offset", q_offset, Tq),
        k_offset=_offset("k_offset", k_offset, Tk),
    )
    inputs = AttentionInputs(
        q_lengths=_lengths("query_seq_lengths", query_seq_lengths, B),
        kv_lengths=_lengths("key_value_seq_lengths", key_value_seq_lengths, B),
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        mask=mask,
        bias=bias,
        alibi_slopes=None if slopes is None else slopes.astype(jnp.float32),
        dropout_seed=seed,
    )
    return spec, inputs
