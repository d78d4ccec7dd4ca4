"""Flax NNX layers on top of :func:`pallas_flash.dot_product_attention`.

Two ways in:

* :class:`FlashMultiHeadAttention`: a self-contained multi-head attention
  layer (query/key/value/output projections, grouped-query attention, causal
  masking, dropout, masks and segment ids passed straight to the kernel). Its
  parameters are laid out exactly like ``flax.nnx.MultiHeadAttention``'s
  (``query``, ``key``, ``value``, ``out``, each a ``LinearGeneral``), so a
  state can be moved between the two with ``nnx.update``.
* :func:`make_attention_fn` / :data:`flash_attention_fn` (in
  :mod:`pallas_flash.nnx_attention_fn`, re-exported here): an ``attention_fn``
  for ``flax.nnx.MultiHeadAttention``, so an existing Flax model switches to
  the flash kernel with one argument::

      attn = nnx.MultiHeadAttention(
          num_heads=8, in_features=512,
          attention_fn=pallas_flash.nnx.make_attention_fn(is_causal=True),
          decode=False, rngs=nnx.Rngs(0))

Differences from Flax's default attention, all because the kernel never
materialises the ``[B, N, Tq, Tk]`` attention weights:

* ``sow_weights=True`` (Flax passes ``module=``) raises ``ValueError``.
* ``precision`` is ignored: the kernel accumulates in float32.
* ``broadcast_dropout`` is ignored: the Pallas kernels draw an independent
  keep bit per (batch, head, query, key) from a hash of the dropout key.
  Dropout arguments are only forwarded to
  :func:`pallas_flash.dot_product_attention` when dropout is actually on
  (``dropout_rate > 0`` and not ``deterministic``); jax.nn's ``"xla"`` and
  ``"cudnn"`` have no attention dropout and raise ``NotImplementedError``.
* A query row that can see no key at all outputs zeros (Flax averages all
  values uniformly).

KV cache (autoregressive decoding), as ``flax.nnx.MultiHeadAttention`` has it:
``init_cache((B, S, features), dtype)``, then ``layer(x, prefill=True)`` (the
flash kernel over the prompt) and ``layer(x, decode=True)``
(:func:`pallas_flash.decode.decode_attention` over the cache); see
:mod:`pallas_flash.nnx_cache`.

Context parallelism: ``FlashMultiHeadAttention(...,
context_parallel=ContextParallel(mesh, seq_axis="seq", batch_axis="data"))``
runs the layer's self-attention as ring attention over the devices of the
mesh axis ``seq_axis``, on inputs whose sequence is sharded over it (in zigzag
order by default); see :mod:`pallas_flash.nnx_parallel`. Attention dropout,
masks, biases, windows and the KV cache raise ``NotImplementedError`` there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_flash
from pallas_flash import api, backends, validate
from pallas_flash.nnx_attention_fn import Implementation, dropout_kwargs, flash_attention_fn, make_attention_fn
from pallas_flash.nnx_cache import KVCache, check_decode_implementation
from pallas_flash.nnx_parallel import ContextParallel
from pallas_flash.validate import check_dropout_rate

__all__ = [
    "ContextParallel",
    "FlashMultiHeadAttention",
    "flash_attention_fn",
    "make_attention_fn",
]

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


def _as_rngs(rngs) -> nnx.Rngs:
    """``nnx.Rngs`` as given, or built from a ``jax.random`` key or an int seed."""
    if isinstance(rngs, nnx.Rngs):
        return rngs
    if isinstance(rngs, int) and not isinstance(rngs, bool):
        return nnx.Rngs(rngs)
    if isinstance(rngs, jax.Array) and (jax.dtypes.issubdtype(rngs.dtype, jax.dtypes.prng_key) or rngs.shape == (2,)):
        return nnx.Rngs(rngs)
    raise TypeError(f"rngs must be a flax.nnx.Rngs, a jax.random key or an int seed, got {type(rngs).__name__}")




class FlashMultiHeadAttention(KVCache, nnx.Module):
    """Multi-head (and grouped-query) attention backed by the flash kernel.

    Input ``[B, T, features]``; output ``[B, Tq, out_features]``. Parameters
    match ``flax.nnx.MultiHeadAttention`` with the same arguments (modules
    ``query``/``key``/``value`` with kernel ``[in, heads, head_dim]`` and
    ``out`` with kernel ``[heads, head_dim, out]``).

    Args:
      num_heads: query heads.
      in_features: features of ``inputs_q``.
      qkv_features: total query width (``num_heads * head_dim``); defaults to
        ``in_features``.
      out_features: output width; defaults to ``in_features``.
      num_kv_heads: key/value heads (grouped-query attention when smaller than
        ``num_heads``; must divide it). Defaults to ``num_heads``.
      in_kv_features: features of ``inputs_k``/``inputs_v``; defaults to
        ``in_features``.
      is_causal: apply a causal mask by default (a call may override).
      dropout_rate: attention-probability dropout (the Pallas kernels;
        jax.nn's backends have none and raise ``NotImplementedError``).
      deterministic: default for the call's ``deterministic``.
      implementation: forwarded to :func:`pallas_flash.dot_product_attention`.
      local_window_size: sliding-window attention, forwarded to the kernel.
      scale: logit scale; ``None`` means ``1/sqrt(head_dim)``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` infers it.
      param_dtype: parameter dtype.
      use_bias: biases in the four projections.
      kernel_init, bias_init: initialisers for the projections.
      out_kernel_init, out_bias_init: for the output projection when it
        should differ (e.g. GPT-2's scaled residual init).
      decode: default for the call's ``decode`` (use the KV cache; see the
        module docstring and :meth:`init_cache`).
      decode_implementation: ``decode_attention``'s implementation for decode
        calls, ``"pallas"`` or ``"xla"``; a call may override it.
      context_parallel: a :class:`ContextParallel`: self-attention runs as
        ring attention over a sequence sharded on its mesh axis (the
        ``implementation`` must then be one Pallas kernel backend; ``None``
        means ``"pallas"``). No attention dropout or KV cache with it.
      rngs: ``nnx.Rngs`` for initialisation (and, with dropout, a ``dropout``
        stream that is kept for calls without ``rngs``); a ``jax.random`` key
        or an int seed is taken as ``nnx.Rngs(rngs)``.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        is_causal: bool = False,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        implementation: Implementation = None,
        local_window_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        kernel_init: nnx.Initializer = _default_kernel_init,
        bias_init: nnx.Initializer = _default_bias_init,
        out_kernel_init: nnx.Initializer | None = None,
        out_bias_init: nnx.Initializer | None = None,
        decode: bool = False,
        decode_implementation: str = "pallas",
        context_parallel: ContextParallel | None = None,
        rngs: nnx.Rngs | jax.Array | int,
    ):
        for name, value in (("num_heads", num_heads), ("in_features", in_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rngs = _as_rngs(rngs)
        validate.window(local_window_size)  # fail here, not at the first call
        for name in api.implementation_order(implementation):
            backends.get(name)
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                f"({num_kv_heads})"
            )
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) must be divisible by num_heads "
                f"({num_heads})"
            )
        check_dropout_rate(dropout_rate)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
        if not isinstance(decode, bool):
            raise TypeError(f"decode must be a bool, got {decode!r}")
        check_decode_implementation(decode_implementation)
        if context_parallel is not None:
            implementation = _check_context_parallel(context_parallel, implementation, dropout_rate, decode)

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.in_features = in_features
        self.in_kv_features = in_kv_features
        self.qkv_features = qkv_features
        self.out_features = out_features
        self.head_dim = qkv_features // num_heads
        self.is_causal = is_causal
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.implementation = implementation
        self.local_window_size = local_window_size
        self.scale = scale
        self.dtype = dtype
        self.param_dtype = param_dtype

        def proj(in_f, heads):
            return nnx.LinearGeneral(
                in_f,
                (heads, self.head_dim),
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                rngs=rngs,
            )

        # [B, T, in] -> [B, T, heads, head_dim]
        self.query = proj(in_features, num_heads)
        self.key = proj(in_kv_features, num_kv_heads)
        self.value = proj(in_kv_features, num_kv_heads)
        # [B, T, heads, head_dim] -> [B, T, out]
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim),
            out_features,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=out_kernel_init or kernel_init,
            bias_init=out_bias_init or bias_init,
            rngs=rngs,
        )
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None
        self.decode = decode
        self.decode_implementation = decode_implementation
        self.context_parallel = context_parallel
        # The KV cache (init_cache): [B, S, K, H] keys and values, int32 [B] lengths.
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | tuple[int] | None = None,
        max_length: int | None = None,
    ) -> None:
        """What ``nnx.view(model, deterministic=..., decode=...)`` sets, as for ``nnx.MultiHeadAttention``:
        ``deterministic`` (dropout off), ``decode`` (the KV cache by default); turning ``decode`` on without a
        cache makes one for ``batch_size`` x ``max_length`` tokens (``init_cache``)."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and self.cached_key is None:
                if batch_size is None or max_length is None:
                    raise TypeError("batch_size and max_length must be given to make the KV cache (decode=True)")
                if isinstance(batch_size, tuple):
                    if len(batch_size) != 1:
                        raise NotImplementedError(f"one batch axis in the KV cache, got batch_size {batch_size}")
                    (batch_size,) = batch_size
                self.init_cache((batch_size, max_length, self.in_features))

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool | None = None,
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        query_seq_lengths: jax.Array | None = None,
        key_value_seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        decode: bool | None = None,
        prefill: bool = False,
        decode_implementation: str | None = None,
    ) -> jax.Array:
        """Attend from ``inputs_q`` to ``inputs_k``/``inputs_v``.

        Args:
          inputs_q: ``[B, Tq, in_features]``.
          inputs_k: ``[B, Tk, in_kv_features]``; defaults to ``inputs_q``.
          inputs_v: defaults to ``inputs_k``.
          mask: boolean, broadcastable to ``[B, num_heads, Tq, Tk]`` (True =
            attend), passed to the kernel.
          bias: additive logit bias, broadcastable to ``[B, num_heads, Tq, Tk]``.
          is_causal: overrides the constructor's ``is_causal``.
          q_segment_ids, kv_segment_ids: int ``[B, Tq]`` / ``[B, Tk]``; a query
            only sees keys of its own segment (packed sequences).
          query_seq_lengths, key_value_seq_lengths: int ``[B]`` valid lengths.
          deterministic: disable dropout; overrides the constructor's.
          rngs: dropout randomness; defaults to the stream kept at init.
          decode: append the new tokens to the KV cache and attend over it
            (overrides the constructor's ``decode``); see the module docstring.
          prefill: start the KV cache over with these tokens (flash kernel).
          decode_implementation: overrides the constructor's for this call.

        Returns:
          ``[B, Tq, out_features]``.
        """
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_k must be given when inputs_v is given")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        for name, x, feat in (
            ("inputs_q", inputs_q, self.in_features),
            ("inputs_k", inputs_k, self.in_kv_features),
            ("inputs_v", inputs_v, self.in_kv_features),
        ):
            if x.ndim != 3 or x.shape[-1] != feat:
                raise ValueError(
                    f"{name} must have shape [batch, length, {feat}], got {x.shape}"
                )

        query = self.query(inputs_q)  # [B, Tq, N, H]
        key = self.key(inputs_k)  # [B, Tk, K, H]
        value = self.value(inputs_v)  # [B, Tk, K, H]

        if deterministic is None:
            deterministic = self.deterministic
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            if deterministic is None:
                raise ValueError(
                    "deterministic must be given (to __call__ or the constructor) "
                    "when dropout_rate > 0"
                )
            stream = rngs if rngs is not None else self.rngs
            if isinstance(stream, nnx.Rngs):
                stream = stream.dropout
            dropout_rng = stream()
        dropout = dropout_kwargs(self.dropout_rate, dropout_rng, deterministic)

        if prefill or (self.decode if decode is None else decode):
            if self.context_parallel is not None:
                raise NotImplementedError("the KV cache (prefill/decode) under context parallelism")
            unsupported = dict(mask=mask, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               query_seq_lengths=query_seq_lengths, dropout=dropout or None)
            if not prefill:
                unsupported["key_value_seq_lengths"] = key_value_seq_lengths
            given = [name for name, x in unsupported.items() if x is not None]
            if given:
                raise NotImplementedError(f"{', '.join(given)} with the KV cache ({'prefill' if prefill else 'decode'})")
            if key.shape[:2] != query.shape[:2]:
                raise ValueError(
                    f"with the KV cache inputs_k/inputs_v must be the new tokens of inputs_q: [batch, length] "
                    f"{tuple(query.shape[:2])}, got {tuple(key.shape[:2])}")
            attend = self._prefill if prefill else self._decode
            x = attend(query, key, value, key_value_seq_lengths, decode_implementation)
            return self.out(x.astype(query.dtype))  # [B, Tq, out_features]

        causal = self.is_causal if is_causal is None else bool(is_causal)
        if self.context_parallel is not None:  # ring attention over the mesh's sequence axis
            x = self.context_parallel.attend(
                query, key, value, is_causal=causal, scale=self.scale, implementation=self.implementation,
                refused=dict(mask=mask, bias=bias, local_window_size=self.local_window_size),
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            )  # [B, Tq, N, H]
            return self.out(x)  # [B, Tq, out_features]
        if mask is not None:
            mask = mask.astype(jnp.bool_)
        # Everything else goes to the API as it is: it validates and names the argument.
        x = pallas_flash.dot_product_attention(
            query,
            key,
            value,
            bias=bias,
            mask=mask,
            scale=self.scale,
            is_causal=causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=self.local_window_size,
            implementation=self.implementation,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            **dropout,
        )  # [B, Tq, N, H]
        return self.out(x)  # [B, Tq, out_features]


def _check_context_parallel(context_parallel, implementation, dropout_rate, decode) -> str:
    """What context parallelism needs of the layer; returns the one kernel backend the ring runs."""
    if not isinstance(context_parallel, ContextParallel):
        raise TypeError(
            f"context_parallel must be a pallas_flash.nnx.ContextParallel or None, got {type(context_parallel).__name__}")
    if dropout_rate > 0:
        raise NotImplementedError(
            f"attention dropout (dropout_rate={dropout_rate}) under context parallelism: ring attention has none")
    if decode:
        raise NotImplementedError("the KV cache (decode=True) under context parallelism")
    names = ("pallas",) if implementation is None else api.implementation_order(implementation)
    if len(names) != 1 or not isinstance(backends.get(names[0]), backends.KernelBackend):
        kernels = [n for n in backends.names() if isinstance(backends.get(n), backends.KernelBackend)]
        raise ValueError(
            "context parallelism runs ring attention on a Pallas kernel backend: implementation must be None or "
            f"one of {kernels}, got {implementation!r}")
    return names[0]
