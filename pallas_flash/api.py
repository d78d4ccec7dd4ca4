"""The public entry points: ``dot_product_attention`` (jax.nn's drop-in), ``flash_attention`` and ``attention_with_lse``.

``dot_product_attention`` has jax.nn's signature, layout ``[B, T, N, H]`` and
semantics, plus an ``implementation`` that names a backend
(``pallas_flash.backends``: ``"pallas"`` (= ``"auto"``), ``"triton"`` and
``"mosaic"`` for the Pallas kernels, ``"xla"`` and ``"cudnn"`` for jax.nn) or
lists several to try in order: the first whose ``supports`` does not raise ``NotImplementedError`` wins.

Beyond jax.nn's arguments the Pallas kernels take packed-document segment
ids, ALiBi slopes, a logits soft-cap and attention dropout, all computed inside
the kernels (no ``Tq x Tk`` mask or bias is ever built for them). The
``"xla"``/``"cudnn"`` backends get segment ids as a mask and ALiBi as a bias;
they have no soft-cap or dropout and raise ``NotImplementedError`` for those.

One deliberate difference from jax.nn's ``"xla"``: a query row that can see no
key at all outputs zeros (jax.nn averages every value uniformly there), from
the kernels and from this library's ``"xla"`` backend alike, so that a fallback
does not change it.

Under ``jax.jit`` with sharded inputs the kernel backends partition
(``pallas_flash.sharding.partition``): batch and heads run per shard, and a
query sharded on the sequence runs ring attention over those mesh axes
(context parallelism on the positions in the order given; the output, lse
and gradients stay sharded on the sequence; k/v follow the query's sequence
sharding). The ring implements causal masks, lengths, segment ids and GQA;
for a window, mask, bias, ALiBi, soft-cap, dropout or ``Tq != Tk`` the
sequence is gathered under ``Auto`` mesh axes and the kernels raise
``NotImplementedError`` under ``Explicit`` ones (``implementation=None`` then
falls back to jax.nn's XLA attention, which may refuse the sharding itself).
For the zigzag layout, use
``pallas_flash.sequence_parallel_attention``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_flash import backends, validate
from pallas_flash.backends.base import KernelBackend
from pallas_flash.backends.triton import FlashConfig

__all__ = ["dot_product_attention", "flash_attention", "attention_with_lse"]

_AUTO = ("pallas", "xla")


def implementation_order(implementation) -> tuple[str, ...]:
    """The backend names an ``implementation`` argument tries, in order (``TypeError`` for a malformed one)."""
    if implementation is None:
        return _AUTO
    if isinstance(implementation, str):
        return (implementation,)
    if isinstance(implementation, Sequence) and implementation and all(isinstance(x, str) for x in implementation):
        return tuple(implementation)
    raise TypeError(f"implementation must be None, a string or a non-empty sequence of strings, got {implementation!r}")


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
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, ``jax.nn.dot_product_attention``'s drop-in.

    Args:
      query: ``[B, Tq, N, H]``, or ``[Tq, N, H]`` without a batch axis (as jax.nn; then key and value have
        none either, segment ids are ``[T]`` and lengths ``[1]``).
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
        kernels do not implement), a backend name (``"pallas"`` = ``"auto"``,
        ``"triton"``, ``"mosaic"``, ``"xla"``, ``"cudnn"``), or a sequence of
        these tried in order: the first that does not raise ``NotImplementedError`` is used.
      q_segment_ids, kv_segment_ids: ``int [B, Tq]``, ``int [B, Tk]``: a query
        sees only keys with the same id (packed documents).
      alibi_slopes: float ``[N]`` or ``[B, N]``: adds ``slope * (j - i)`` to the
        logit of query ``i`` and key ``j`` (positions from 0, top-left aligned
        like ``is_causal``; non-positive for the keys a causal query sees when
        the slopes are positive, as in the ALiBi paper). Computed in the
        kernel; differentiable.
      logits_soft_cap: ``cap``: logits become ``cap * tanh(logits / cap)``,
        applied to ``scale * q.k`` before the bias, ALiBi and masks.
      dropout_rate, dropout_rng: attention-weight dropout (Pallas kernels
        only): each weight is kept with probability ``1 - dropout_rate`` and
        scaled by ``1 / (1 - dropout_rate)``. The keep-mask is a hash of the
        key and the element's (batch, head, query, key) coordinates
        (``pallas_flash.dropout``), regenerated in the backward: the same key
        gives the same result; rate 0 is exactly no dropout.
      config: explicit kernel block config of the chosen kernel backend.
      interpret: force Pallas interpret mode on or off (kernel backends only).
      return_residual: also return jax.nn's residual, the log-sum-exp of each
        row's scaled, biased and masked logits (natural log), ``[B, Tq, N]``
        in the key's dtype and without gradient, as jax.nn does; ``-inf`` for
        a row that sees no key (for :func:`combine` and a differentiable lse,
        use :func:`attention_with_lse`).

    Returns:
      ``[B, Tq, N, H]`` in the query's dtype, sharded like the query under
      ``jit`` (a sequence-sharded query runs context-parallel: see the module
      docstring); with ``return_residual``, ``(output, residual)``.
    """
    query, key, value, bias, mask = _as_arrays(query, key, value, bias, mask)
    if jnp.ndim(query) == 3:  # jax.nn's unbatched call: add the batch axis, run, drop it
        if jnp.ndim(key) != 3 or jnp.ndim(value) != 3:
            raise ValueError(f"query {jnp.shape(query)} has rank 3 (no batch axis), so key and value must too, or all "
                             f"have rank 4 [batch, seq, heads, head_dim]; got key {jnp.shape(key)} and value "
                             f"{jnp.shape(value)}")
        batched = lambda x: x if x is None or jnp.ndim(x) != 1 else jnp.asarray(x)[None]  # noqa: E731
        result = dot_product_attention(
            query[None], key[None], value[None], bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, implementation=implementation,
            q_segment_ids=batched(q_segment_ids), kv_segment_ids=batched(kv_segment_ids),
            alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate,
            dropout_rng=dropout_rng, config=config, interpret=interpret, return_residual=return_residual)
        return jax.tree.map(lambda x: x[0], result)
    if not isinstance(return_residual, bool):
        raise TypeError(f"return_residual must be a bool, got {return_residual!r}")
    spec, inputs = validate.attention_call(
        query, key, value, bias, mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        alibi_slopes=alibi_slopes,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    order = implementation_order(implementation)
    chosen = [backends.get(name) for name in order]  # unknown names fail before any work
    reasons = []
    for i, (name, backend) in enumerate(zip(order, chosen)):
        try:
            backend.supports(query, key, value, inputs, spec)
            try:
                if not return_residual:
                    return backend.attention(query, key, value, inputs, spec, config=config, interpret=interpret)
                if isinstance(backend, KernelBackend):
                    out, lse = backend.attention_with_lse(query, key, value, inputs, spec, config=config,
                                                          interpret=interpret)
                    return out, lax.stop_gradient(jnp.swapaxes(lse, 1, 2).astype(key.dtype))  # [B, Tq, N]
                return backend.attention(query, key, value, inputs, spec, return_residual=True)
            except TypeError as e:  # jax.jvp / jax.jacfwd reaching the kernels' custom_vjp
                if not isinstance(backend, KernelBackend) or _FORWARD_MODE_ERROR not in str(e):
                    raise
                raise NotImplementedError(
                    f"the {name} kernels have a custom VJP and no forward-mode derivative (jax.jvp, jax.jacfwd); "
                    "implementation='xla' has one") from e
        except NotImplementedError as e:  # from supports, or from a delegate's own limits (cuDNN)
            reasons.append(f"{name}: {e}")
            if implementation is None and i + 1 < len(order):  # only the automatic choice warns
                warnings.warn(f"pallas_flash: falling back from {name!r} to {order[i + 1]!r} attention ({e})", stacklevel=2)
    raise NotImplementedError("no implementation supports this call: " + "; ".join(reasons))


def _as_arrays(query, key, value, bias, mask):
    """The arrays as JAX arrays (``None`` kept), as jax.nn takes NumPy arrays and lists (NumPy float64 becomes
    float32 unless x64 is on); a ``TypeError`` naming the argument that is not one."""

    def as_array(name: str, x):
        if x is None or isinstance(x, jax.Array):
            return x
        try:
            return jnp.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from None

    return (as_array("query", query), as_array("key", key), as_array("value", value), as_array("bias", bias),
            as_array("mask", mask))


#: What JAX raises when forward-mode autodiff meets a ``jax.custom_vjp`` function (jax 0.11).
_FORWARD_MODE_ERROR = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def _kernel_backend(implementation: str) -> KernelBackend:
    if not isinstance(implementation, str):
        raise TypeError(f"implementation must name one kernel backend (a string), got {implementation!r}")
    backend = backends.get(implementation)
    if not isinstance(backend, KernelBackend):
        raise ValueError(f"implementation must name a kernel backend (with an (out, lse) forward), got {implementation!r}")
    return backend


# ``dot_product_attention``'s keywords that ``attention_with_lse`` takes as ``**features``.
_LSE_FEATURES = frozenset({"bias", "mask", "query_seq_lengths", "key_value_seq_lengths", "q_segment_ids",
                           "kv_segment_ids", "alibi_slopes", "logits_soft_cap", "dropout_rate", "dropout_rng"})


def attention_with_lse(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    implementation: str = "pallas",
    config=None,
    interpret: bool | None = None,
    **features,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one block of a longer sequence: ``(out, lse)``, both differentiable.

    ``q_offset``/``k_offset`` are the global positions of the first query and
    key rows, so the causal and window masks, ALiBi distances and dropout
    bits are those of the block's place in the whole sequence. ``lse``
    (``[B, N, Tq]`` float32, natural log, ``-inf`` for rows that see no key)
    lets partial results over disjoint key blocks be merged exactly with
    ``pallas_flash.combine``. ``features`` takes ``dot_product_attention``'s
    other keywords (lengths, segment ids, mask, bias, ALiBi, soft-cap,
    dropout), which describe the arrays as passed. Under ``jit`` a
    sequence-sharded query runs context-parallel as in
    ``dot_product_attention`` (with a causal mask, only when
    ``q_offset == k_offset``).
    """
    unknown = sorted(set(features) - _LSE_FEATURES)
    if unknown:
        raise TypeError(f"attention_with_lse got unexpected keyword arguments {unknown}; it takes "
                        f"{sorted(_LSE_FEATURES)} besides its own")
    bias, mask = features.pop("bias", None), features.pop("mask", None)
    query, key, value, bias, mask = _as_arrays(query, key, value, bias, mask)
    spec, inputs = validate.attention_call(
        query, key, value, bias, mask,
        scale=scale, is_causal=is_causal, local_window_size=local_window_size,
        q_offset=q_offset, k_offset=k_offset, **features,
    )
    backend = _kernel_backend(implementation)
    backend.supports(query, key, value, inputs, spec)
    return backend.attention_with_lse(query, key, value, inputs, spec, config=config, interpret=interpret)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Exact attention with the Pallas FlashAttention kernels, forward and backward.

    Args:
      q: queries ``[B, Tq, N, H]``.
      k, v: keys and values ``[B, Tk, K, H]`` with ``N % K == 0`` (GQA/MQA when
        ``K < N``; K/V are never repeated in memory).
      causal: query ``i`` attends keys ``j <= i`` (top-left aligned, as
        ``jax.nn.dot_product_attention``'s ``is_causal``, also when Tq != Tk).
      scale: logit scale; ``None`` means ``1/sqrt(H)``.
      config: explicit block sizes, warps and stages for the forward and the
        backward (``pallas_flash.FlashConfig``); ``None`` picks the default.
      interpret: run the kernels in Pallas interpret mode; ``None`` means
        interpret unless the default backend is a GPU.

    Returns:
      ``[B, Tq, N, H]`` in the inputs' dtype.
    """
    return attention_with_lse(q, k, v, scale=scale, is_causal=causal, config=config, interpret=interpret)[0]
