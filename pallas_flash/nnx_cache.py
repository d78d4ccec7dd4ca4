"""The KV cache of :class:`pallas_flash.nnx.FlashMultiHeadAttention` (autoregressive decoding).

As ``flax.nnx.MultiHeadAttention`` has it:
``init_cache((B, S, features), dtype)`` makes ``cached_key``/``cached_value``
``[B, S, num_kv_heads, head_dim]`` and ``cache_index`` ``int32 [B]`` (``nnx.Cache``
variables). The index is per sequence, so sequences may be ragged. Then:

* ``layer(x, prefill=True)`` starts the cache over: the flash kernel runs
  causal attention over the ``Tq`` tokens of ``x`` alone, their keys and values
  are written at positions ``0 .. Tq-1``, and the index becomes ``Tq`` (or the
  ``key_value_seq_lengths`` given: right-padded prompts of different lengths).
* ``layer(x, decode=True)`` (or ``decode=True`` at construction) appends the
  ``Tq >= 1`` new tokens of each sequence at its index and attends from them
  to everything cached, causally among themselves, with
  :func:`pallas_flash.decode.decode_attention` (``decode_implementation``
  ``"pallas"`` or ``"xla"``).

Both are self-attention and always causal; masks, biases, segment ids and
dropout raise ``NotImplementedError`` there (the layer checks that before it
calls in here). Appending past the cache raises ``ValueError`` when the index
is concrete; under ``jit`` the overflowing sequences' outputs are NaN and
nothing is written out of bounds.

:class:`KVCache` holds the methods; the layer inherits them and owns the
state (``cached_key``, ``cached_value``, ``cache_index``, ``None`` until
:meth:`KVCache.init_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_flash

__all__ = ["KVCache", "check_decode_implementation"]


def check_decode_implementation(implementation) -> None:
    if implementation not in ("pallas", "xla"):
        raise ValueError(f"decode_implementation must be 'pallas' or 'xla', got {implementation!r}")


class KVCache:
    """KV-cache methods of an attention layer with ``num_kv_heads``, ``head_dim``, ``dtype``, ``scale``,
    ``local_window_size``, ``implementation`` and ``decode_implementation`` attributes (a mixin)."""

    def init_cache(self, input_shape: Sequence[int], dtype: Any = None) -> None:
        """Make an empty KV cache for ``input_shape = (batch, max_length, features)``.

        ``cached_key``/``cached_value`` ``[batch, max_length, num_kv_heads,
        head_dim]`` in ``dtype`` (default: the layer's ``dtype``, else float32)
        and ``cache_index`` ``int32 [batch]`` (zeros), all ``nnx.Cache``.
        Calling it again replaces the cache.
        """
        if getattr(self, "context_parallel", None) is not None:
            raise NotImplementedError("the KV cache under context parallelism")
        shape = tuple(input_shape)
        if len(shape) != 3 or any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d <= 0 for d in shape):
            raise ValueError(f"input_shape must be three positive ints (batch, max_length, features), got {input_shape!r}")
        shape = tuple(int(d) for d in shape)  # NumPy integers too, as flax.nnx.MultiHeadAttention takes them
        dtype = jnp.dtype(next((d for d in (dtype, self.dtype) if d is not None), jnp.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"the cache dtype must be a float dtype, got {dtype}")
        cache_shape = (shape[0], shape[1], self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cache_index = nnx.Cache(jnp.zeros((shape[0],), jnp.int32))

    def _cache_shape(self, query: jax.Array) -> tuple[int, int]:
        """``(B, S)`` of the cache, checked against the new tokens ``query [B, Tq, N, H]``."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("the KV cache is not initialised: call init_cache((batch, max_length, features)) first")
        B, S = self.cached_key.shape[:2]
        if query.shape[0] != B or query.shape[1] > S:
            raise ValueError(
                f"the new tokens [batch, length] = {tuple(query.shape[:2])} do not fit the KV cache "
                f"[batch, max_length] = {(B, S)}")
        return B, S

    def _prefill(self, query, key, value, lengths, _implementation):
        """Causal flash attention over the new tokens alone; they become the whole cache."""
        B, _ = self._cache_shape(query)
        Tq = query.shape[1]
        if lengths is None:
            lengths = jnp.full((B,), Tq, jnp.int32)
        elif not isinstance(lengths, jax.core.Tracer):
            given = jnp.asarray(lengths)
            if bool(((given < 0) | (given > Tq)).any()):  # under jit they are clipped to [0, Tq]
                raise ValueError(f"key_value_seq_lengths must be in [0, {Tq}] (the prompt's length) for prefill, "
                                 f"got {given.tolist()}")
        out = pallas_flash.dot_product_attention(
            query, key, value, scale=self.scale, is_causal=True, key_value_seq_lengths=lengths,
            local_window_size=self.local_window_size, implementation=self.implementation,
        )  # [B, Tq, N, H]
        dtype = self.cached_key.dtype
        self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], key.astype(dtype), (0, 0, 0, 0))
        self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...], value.astype(dtype), (0, 0, 0, 0))
        self.cache_index[...] = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, Tq)
        return out

    def _decode(self, query, key, value, _lengths, implementation):
        """Append the new tokens at each sequence's index; ``decode_attention`` over the cache."""
        from pallas_flash.decode import decode_attention

        implementation = implementation or self.decode_implementation
        check_decode_implementation(implementation)
        B, S = self._cache_shape(query)
        Tq = query.shape[1]
        index = self.cache_index[...]  # [B]
        lengths = index + Tq  # [B], the new tokens included
        overflow = lengths > S
        if not isinstance(index, jax.core.Tracer) and bool(overflow.any()):
            raise ValueError(
                f"the KV cache overflows: {Tq} new token(s) after {index.tolist()} cached, max_length {S}")
        dtype = self.cached_key.dtype
        rows = jnp.arange(B)[:, None]  # [B, 1]
        cols = index[:, None] + jnp.arange(Tq)  # [B, Tq]; past the cache: dropped
        self.cached_key[...] = self.cached_key[...].at[rows, cols].set(key.astype(dtype), mode="drop")
        self.cached_value[...] = self.cached_value[...].at[rows, cols].set(value.astype(dtype), mode="drop")
        self.cache_index[...] = lengths
        out = decode_attention(  # clips lengths to S under jit
            query.astype(dtype), self.cached_key[...], self.cached_value[...], lengths, scale=self.scale,
            local_window_size=self.local_window_size, implementation=implementation,
        )  # [B, Tq, N, H]
        return jnp.where(overflow[:, None, None, None], jnp.nan, out)

