"""Context parallelism, the public calls: ``ring_attention``, ``sequence_parallel_attention``, ``sequence_sharding``.

``ring_attention`` runs inside ``jax.shard_map`` on one device's shard of the
sequence: it checks the call and runs ``pallas_flash.sharding.ring``'s
differentiable ring. The rest is the glue for callers
holding global ``[B, T, N, H]`` arrays whose sequence is sharded over a mesh
axis: ``sequence_parallel_attention`` runs the ring through ``shard_map``
(any layout, zigzag included, with batch and heads sharded on other axes),
and ``sequence_sharding`` reads how an array is laid out when that is known
at trace time.

Without any of this, ``pallas_flash.dot_product_attention`` under ``jit``
on a sequence-sharded query also runs the ring (contiguous layout), through
``pallas_flash.sharding.partition``; this module is for the zigzag layout and
for callers who want the ring spelled out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import validate
from pallas_flash.sharding.ring import LAYOUTS, ring_of, ring_op

if TYPE_CHECKING:  # pallas_flash.backends imports op, which imports this package (sharding.partition)
    from pallas_flash.backends.base import KernelBackend

__all__ = ["ring_attention", "sequence_parallel_attention", "sequence_sharding", "SequenceSharding"]


def _kernel_backend(implementation) -> KernelBackend:
    from pallas_flash import backends
    from pallas_flash.backends.base import KernelBackend

    backend = implementation if isinstance(implementation, KernelBackend) else backends.get(implementation)
    if not isinstance(backend, KernelBackend):
        raise ValueError(
            f"ring attention needs a kernel backend (with an (out, lse) forward and its own backward), got "
            f"implementation={implementation!r}"
        )
    return backend


def _refuse_unsupported(local_window_size, bias, mask, alibi_slopes, logits_soft_cap, dropout_rate) -> None:
    """Refuse the options the ring lacks (``NotImplementedError``), after checking the static ones as
    ``dot_product_attention`` does (``ValueError``/``TypeError``). An array counts as given whatever its value
    (``mask=False`` hides every key), and so does ``local_window_size=0`` (each query sees itself)."""
    given = dict(local_window_size=validate.window(local_window_size), bias=bias, mask=mask,
                 alibi_slopes=alibi_slopes, logits_soft_cap=validate.check_soft_cap(logits_soft_cap),
                 dropout_rate=validate.check_dropout_rate(dropout_rate) or None)
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise NotImplementedError(
            f"ring attention supports causal masking, lengths and segment ids; not {', '.join(used)} "
            "(use dot_product_attention on unsharded sequences for those)"
        )


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: Hashable,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | KernelBackend = "pallas",
    config=None,
    interpret: bool | None = None,
    return_lse: bool = False,
    local_window_size=None,
    bias=None,
    mask=None,
    alibi_slopes=None,
    logits_soft_cap=None,
    dropout_rate: float = 0.0,
):
    """Attention over a sequence sharded across the devices of ``axis_name``; call inside ``jax.shard_map``.

    Args:
      q: this device's queries ``[B, T_local, N, H]``.
      k, v: this device's keys and values ``[B, T_local, K, H]`` (``N % K == 0``).
      axis_name: the mesh axis (or tuple of axes) the sequence is sharded over.
      is_causal: causal over global positions; chunk pairs the mask hides
        entirely are skipped.
      layout: ``"contiguous"`` (device ``i`` holds the ``i``-th ``T_local``
        positions) or ``"zigzag"`` (of ``2n`` chunks device ``i`` holds chunks
        ``i`` and ``2n - 1 - i``: put the sequence in order with
        ``pallas_flash.zigzag(x, n)``; balanced causal work).
      q_segment_ids, kv_segment_ids: ``int [B, T_local]``, this device's shard.
      query_seq_lengths, key_value_seq_lengths: ``int [B]`` global valid
        lengths (positions in the whole sequence, before any zigzag reorder).
      implementation: a kernel backend name (or a ``KernelBackend``).
      config, interpret: as ``dot_product_attention`` (``config`` is used for
        every kernel call; ``None`` picks the default per call shape).
      return_lse: also return the natural log-sum-exp ``[B, N, T_local]``
        (differentiable).
      local_window_size, bias, mask, alibi_slopes, logits_soft_cap,
        dropout_rate: not supported (``NotImplementedError`` for any value
        given, ``mask=False`` and a window of 0 included; an invalid soft-cap,
        window or rate raises ``ValueError`` as ``dot_product_attention``).

    Returns:
      ``[B, T_local, N, H]`` in ``q``'s dtype (and the lse with ``return_lse``).
    """
    _refuse_unsupported(local_window_size, bias, mask, alibi_slopes, logits_soft_cap, dropout_rate)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    backend = _kernel_backend(implementation)
    try:
        lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"ring_attention runs inside jax.shard_map over the sequence axis; axis_name={axis_name!r} is not bound here"
        ) from None
    spec, inputs = validate.attention_call(
        q, k, v, scale=scale, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )
    seq = q.shape[1]
    if k.shape[1] != seq:
        raise ValueError(
            f"ring attention needs queries and keys sharded alike (one local length), got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    backend.supports(q, k, v, inputs, spec)
    if q.shape[0] * seq * q.shape[2] == 0:
        out, lse = jnp.zeros(q.shape, q.dtype), jnp.full((q.shape[0], q.shape[2], seq), -jnp.inf, jnp.float32)
        return (out, lse) if return_lse else out
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if config is not None and hasattr(backend, "adopt"):  # "auto" runs a backend's own config (as the API does)
        config = backend.adopt(config)
    if config is not None and not isinstance(config, backend.config_type):
        backend.resolve(q, k, spec, config, interpret)  # raises the backend's TypeError
    ring = ring_of(dataclasses.replace(spec, causal=bool(is_causal)), q, k, axis_name=axis_name, backend=backend,
                    config=config, interpret=interpret, layout=layout, with_lse=bool(return_lse))
    return ring_op(q, k, v, inputs, ring)


class SequenceSharding(NamedTuple):
    """How ``[B, T, N, H]`` arrays are laid out on a mesh: the mesh axis (or None) of batch, sequence and heads."""

    mesh: Any
    batch: Any
    seq: Any
    heads: Any


def sequence_sharding(x: jax.Array) -> SequenceSharding | None:
    """The layout of ``x`` ``[B, T, N, H]`` when its sequence axis is visibly sharded on a mesh axis, else None.

    Visible means known at trace time: under ``jit``, arrays on mesh axes of
    type ``Explicit`` (``jax.typeof(x).sharding``); outside ``jit``, any
    concrete array with a ``NamedSharding``. Under ``jit`` with ``Auto`` axes
    the compiler decides shardings later, so this returns None.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(x, jax.core.Tracer) and isinstance(getattr(x, "sharding", None), NamedSharding):
        sharding = x.sharding  # concrete: its own sharding, whatever the axis types
    spec = tuple(getattr(sharding, "spec", None) or ())
    if not isinstance(sharding, NamedSharding) or len(spec) < 2 or spec[1] is None:
        return None
    spec += (None,) * (4 - len(spec))
    return SequenceSharding(sharding.mesh, spec[0], spec[1], spec[2])


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    for a in names:
        if a not in mesh.axis_names:
            raise ValueError(f"mesh axis {a!r} is not in the mesh, whose axes are {tuple(mesh.axis_names)}")
    return math.prod(mesh.shape[a] for a in names)


def sequence_parallel_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh=None,
    seq_axis=None,
    batch_axis=None,
    head_axis=None,
    layout: str = "contiguous",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    return_lse: bool = False,
    **options,
):
    """Ring attention on global ``[B, T, N, H]`` arrays whose sequence is sharded over the mesh axis ``seq_axis``.

    Runs ``ring_attention`` through ``jax.shard_map`` over ``mesh``; batch and
    heads may be sharded too (``batch_axis``, ``head_axis``: whole GQA groups
    per shard, so ``K`` must divide by the head axis). The output (and lse)
    comes back sharded the same way; nothing is gathered. With ``mesh`` and
    ``seq_axis`` omitted they are read from ``query``'s sharding
    (``sequence_sharding``: concrete arrays, or ``Explicit`` mesh axes under
    ``jit``). ``layout="zigzag"`` means the arrays are already in zigzag
    order (``pallas_flash.zigzag(x, n)``, ``n`` the size of ``seq_axis``);
    segment ids are in the same order as the arrays, lengths count positions
    of the original order. Under ``Explicit`` mesh axes every input is
    resharded onto the spec the ring takes (``jax.sharding.reshard``: k/v,
    lengths or segment ids may come replicated). ``options``:
    ``ring_attention``'s other keywords (``is_causal``, ``scale``,
    ``implementation``, ``config``, ``interpret``...).
    """
    if mesh is None or seq_axis is None:
        found = sequence_sharding(query)
        if found is None:
            raise ValueError(
                "sequence_parallel_attention needs mesh and seq_axis, or a query whose sequence axis is sharded "
                "visibly (a concrete array, or Explicit mesh axes under jit)"
            )
        mesh = found.mesh if mesh is None else mesh
        seq_axis = found.seq if seq_axis is None else seq_axis
        batch_axis = found.batch if batch_axis is None else batch_axis
        head_axis = found.heads if head_axis is None else head_axis
    validate.attention_call(  # shapes of the global arrays, in global terms
        query, key, value, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
    )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = _axes_size(mesh, seq_axis)
    nb, nh = _axes_size(mesh, batch_axis), _axes_size(mesh, head_axis)
    batch, seq, heads, _ = query.shape
    kv_heads = key.shape[2]
    parts = n * (2 if layout == "zigzag" else 1)
    if key.shape[1] != seq:
        raise NotImplementedError(  # cross-attention over a ring is not built; callers can fall back
            f"sequence parallel attention needs Tq == Tk, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if seq % parts:
        raise ValueError(
            f"the {layout} layout over {n} devices of mesh axis {seq_axis!r} cuts the sequence into {parts} equal "
            f"chunks, but its length is {seq} (query {tuple(query.shape)})"
        )
    if batch % nb:
        raise ValueError(f"batch {batch} does not divide over the {nb} devices of mesh axis {batch_axis!r}")
    if heads % nh or kv_heads % nh:
        raise ValueError(
            f"heads (query {heads}, key/value {kv_heads}) do not divide over the {nh} devices of mesh axis "
            f"{head_axis!r} (each shard keeps whole GQA groups)"
        )
    qkv_spec = P(batch_axis, seq_axis, head_axis, None)
    # As dot_product_attention reads them (int32; lengths clipped, never wrapped), before shard_map splits them.
    batch = query.shape[0]
    q_ids, kv_ids = validate._segments(q_segment_ids, kv_segment_ids, batch, query.shape[1], key.shape[1])
    extras = {name: x for name, x in dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                          query_seq_lengths=validate._lengths("query_seq_lengths", query_seq_lengths,
                                                                              batch),
                                          key_value_seq_lengths=validate._lengths("key_value_seq_lengths",
                                                                                  key_value_seq_lengths, batch),
                                          ).items() if x is not None}
    extra_specs = {name: P(batch_axis, seq_axis) if name.endswith("segment_ids") else P(batch_axis) for name in extras}
    out_specs = (qkv_spec, P(batch_axis, head_axis, seq_axis)) if return_lse else qkv_spec

    def local(q, k, v, extras):
        return ring_attention(q, k, v, axis_name=seq_axis, layout=layout, return_lse=return_lse, **extras, **options)

    args, in_specs = (query, key, value, extras), (qkv_spec, qkv_spec, qkv_spec, extra_specs)
    if AxisType.Explicit in tuple(getattr(mesh, "axis_types", ())):  # shard_map then takes only its in_specs' types
        leaves, tree = jax.tree.flatten(args)
        specs = tree.flatten_up_to(in_specs)
        args = tree.unflatten(jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
