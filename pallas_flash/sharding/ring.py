"""Context parallelism: the ring over a sequence sharded across devices.

The ring runs inside ``jax.shard_map`` on each device's shard of the
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
``lax.cond`` on ``source < me``; the kernels' specs stay static, and no call
needs a position offset (a diagonal call pairs a chunk with itself).

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

The two halves are public as functions of one device's arrays:
``ring_forward`` (``(out, lse2)``, log2 domain) and ``ring_backward``
(``(dq, dk, dv)``) take the call's ``AttentionSpec`` and kernel backend, as a
backend's own ``forward``/``backward`` do. ``ring_op`` (a ``custom_vjp``
around both) is what ``ring_attention`` runs; ``pallas_flash.sharding.partition``
runs the halves when a call under ``jit`` has its sequence sharded (the
automatic path). ``ring_limits`` says which calls they cannot run. The public
calls (``ring_attention`` inside ``shard_map``, ``sequence_parallel_attention``
on global arrays) are in ``pallas_flash.sharding.context``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_flash.sharding import vma
from pallas_flash.spec import AttentionInputs, AttentionSpec, named_residuals

if TYPE_CHECKING:  # pallas_flash.backends imports op, which imports this package (sharding.partition)
    from pallas_flash.backends.base import KernelBackend

__all__ = ["LAYOUTS", "ring_of", "ring_op", "ring_forward", "ring_backward", "ring_limits"]

LAYOUTS = ("contiguous", "zigzag")
LN2 = math.log(2.0)


# --- the static plan ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One kernel call of a ring step: local query rows against rows of the key/value shard in hand."""

    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    causal: bool  # a diagonal pair: the same global chunk(s) on both sides, so no position offset


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
    mesh_axes: tuple = ()  # the mesh's axis names in its order, where the caller knows them (else the context's)

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
        # Home: each chunk against itself (the causal kernel), and the late queries against the early keys.
        # Three calls rather than two, so that none needs a position offset (which the Mosaic kernels lack).
        home = (_Call((0, c), (0, c), causal=True), _Call((c, t), (c, t), causal=True),
                _Call((c, t), (0, c), causal=False))
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
    spec = dataclasses.replace(ring.spec, causal=call.causal)
    call_inputs = AttentionInputs(
        q_lengths=_local_lengths(ring, inputs.q_lengths, q_chunks, call.q_rows),
        kv_lengths=_local_lengths(ring, inputs.kv_lengths, kv_chunks, call.k_rows),
        q_segment_ids=None if inputs.q_segment_ids is None else inputs.q_segment_ids[:, qa:qb],
        kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, ka:kb],
    )
    return spec, call_inputs


def _config(ring: _Ring, q, k, v, inputs, spec):
    """The ring's config, or (None) the backend's default for this chunk pair's arrays."""
    return ring.config if ring.config is not None else ring.backend.shard_config(q, k, v, inputs, spec)


@functools.lru_cache(maxsize=256)
def _kernel(backend, kind: str, spec: AttentionSpec, config, interpret: bool):
    """The backend's ``forward`` or ``backward`` for one static call, in a ``jax.jit`` of its own.

    Every layer of a model, and every step of a ring, makes the same few calls; as one jitted function each they
    share one traced jaxpr, which JAX lowers once per module instead of once per call site (the Pallas lowering is
    most of a context-parallel model's compile time).
    """
    if kind == "forward":
        def run(q, k, v, inputs):
            return backend.forward(q, k, v, inputs, spec, config=config, interpret=interpret)
    else:
        def run(q, k, v, out, lse2, do, dlse, inputs):
            return backend.backward(q, k, v, out, lse2, do, dlse, inputs, spec, config=config, interpret=interpret,
                                    want_dbias=False, want_dslopes=False)
    # In a check_vma=True shard_map the results vary over the inputs' mesh axes (``vma``).
    return jax.jit(functools.partial(vma.run_kernels, run))


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


def _untouched(rows: tuple[int, int], written: list) -> bool:
    """Whether ``rows`` overlap none of the row ranges in ``written`` (then appended)."""
    fresh = all(rows[1] <= a or b <= rows[0] for a, b in written)
    written.append(rows)
    return fresh


def _forward_step(ring, calls, q, shard, q_chunks, kv_chunks, inputs, acc, home=False):
    """The step's calls merged into ``acc``; in the ``home`` step (the first) rows no call has written yet take the
    kernel's result as it is (there is nothing to merge it with)."""
    k, v, kv_seg = shard
    out_acc, lse_acc = acc
    written = [] if home else [(0, q.shape[1])]
    for call in calls:
        (qa, qb), (ka, kb) = call.q_rows, call.k_rows
        spec, call_inputs = _call_args(ring, call, inputs, kv_seg, q_chunks, kv_chunks)
        qc, kc, vc = q[:, qa:qb], k[:, ka:kb], v[:, ka:kb]
        forward = _kernel(ring.backend, "forward", spec, _config(ring, qc, kc, vc, call_inputs, spec), ring.interpret)
        out, lse = forward(qc, kc, vc, call_inputs)
        if _untouched(call.q_rows, written):
            out = out.astype(jnp.float32)
        else:
            out, lse = _merge(out_acc[:, qa:qb], lse_acc[:, :, qa:qb], out, lse)
        out_acc, lse_acc = _put(out_acc, call.q_rows, out, 1), _put(lse_acc, call.q_rows, lse, 2)
    return out_acc, lse_acc


def _pass_on(ring: _Ring, x):
    """Send ``x`` (a pytree) to the next device of the ring; receive the previous one's.

    Over several mesh axes the ring's order is ``lax.axis_index(axis_name)``'s (the caller's order of the axes),
    while ``ppermute`` wants the axes in the mesh's order: positions are mapped from the one to the other."""
    n, names = ring.size, ring.axis_name
    if not isinstance(names, tuple):
        return lax.ppermute(x, names, perm=[(d, (d + 1) % n) for d in range(n)])
    # A custom_partitioning callback runs with no mesh in the context unless the caller set one: it passes its own.
    mesh_axes = ring.mesh_axes or jax.sharding.get_abstract_mesh().axis_names
    mesh_order = tuple(a for a in mesh_axes if a in names)
    order = mesh_order if sorted(mesh_order) == sorted(names) else names
    sizes = {a: lax.axis_size(a) for a in names}

    def position(r):  # ring position r (names' order) -> its index in ``order``
        coords = {}
        for a in reversed(names):
            r, coords[a] = divmod(r, sizes[a])
        return functools.reduce(lambda i, a: i * sizes[a] + coords[a], order, 0)

    return lax.ppermute(x, order, perm=[(position(d), position((d + 1) % n)) for d in range(n)])


def _run_step(ring: _Ring, step, s: int, me, shard, carry, axes=frozenset()):
    """Step ``s`` of the ring on the shard in hand: ``step(calls, shard, kv_chunks, carry, home)`` with the calls of
    the home step (``s == 0``, the device's own shard), or of an earlier / a later device's shard (chosen with
    ``lax.cond`` on the device index when they differ). ``axes``: the mesh axes the step's arrays vary over in a
    check_vma=True shard_map (``vma``); both branches' results are typed so (one may skip its kernels)."""
    home, earlier, later = ring.plan()
    if s == 0:
        return step(home, shard, ring.chunks(me), carry, True)
    source = (me - s) % ring.size
    chunks = ring.chunks(source)
    if earlier == later:
        return step(earlier, shard, chunks, carry, False)
    axes = axes | vma.varying(me, carry)
    return lax.cond(
        source < me,
        lambda c: vma.to_varying(step(earlier, shard, chunks, c, False), axes),
        lambda c: vma.to_varying(step(later, shard, chunks, c, False), axes),
        vma.to_varying(carry, axes),
    )


def _ring_forward(q, k, v, inputs: AttentionInputs, ring: _Ring):
    """``(out [B, T, N, H], lse2 [B, N, T] float32, log2 domain)`` of this device's queries over the whole ring."""
    me = lax.axis_index(ring.axis_name)
    batch, seq, heads, _ = q.shape
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((batch, heads, seq), -jnp.inf, jnp.float32))

    def step(calls, shard, kv_chunks, acc, home):
        return _forward_step(ring, calls, q, shard, ring.chunks(me), kv_chunks, inputs, acc, home)

    shard = (k, v, inputs.kv_segment_ids)
    for s in range(ring.size):  # n steps, n - 1 sends of the K/V shard
        if s + 1 < ring.size:
            arriving = _pass_on(ring, shard)  # issued before this step's kernels, which it overlaps
        acc = _run_step(ring, step, s, me, shard, acc, vma.varying(q, k, v, inputs))
        if s + 1 < ring.size:
            shard = arriving
    out, lse2 = acc
    return out.astype(q.dtype), lse2


# --- backward -------------------------------------------------------------------------------


def _backward_step(ring, calls, q, shard, q_chunks, kv_chunks, inputs, out, lse2, do, dlse, grads, home=False):
    """The step's gradients: dQ added to ``grads``' (set where the ``home`` step has not written yet); dK/dV
    of the shard in hand into ``grads``' fresh (zero) ones, which the ring adds to the travelling accumulators."""
    k, v, kv_seg = shard
    dq, dk, dv = grads
    q_written, k_written = ([] if home else [(0, q.shape[1])]), []
    for call in calls:
        (qa, qb), (ka, kb) = call.q_rows, call.k_rows
        spec, call_inputs = _call_args(ring, call, inputs, kv_seg, q_chunks, kv_chunks)
        qc, kc, vc = q[:, qa:qb], k[:, ka:kb], v[:, ka:kb]
        backward = _kernel(ring.backend, "backward", spec, _config(ring, qc, kc, vc, call_inputs, spec), ring.interpret)
        g = backward(qc, kc, vc, out[:, qa:qb], lse2[:, :, qa:qb], do[:, qa:qb],
                     None if dlse is None else dlse[:, :, qa:qb], call_inputs)
        add = lambda acc, rows, g, first: g.astype(jnp.float32) if first else acc[:, rows[0]:rows[1]] + g
        dq = _put(dq, call.q_rows, add(dq, call.q_rows, g.dq, _untouched(call.q_rows, q_written)), 1)
        k_first = _untouched(call.k_rows, k_written)
        dk = _put(dk, call.k_rows, add(dk, call.k_rows, g.dk, k_first), 1)
        dv = _put(dv, call.k_rows, add(dv, call.k_rows, g.dv, k_first), 1)
    return dq, dk, dv


@functools.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _ring_backward(q, k, v, inputs, out, lse2, do, dlse, ring: _Ring):
    """dq, dk, dv of the ring. The backward kernels have no derivative (``_no_second_order``)."""
    me = lax.axis_index(ring.axis_name)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

    def step(calls, shard, kv_chunks, grads, home):
        return _backward_step(ring, calls, q, shard, ring.chunks(me), kv_chunks, inputs, out, lse2, do, dlse, grads,
                              home)

    # dQ stays home. The dK/dV accumulators travel with their shard: each step computes the shard's part into
    # fresh buffers while the accumulator that arrives with it is still in flight, then adds the two and sends
    # the sum on, so only the last of the n sends (the one that brings each home) is not hidden behind kernels.
    dq, travelling = zeros(q), None
    shard = (k, v, inputs.kv_segment_ids)
    for s in range(ring.size):
        if s + 1 < ring.size:
            arriving = _pass_on(ring, shard)
        dq, dk, dv = _run_step(ring, step, s, me, shard, (dq, zeros(k), zeros(v)), vma.varying(q, k, v, inputs, do))
        if travelling is not None:
            dk, dv = travelling[0] + dk, travelling[1] + dv
        travelling = _pass_on(ring, (dk, dv))
        if s + 1 < ring.size:
            shard = arriving
    dk, dv = travelling
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
def ring_op(q, k, v, inputs: AttentionInputs, ring: _Ring):
    out, lse2 = _ring_forward(q, k, v, inputs, ring)
    return (out, lse2 * LN2) if ring.with_lse else out


def ring_op_fwd(q, k, v, inputs, ring):
    out, lse2 = named_residuals(*_ring_forward_rule(q, k, v, inputs, ring))
    return ((out, lse2 * LN2) if ring.with_lse else out), (q, k, v, inputs, out, lse2)


def ring_op_bwd(ring, residuals, cotangents):
    q, k, v, inputs, out, lse2 = residuals
    do, dlse = cotangents if ring.with_lse else (cotangents, None)
    dq, dk, dv = _ring_backward(q, k, v, inputs, out, lse2, do, dlse, ring)
    # check_vma=True: an input varying over fewer axes than the ring's results gets the devices' sum (``vma``).
    return vma.sum_to(dq, q), vma.sum_to(dk, k), vma.sum_to(dv, v), jax.tree.map(lambda _: None, inputs)


ring_op.defvjp(ring_op_fwd, ring_op_bwd)


# --- the two halves on one device's arrays --------------------------------------------------


# The features of AttentionSpec.features the ring does not run (it runs lengths, segment ids and offsets).
_UNSUPPORTED = ("window", "mask", "bias", "alibi", "soft_cap", "dropout")


def ring_limits(spec: AttentionSpec, q_shape, k_shape) -> list[str]:
    """What of a call the ring does not implement (empty when it runs it): the features, and Tq != Tk."""
    found = [phrase for key, phrase in spec.features().items() if key in _UNSUPPORTED]
    if spec.causal and spec.shift:
        found.append(f"a causal mask shifted by position offsets (q_offset={spec.q_offset}, k_offset={spec.k_offset})")
    if q_shape[1] != k_shape[1]:
        found.append(f"queries and keys of different lengths (query {tuple(q_shape)}, key {tuple(k_shape)})")
    return found


def ring_of(spec: AttentionSpec, q, k, *, axis_name, backend, config, interpret, layout, with_lse=False,
            mesh_axes=()) -> _Ring:
    """The static ring of one device's ``q``/``k`` over ``axis_name`` for the call ``spec`` (causal in it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            f"the zigzag layout holds two equal chunks per device, so the local length must be even; got q {tuple(q.shape)}"
        )
    limits = ring_limits(spec, q.shape, k.shape)
    if limits:
        raise NotImplementedError(f"ring attention does not implement {'; '.join(limits)}")
    # Offsets equal on both sides shift nothing, and no kernel call of the plan needs one.
    base = dataclasses.replace(spec, causal=False, q_offset=0, k_offset=0, clip_to=None)
    size = lax.axis_size(axis_name)
    return _Ring(axis_name, size, layout, spec.causal, q.shape[1], base, backend, config, bool(interpret), with_lse,
                 tuple(mesh_axes))


def ring_forward(q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, axis_name: Hashable,
                 backend: KernelBackend, config=None, interpret: bool = False, layout: str = "contiguous",
                 mesh_axes=()):
    """The ring's forward on this device's shards: ``(out [B, T_local, N, H], lse2 [B, N, T_local])``.

    ``lse2`` is the global log-sum-exp of each local row in the log2 domain,
    as a backend's ``forward`` returns it. Call where ``axis_name`` is bound
    (``shard_map``, a ``custom_partitioning`` lower_fn). ``spec`` is the
    whole call's (``spec.causal`` included); ``inputs`` holds the global
    lengths and this device's segment ids. Not differentiable: pair it with
    ``ring_backward`` in a ``custom_vjp``. ``mesh_axes``: the mesh's axis names
    in its order, needed when ``axis_name`` is several axes and no mesh is set
    in the context (a ``custom_partitioning`` callback outside ``jax.set_mesh``).
    """
    ring = ring_of(spec, q, k, axis_name=axis_name, backend=backend, config=config, interpret=interpret,
                    layout=layout, mesh_axes=mesh_axes)
    return _ring_forward_rule(q, k, v, inputs, ring)


def ring_backward(q, k, v, out, lse2, do, dlse, inputs: AttentionInputs, spec: AttentionSpec, *,
                  axis_name: Hashable, backend: KernelBackend, config=None, interpret: bool = False,
                  layout: str = "contiguous", mesh_axes=()):
    """The ring's backward on this device's shards: ``(dq, dk, dv)`` in the inputs' dtypes.

    ``out``/``lse2`` are ``ring_forward``'s results on this device, ``do`` and
    ``dlse`` (natural-log lse cotangent, or None) their cotangents; the dK/dV
    accumulators travel the ring and end on their own device.
    """
    ring = ring_of(spec, q, k, axis_name=axis_name, backend=backend, config=config, interpret=interpret,
                    layout=layout, mesh_axes=mesh_axes)
    return _ring_backward(q, k, v, inputs, out, lse2, do, dlse, ring)
