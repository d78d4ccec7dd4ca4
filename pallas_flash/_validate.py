"""Argument checks shared by the public entry points.

User errors raise ``ValueError``/``TypeError`` naming the argument and the
shapes; combinations the kernels do not implement raise
``NotImplementedError`` so that callers can fall back to another
implementation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_qkv(query, key, value) -> None:
    """Shapes and dtypes of ``[B, T, N, H]`` query, key and value."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
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
    if N % K != 0:
        raise ValueError(
            f"the number of query heads ({N}) must be a multiple of the number of key/value heads ({K}); "
            f"got query {query.shape} and key {key.shape}"
        )


def check_kernel_support(query) -> None:
    """What the Pallas kernels implement; anything else is ``NotImplementedError``."""
    H = query.shape[-1]
    if not MIN_HEAD_DIM <= H <= MAX_HEAD_DIM:
        raise NotImplementedError(
            f"the Pallas kernels support head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got query {query.shape}"
        )
    if jnp.dtype(query.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        raise NotImplementedError(f"the Pallas kernels support bfloat16, float16 and float32, got {query.dtype}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a Python number (static), got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale
