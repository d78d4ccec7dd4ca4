"""Context parallelism: ring attention over a sequence sharded across devices.

``ring_attention`` runs inside ``jax.shard_map`` on each device's shard of the
sequence (``[B, T_local, N, H]`` queries, ``[B, T_local, K, H]`` keys and
values). The key/value shards travel around the ring of the ``n`` devices of
``axis_name`` with ``jax.lax.ppermute``: at step ``s`` device ``i`` holds the
shard of device ``(i - s) mod n``, computes the attention of its queries
against it with the kernel backend's ``(out, lse)`` forward, and merges the
partial result into its running ``(out, lse)`` through the log-sum-exp (exact:
``pallas_flash.combine``'s rule). The shard for step ``s + 1`` is sent before
step ``s`` computes, so that XLA can overlap the transfer with the kernels.

Causal: every (query chunk, key chunk) pair is of one of three kinds: the
diagonal (the same chunk: the causal kernel), fully visible (the key chunk
lies before: the plain kernel) or fully hidden (no kernel at all). Which kind
a step is depends on the device index, so steps after the first choose with
``lax.cond`` on ``source < me``; the kernels' specs stay static (position
offsets only matter on the diagonal, where they are known).

Layouts (``pallas_flash.sharding.layout``): ``"contiguous"``, device ``i``
holds positions ``[i T_local, (i + 1) T_local)`` (causal work grows with
``i``); ``"zigzag"``, of ``2n`` chunks device ``i`` holds chunks ``i`` and
``2n - 1 - i`` (the sequence put in order with ``zigzag``), the same causal
work on every device: after the first step a device computes either all its
queries against the arriving early chunk or its late queries against both
arriving chunks, each half a shard squared.

Backward: one ``custom_vjp`` around the whole ring. The forward saves q, k,
v, the final output and log-sum-exp; the backward runs the ring again, calling
the backend's backward kernels with the global ``(out, lse)`` on each
arriving shard (FlashAttention's backward with the final lse gives exactly
that shard's share of the gradients), accumulating dQ at home and sending the
dK/dV accumulators around with the shards: after ``n`` steps each is back on
its own device. Hidden pairs are skipped there too.

``sequence_parallel_attention`` is the glue for global arrays sharded over a
mesh axis: it runs ``ring_attention`` through ``jax.shard_map``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import validate
from pallas_flash.spec import AttentionInputs, AttentionSpec

if TYPE_CHECKING:  # pallas_flash.backends imports op, which imports this package (sharding.partition)
    from pallas_flash.backends.base import KernelBackend

__all__ = ["LAYOUTS", "ring_attention", "sequence_parallel_attention", "sequence_sharding", "SequenceSharding"]

LAYOUTS = ("contiguous", "zigzag")
LN2 = math.log(2.0)


# --- the static plan ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One kernel call of a ring step: local query rows against rows of the key/value shard in hand."""

    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    causal: bool
    shift: int = 0  # q_offset - k_offset of the causal mask (diagonal calls)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Everything static about one ring: hashable, a ``nondiff`` argument of the ``custom_vjp``."""

    axis_name: Hashable
    size: int  # n, devices on the ring
    layout: str
    causal: bool
    seq: int  # T_local
    spec: AttentionSpec  # the per-call spec without causal or offsets
    backend: KernelBackend
    config: Any
    interpret: bool
    with_lse: bool  # the lse is an output too

    @property
    def parts(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    @property
    def chunk(self) -> int:
        return self.seq // self.parts

    def chunks(self, device):
        """Global chunk indices (of ``n * parts`` equal chunks) that ``device``'s shard holds, in order."""
        if self.layout == "zigzag":
            return (device, 2 * self.size - 1 - device)
        return (device,)

    def plan(self) -> tuple[tuple[_Call, ...], tuple[_Call, ...], tuple[_Call, ...]]:
        """Calls of the home step, and of a later step whose shard comes from an earlier / a later device."""
        t, c = self.seq, self.chunk
        everything = (_Call((0, t), (0, t), causal=False),)
        if not self.causal:
            return everything, everything, everything
        if self.layout == "contiguous":
            return (_Call((0, t), (0, t), causal=True),), everything, ()
        home = (_Call((0, c), (0, c), causal=True), _Call((c, t), (0, t), causal=True, shift=c))
        # From device j < i: chunk j precedes both query chunks, chunk 2n-1-j follows both.
        # From j > i: both arriving chunks precede chunk 2n-1-i and follow chunk i.
        return home, (_Call((0, t), (0, c), causal=False),), (_Call((c, t), (0, t), causal=False),)


def _local_lengths(ring: _Ring, lengths, chunks, rows):
    """Valid rows of ``rows`` of a shard holding global ``chunks``, from global ``lengths`` ([B] int32).

    Chunks of a shard are in increasing global order, so its valid rows form a prefix.
    """
    if lengths is None:
        return None
    c = ring.chunk
    total = jnp.zeros_like(lengths)
    for local in range(rows[0] // c, rows[1] // c):
        total = total + jnp.clip(lengths - chunks[local] * c, 0, c)
    return total


def _call_args(ring: _Ring, call: _Call, inputs: AttentionInputs, kv_segment_ids, q_chunks, kv_chunks):
    (qa, qb), (ka, kb) = call.q_rows, call.k_rows
    spec = dataclasses.replace(ring.spec, causal=call.causal, q_offset=call.shift, k_offset=0)
    call_inputs = AttentionInputs(
        q_lengths=_local_lengths(ring, inputs.q_lengths, q_chunks, call.q_rows),
        kv_lengths=_local_lengths(ring, inputs.kv_lengths, kv_chunks, call.k_rows),
        q_segment_ids=None if inputs.q_segment_ids is None else inputs.q_segment_ids[:, qa:qb],
        kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, ka:kb],
    )
    return spec, call_inputs


def _config(ring: _Ring, q, k, spec):
    return ring.config if ring.config is not None else ring.backend.default_config(q, k, spec)


# --- forward --------------------------------------------------------------------------------


def _merge(out_acc, lse_acc, out, lse):
    """Exact merge of two partial results in the log2 domain (float32 ``out_acc``)."""
    top = jnp.maximum(lse_acc, lse)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_acc, w = jnp.exp2(lse_acc - top), jnp.exp2(lse - top)  # 0 where a part sees nothing
    total = w_acc + w
    merged_lse = jnp.where(total == 0, -jnp.inf, top + jnp.log2(total))  # NaN stays NaN
    safe = jnp.where(total == 0, 1.0, total)
    rows = lambda x: jnp.swapaxes(x / safe, 1, 2)[..., None]  # [B, N, T] -> [B, T, N, 1]
    return out_acc * rows(w_acc) + out.astype(jnp.float32) * rows(w), merged_lse


def _put(acc, rows: tuple[int, int], value, axis: int):
    """``acc`` with ``rows`` of ``axis`` replaced by ``value`` (a dynamic-update-slice: XLA:CPU crashes compiling
    the scatter of ``.at[].set`` on an interpret-mode kernel's output inside ``shard_map``)."""
    if rows == (0, acc.shape[axis]):
        return value
    return lax.dynamic_update_slice_in_dim(acc, value, rows[0], axis)


def _forward_step(ring, calls, q, shard, q_chunks, kv_chunks, inputs, acc):
    k, v, kv_seg = shard
    out_acc, lse_acc = acc
    for call in calls:
        (qa, qb), (ka, kb) = call.q_rows, call.k_rows
        spec, call_inputs = _call_args(ring, call, inputs, kv_seg, q_chunks, kv_chunks)
        qc, kc, vc = q[:, qa:qb], k[:, ka:kb], v[:, ka:kb]
        out, lse = ring.backend.forward(qc, kc, vc, call_inputs, spec, config=_config(ring, qc, kc, spec),
                                        interpret=ring.interpret)
        out, lse = _merge(out_acc[:, qa:qb], lse_acc[:, :, qa:qb], out, lse)
        out_acc, lse_acc = _put(out_acc, call.q_rows, out, 1), _put(lse_acc, call.q_rows, lse, 2)
    return out_acc, lse_acc


def _pass_on(ring: _Ring, x):
    """Send ``x`` (a pytree) to the next device of the ring; receive the previous one's."""
    n = ring.size
    return lax.ppermute(x, ring.axis_name, perm=[(d, (d + 1) % n) for d in range(n)])


def _steps(ring: _Ring, step, carry, shard, me, pass_after=None):
    """Run ``step(calls, shard, kv_chunks, carry)`` around the ring (``n`` steps, ``n - 1`` sends of the shard).

    ``pass_after(carry)`` (the backward's travelling dK/dV) is sent after each step, ``n`` times.
    """
    home, earlier, later = ring.plan()
    for s in range(ring.size):
        if s + 1 < ring.size:
            arriving = _pass_on(ring, shard)  # issued before the kernels of this step
        if s == 0:
            carry = step(home, shard, ring.chunks(me), carry)
        else:
            source = (me - s) % ring.size
            chunks = ring.chunks(source)
            if earlier == later:
                carry = step(earlier, shard, chunks, carry)
            else:
                carry = lax.cond(
                    source < me,
                    lambda c: step(earlier, shard, chunks, c),
                    lambda c: step(later, shard, chunks, c),
                    carry,
                )
        if pass_after is not None:
            carry = pass_after(carry)
        if s + 1 < ring.size:
            shard = arriving
    return carry


def _ring_forward(q, k, v, inputs: AttentionInputs, ring: _Ring):
    """``(out [B, T, N, H], lse2 [B, N, T] float32, log2 domain)`` of this device's queries over the whole ring."""
    me = lax.axis_index(ring.axis_name)
    batch, seq, heads, _ = q.shape
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((batch, heads, seq), -jnp.inf, jnp.float32))

    def step(calls, shard, kv_chunks, acc):
        return _forward_step(ring, calls, q, shard, ring.chunks(me), kv_chunks, inputs, acc)

    out, lse2 = _steps(ring, step, acc, (k, v, inputs.kv_segment_ids), me)
    return out.astype(q.dtype), lse2


# --- backward -------------------------------------------------------------------------------


def _backward_step(ring, calls, q, shard, q_chunks, kv_chunks, inputs, out, lse2, do, dlse, grads):
    k, v, kv_seg = shard
    dq, dk, dv = grads
    for call in calls:
        (qa, qb), (ka, kb) = call.q_rows, call.k_rows
        spec, call_inputs = _call_args(ring, call, inputs, kv_seg, q_chunks, kv_chunks)
        qc, kc, vc = q[:, qa:qb], k[:, ka:kb], v[:, ka:kb]
        g = ring.backend.backward(
            qc, kc, vc, out[:, qa:qb], lse2[:, :, qa:qb], do[:, qa:qb], None if dlse is None else dlse[:, :, qa:qb],
            call_inputs, spec, config=_config(ring, qc, kc, spec), interpret=ring.interpret, want_dbias=False,
            want_dslopes=False,
        )
        dq = _put(dq, call.q_rows, dq[:, qa:qb] + g.dq.astype(jnp.float32), 1)
        dk = _put(dk, call.k_rows, dk[:, ka:kb] + g.dk.astype(jnp.float32), 1)
        dv = _put(dv, call.k_rows, dv[:, ka:kb] + g.dv.astype(jnp.float32), 1)
    return dq, dk, dv


@functools.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _ring_backward(q, k, v, inputs, out, lse2, do, dlse, ring: _Ring):
    """dq, dk, dv of the ring. The backward kernels have no derivative (``_no_second_order``)."""
    me = lax.axis_index(ring.axis_name)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

    def step(calls, shard, kv_chunks, grads):
        return _backward_step(ring, calls, q, shard, ring.chunks(me), kv_chunks, inputs, out, lse2, do, dlse, grads)

    def send_dkv(grads):  # the dK/dV accumulators follow their shard; dQ stays home
        dq, dk, dv = grads
        return (dq, *_pass_on(ring, (dk, dv)))

    dq, dk, dv = _steps(ring, step, (zeros(q), zeros(k), zeros(v)), (k, v, inputs.kv_segment_ids), me, send_dkv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _ring_forward_rule(q, k, v, inputs, ring: _Ring):
    """``_ring_forward`` as the VJP's forward rule runs it; differentiating it raises like the backward."""
    return _ring_forward(q, k, v, inputs, ring)


def _no_second_order(ring, primals, tangents):
    raise NotImplementedError(
        f"second-order derivatives (grad of grad, hessian) of ring attention are not implemented: the "
        f"{ring.backend.name!r} backward kernels have no derivative of their own"
    )


_ring_forward_rule.defjvp(_no_second_order)
_ring_backward.defjvp(_no_second_order)


# No symbolic zeros: shard_map outside jit does not implement them for custom_vjp. Whether the lse is
# an output (and so has a cotangent) is static instead (``_Ring.with_lse``).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_op(q, k, v, inputs: AttentionInputs, ring: _Ring):
    out, lse2 = _ring_forward(q, k, v, inputs, ring)
    return (out, lse2 * LN2) if ring.with_lse else out


def _ring_op_fwd(q, k, v, inputs, ring):
    out, lse2 = _ring_forward_rule(q, k, v, inputs, ring)
    return ((out, lse2 * LN2) if ring.with_lse else out), (q, k, v, inputs, out, lse2)


def _ring_op_bwd(ring, residuals, cotangents):
    q, k, v, inputs, out, lse2 = residuals
    do, dlse = cotangents if ring.with_lse else (cotangents, None)
    dq, dk, dv = _ring_backward(q, k, v, inputs, out, lse2, do, dlse, ring)
    return dq, dk, dv, jax.tree.map(lambda _: None, inputs)


_ring_op.defvjp(_ring_op_fwd, _ring_op_bwd)


# --- the public call ------------------------------------------------------------------------


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


def _refuse_unsupported(features: dict) -> None:
    used = [name for name, value in features.items() if value is not None and value is not False and value != 0.0]
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
        dropout_rate: not supported (``NotImplementedError``).

    Returns:
      ``[B, T_local, N, H]`` in ``q``'s dtype (and the lse with ``return_lse``).
    """
    _refuse_unsupported(dict(local_window_size=local_window_size, bias=bias, mask=mask, alibi_slopes=alibi_slopes,
                             logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    backend = _kernel_backend(implementation)
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"ring_attention runs inside jax.shard_map over the sequence axis; axis_name={axis_name!r} is not bound here"
        ) from None
    varying = getattr(getattr(jax.typeof(q), "manual_axis_type", None), "varying", None)
    if varying:
        raise ValueError(
            "ring_attention needs jax.shard_map(..., check_vma=False): the Pallas kernels do not declare how their "
            f"outputs vary over mesh axes (the query varies over {sorted(map(str, varying))})"
        )
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
    if layout == "zigzag" and seq % 2:
        raise ValueError(
            f"the zigzag layout holds two equal chunks per device, so the local length must be even; got q {tuple(q.shape)}"
        )
    backend.supports(q, k, v, inputs, spec)
    if q.shape[0] * seq * q.shape[2] == 0:
        out, lse = jnp.zeros(q.shape, q.dtype), jnp.full((q.shape[0], q.shape[2], seq), -jnp.inf, jnp.float32)
        return (out, lse) if return_lse else out
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if config is not None and not isinstance(config, backend.config_type):
        backend.resolve(q, k, spec, config, interpret)  # raises the backend's TypeError
    ring = _Ring(axis_name, size, layout, bool(is_causal), seq, spec, backend, config, bool(interpret), bool(return_lse))
    return _ring_op(q, k, v, inputs, ring)


# --- global arrays: the shard_map glue ------------------------------------------------------


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
    of the original order. ``options``: ``ring_attention``'s other keywords
    (``is_causal``, ``scale``, ``implementation``, ``config``, ``interpret``...).
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
        raise ValueError(f"sequence parallel attention needs Tq == Tk, got query {tuple(query.shape)} and key {tuple(key.shape)}")
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
    extras = {name: x for name, x in dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                          query_seq_lengths=query_seq_lengths,
                                          key_value_seq_lengths=key_value_seq_lengths).items() if x is not None}
    extra_specs = {name: P(batch_axis, seq_axis) if name.endswith("segment_ids") else P(batch_axis) for name in extras}
    out_specs = (qkv_spec, P(batch_axis, head_axis, seq_axis)) if return_lse else qkv_spec

    def local(q, k, v, extras):
        return ring_attention(q, k, v, axis_name=seq_axis, layout=layout, return_lse=return_lse, **extras, **options)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, extra_specs),
                         out_specs=out_specs, check_vma=False)(query, key, value, extras)
