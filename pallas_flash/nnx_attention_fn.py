"""``attention_fn`` for ``flax.nnx.MultiHeadAttention`` backed by pallas_flash (re-exported by :mod:`pallas_flash.nnx`).

:func:`make_attention_fn` adapts :func:`pallas_flash.dot_product_attention` to
Flax's ``attention_fn`` signature (leading batch dims flattened, masks and
biases made 4-D, dropout forwarded only when it is on);
:data:`flash_attention_fn` is the one with automatic backend choice. The
differences from Flax's default attention are listed in :mod:`pallas_flash.nnx`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes

import pallas_flash
from pallas_flash.validate import check_dropout_rate

__all__ = ["Implementation", "flash_attention_fn", "make_attention_fn", "dropout_kwargs"]

Implementation = str | Sequence[str] | None


def dropout_kwargs(dropout_rate, dropout_rng, deterministic) -> dict[str, Any]:
    """Dropout arguments for the kernel: none at all whenever dropout is off.

    They are only passed when dropout is on, so that the common no-dropout call
    works with every backend (and every version of the API).
    """
    check_dropout_rate(dropout_rate)
    if deterministic or dropout_rate == 0.0:
        return {}
    if dropout_rng is None:
        raise ValueError(
            "dropout_rng is required when dropout_rate > 0 and deterministic=False"
        )
    return {"dropout_rate": float(dropout_rate), "dropout_rng": dropout_rng}


def _as_4d(x: jax.Array | None, batch_shape: tuple[int, ...], name: str):
    """Bring a ``[batch..., N or 1, Tq, Tk]`` mask/bias to one batch axis."""
    if x is None:
        return None
    rank = len(batch_shape) + 3
    if x.ndim > rank:
        raise ValueError(
            f"{name} has shape {x.shape}, which has more axes than "
            f"[batch..., heads, q_length, kv_length] (rank {rank})"
        )
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    if len(batch_shape) == 1:
        return x
    x = jnp.broadcast_to(x, batch_shape + x.shape[-3:])
    return x.reshape((math.prod(batch_shape),) + x.shape[-3:])


def make_attention_fn(
    implementation: Implementation = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Callable[..., jax.Array]:
    """Return an ``attention_fn`` for ``flax.nnx.MultiHeadAttention``.

    Args:
      implementation: forwarded to :func:`pallas_flash.dot_product_attention`:
        ``None`` (auto), ``"pallas"``, ``"xla"``, ``"cudnn"`` or a sequence
        tried in order.
      is_causal: apply a causal mask to every self-attention call (query and
        key/value of one length), in addition to the ``is_causal`` that Flax
        passes per call (they are OR-ed). A call whose lengths differ gets
        only what Flax passes: in a decode step over ``nnx.MultiHeadAttention``'s
        cache Flax passes ``is_causal=False`` and a mask of the slots written
        so far, and a causal mask there (aligned top-left, as in
        ``jax.nn.dot_product_attention``) would hide every key but the first.
      scale: logit scale; ``None`` means ``1/sqrt(head_dim)`` like Flax.
      local_window_size: sliding window, forwarded to the kernel, for calls
        whose query and key/value have one length. Other calls raise
        ``NotImplementedError``: in a decode step over
        ``nnx.MultiHeadAttention``'s cache the query's position in the cache
        is not passed to ``attention_fn``, and the window (measured from query
        row 0) would be wrong. ``FlashMultiHeadAttention`` decodes with
        windows over its own cache.

    The returned function takes Flax's calling convention: ``query, key,
    value`` of shape ``[batch..., length, heads, head_dim]`` (key/value may have
    fewer heads), then ``bias``, ``mask`` (broadcastable to ``[batch...,
    heads, q_length, kv_length]``; True = attend), ``broadcast_dropout``,
    ``dropout_rng``, ``dropout_rate``, ``deterministic``, ``dtype``,
    ``precision``, ``module``, ``promote_dtype`` and ``is_causal``.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    default_causal = is_causal

    def attention_fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: nnx.Module | None = None,
        promote_dtype: Callable[..., Any] = _flax_dtypes.promote_dtype,
        is_causal: bool = False,
    ) -> jax.Array:
        del broadcast_dropout, precision  # see the module docstring
        if module is not None:
            raise ValueError(
                "sow_weights=True is not supported by the flash attention_fn: "
                "the kernel never materialises the attention weights"
            )
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
        if query.ndim < 3:
            raise ValueError(
                f"query must be [batch..., length, heads, head_dim], got shape "
                f"{query.shape}"
            )
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"query, key and value must have the same rank, got shapes "
                f"{query.shape}, {key.shape}, {value.shape}"
            )
        if local_window_size is not None and query.shape[-3] != key.shape[-3]:
            raise NotImplementedError(
                f"local_window_size={local_window_size!r} with query length {query.shape[-3]} != key/value length "
                f"{key.shape[-3]} (query {query.shape}, key {key.shape}): in a decode step over "
                "nnx.MultiHeadAttention's cache the window would be measured from query row 0, not from the "
                "query's position in the cache; use pallas_flash.nnx.FlashMultiHeadAttention, whose KV cache "
                "decodes with windows"
            )
        dropout = dropout_kwargs(dropout_rate, dropout_rng, deterministic)

        out_shape = query.shape[:-1] + value.shape[-1:]
        batch_shape = query.shape[:-3] or (1,)
        flat_b = math.prod(batch_shape)

        def to_4d(x):
            return x.reshape((flat_b,) + x.shape[-3:])

        if mask is not None:
            mask = mask.astype(jnp.bool_)
        out = pallas_flash.dot_product_attention(
            to_4d(query),
            to_4d(key),
            to_4d(value),
            bias=_as_4d(bias, batch_shape, "bias"),
            mask=_as_4d(mask, batch_shape, "mask"),
            scale=scale,
            is_causal=bool(is_causal or (default_causal and query.shape[-3] == key.shape[-3])),
            local_window_size=local_window_size,
            implementation=implementation,
            **dropout,
        )
        return out.reshape(out_shape)

    attention_fn.__name__ = "flash_attention_fn"
    attention_fn.__qualname__ = "flash_attention_fn"
    return attention_fn


#: ``make_attention_fn()`` with automatic backend choice, ready to pass as
#: ``attention_fn=pallas_flash.nnx.flash_attention_fn``.
flash_attention_fn = make_attention_fn()
