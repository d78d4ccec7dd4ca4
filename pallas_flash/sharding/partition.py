"""The kernels under ``jax.jit`` with sharded inputs: each device computes its own shard.

A ``pallas_call`` is opaque to XLA's partitioner: without help, XLA
all-gathers q, k and v around it and every device computes the whole batch.
``forward`` and ``backward`` (what ``pallas_flash.op`` calls instead of the
backend's own) wrap the backend's kernels in ``custom_partitioning`` with a
Shardy sharding rule, as JAX's cuDNN attention does:

- every array's dims are named by factors: ``b`` batch, ``k`` the KV heads
  (query heads are ``(k g)``: KV head major, ``g`` the GQA group; with one
  KV head (MQA) the query heads are ``k`` alone and the KV head a size-1
  factor of its own, as Shardy allows none in a compound factor: the query
  heads then shard, every shard reading the replicated K/V), ``t``/``s``
  query/key positions, ``h`` head dim; a size-1 (broadcast) dim of a mask,
  bias or slopes gets a factor of its own. ``b`` and ``k`` may be sharded on
  any mesh axes; ``h`` and ``g`` are replicated.
- the sequence (context parallelism): when the ring implements the call
  (``ring.ring_limits``: no window, mask, bias, ALiBi, soft-cap or dropout,
  ``Tq == Tk``, no causal offset shift) the keys' positions are the same
  factor ``t`` as the queries', so q, k, v, the output and the lse may be
  sharded on the sequence, k/v on q's axes (Shardy reshards them to follow).
  Each device then holds a contiguous slice of the positions and runs
  ``ring.ring_forward``/``ring.ring_backward`` over those axes: K/V (and, in
  the backward, dK/dV) travel with ``collective-permute``; nothing is
  gathered and the output stays sharded on the sequence. For a call the
  ring does not implement, ``t`` and ``s`` must be replicated: under
  ``Auto`` axes the sequence is all-gathered around the kernels (correct,
  not fast: what XLA does for any op that needs the whole sequence); under
  ``Explicit`` axes, where the caller chose the sharding, a query sharded on
  the sequence raises ``NotImplementedError`` naming what the ring lacks.
- the partition callback runs the kernels on each device's shard. A shard of
  heads keeps whole GQA groups: query and KV heads must both divide by the
  size of the head axes (under MQA the query heads alone; dK/dV are then
  ``psum``-ed over the head axes), the batch by the size of the batch axes and the
  sequence by the size of the sequence axes, else a ``ValueError`` naming the
  axes (raised while XLA partitions, so ``jit``'s
  compile reports it inside a ``JaxRuntimeError``; under ``Explicit`` axes a
  plain ``ValueError`` at trace time). No fallback to a gather there: it
  would silently cost what this module exists to save. A gradient of an input
  broadcast over a sharded batch or head dim (a ``[1, N, Tq, Tk]`` bias, ``[N]``
  ALiBi slopes) is a partial sum per shard and is ``psum``-ed over those axes.
- dropout keep bits are keyed on global coordinates: the shard's first batch
  row, first head and the global head count travel to the kernels as three
  more words of the dropout seed (``pallas_flash.dropout.shard_seed``), from
  ``axis_index`` (dynamic: one compiled kernel serves every shard).

The partitioned call is a primitive with a batching rule, so ``vmap`` adds a
leading (shardable) factor per level instead of failing. Under a mesh whose
axes are ``Explicit`` the same per-shard function runs in ``jax.shard_map``
(``explicit.py``, with the same batching rule). A backend whose interpret mode
has ordered effects (Mosaic GPU's) runs interpreted calls unpartitioned. On a
mesh mixing ``Explicit`` and ``Auto`` axes only the explicit ones partition the
kernels; inputs sharded on its auto axes are gathered. Inside a ``jax.shard_map``
with ``check_vma=True`` the results vary over every manual axis an input varies
over, and gradients are summed down to their primals' types (``vma.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
from jax._src import dispatch
from jax.experimental.custom_partitioning import ArrayMapping, CompoundFactor, SdyShardingRule, custom_partitioning
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from pallas_flash import dropout
from pallas_flash.sharding import explicit, ring, vma  # explicit reads this module at call time only
from pallas_flash.spec import AttentionInputs, AttentionSpec, DefaultConfig

__all__ = ["forward", "backward"]

BATCH, HEADS, GROUP, SEQ, KEYS = "b", "k", "g", "t", "s"
VMAP, OWN = "vmap", "one"  # prefixes: a vmap level's factor; a broadcast dim's own factor
REPLICATED = ("h", GROUP)  # factors a shard never splits (head dim, within a GQA group)
SUMMED = (BATCH, HEADS)  # factors an output without them is summed over


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend kernel call with its static arguments; ``args`` is the tree of arrays it takes."""

    kind: str  # "forward": (q, k, v, inputs); "backward": (q, k, v, out, lse2, do, dlse, inputs)
    backend: Any
    spec: AttentionSpec
    config: Any
    interpret: bool
    want_dbias: bool = False
    want_dslopes: bool = False

    def __call__(self, args, shard=None, seq_axes=(), mesh_axes=()):
        """The kernels on ``args``; ``shard`` (uint32 [3] or None) is the global offset of this shard for dropout;
        ``seq_axes``: the mesh axes the sequence is sharded over (the ring runs over them), or ``()``;
        ``mesh_axes``: the mesh's axis names in its order (the ring's ``ppermute`` wants them so)."""
        inputs: AttentionInputs = args[-1]
        if seq_axes:
            return self._ring(args, seq_axes[0] if len(seq_axes) == 1 else tuple(seq_axes), tuple(mesh_axes))
        # The dense mask/bias shapes of the arrays as passed (a shard's, when partitioned).
        spec = dataclasses.replace(
            self.spec,
            mask_shape=None if inputs.mask is None else tuple(inputs.mask.shape),
            bias_shape=None if inputs.bias is None else tuple(inputs.bias.shape),
        )
        if shard is not None and inputs.dropout_seed is not None:
            inputs = inputs._replace(dropout_seed=dropout.shard_seed(inputs.dropout_seed, shard))
        config = self.config
        if isinstance(config, DefaultConfig):  # the caller passed none: the default for these arrays (a shard's)
            config = self.backend.shard_config(args[0], args[1], args[2], inputs, spec)
        common = dict(config=config, interpret=self.interpret)
        if self.kind == "forward":
            q, k, v, _ = args
            return self.backend.forward(q, k, v, inputs, spec, **common)
        q, k, v, out, lse2, do, dlse, _ = args
        return self.backend.backward(
            q, k, v, out, lse2, do, dlse, inputs, spec, want_dbias=self.want_dbias, want_dslopes=self.want_dslopes,
            **common,
        )

    def _ring(self, args, axis_name, mesh_axes):
        """The ring's forward or backward over ``axis_name`` on this device's contiguous slice of the sequence."""
        config = None if isinstance(self.config, DefaultConfig) else self.config  # None: the ring's chunks' defaults
        common = dict(axis_name=axis_name, backend=self.backend, config=config, interpret=self.interpret,
                      mesh_axes=mesh_axes)
        if self.kind == "forward":
            q, k, v, inputs = args
            return ring.ring_forward(q, k, v, inputs, self.spec, **common)
        q, k, v, out, lse2, do, dlse, inputs = args
        from pallas_flash.backends.base import Gradients  # backends import op, which imports this module

        return Gradients(*ring.ring_backward(q, k, v, out, lse2, do, dlse, inputs, self.spec, **common))


@dataclasses.dataclass(frozen=True)
class Call:
    """The partitioned primitive's one parameter: the kernels, the argument tree, the factors of every leaf.

    ``levels`` holds, per ``vmap`` level (innermost first), which leaves carry
    that level's mapped dim in front (``0``) or not (``None``).
    """

    kernels: Kernels
    in_tree: Any
    in_factors: tuple
    out_factors: tuple
    group: int
    q_shape: tuple  # the query's and key's global shapes, without vmap dims
    k_shape: tuple
    levels: tuple = ()
    ring_limits: tuple = ()  # why the ring cannot run this call (``ring.ring_limits``); empty: the sequence may shard

    def flat(self, shard=None, seq_axes=(), mesh_axes=()):
        """The kernels (the ring over ``seq_axes`` when given) on flat leaves, with every ``vmap`` level applied."""

        def run(*leaves):
            out = self.kernels(jax.tree.unflatten(self.in_tree, leaves), shard, seq_axes, mesh_axes)
            return tuple(jax.tree.leaves(out))

        for axes in self.levels:
            run = jax.vmap(run, in_axes=axes)
        return run


# ---------------------------------------------------------------------------------------------------------------------
# Factors of each argument and result.


def _factors(kernels: Kernels, args) -> tuple[tuple, tuple, int, tuple]:
    """``(in_factors, out_factors, group, ring_limits)``: one tuple of factor names per array leaf, in tree order.

    When the ring runs the call (no ``ring_limits``) the keys' positions are the queries' factor ``t``: the
    sequences of q and k/v shard alike or not at all.
    """
    q, k = args[0], args[1]
    batch, seq_q, num_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads if num_kv_heads else 1
    if group == 1:
        heads, kv_heads = HEADS, HEADS
    elif num_kv_heads == 1:
        # MQA: the query heads shard on their own, each shard's reading the one K/V head (replicated); dK/dV,
        # without the factor, are summed over its shards. (A compound factor cannot hold the size-1 KV head.)
        heads, kv_heads = HEADS, f"{OWN}_kv_head"
    else:
        heads, kv_heads = CompoundFactor(HEADS, GROUP), HEADS
    limits = tuple(ring.ring_limits(kernels.spec, q.shape, k.shape))
    keys = KEYS if limits else SEQ
    q_f = (BATCH, SEQ, heads, "h")
    kv_f = (BATCH, keys, kv_heads, "h")
    stat_f = (BATCH, heads, SEQ)
    own = iter(f"{OWN}{i}" for i in range(1000))  # a factor of its own for each broadcast (size-1) dim

    def dims(array, names, full):
        return tuple(n if size == f else next(own) for size, n, f in zip(array.shape, names, full))

    inputs: AttentionInputs = args[-1]
    dense = (BATCH, heads, SEQ, keys)
    dense_full = (batch, num_heads, seq_q, k.shape[1])
    side = AttentionInputs(
        q_lengths=(BATCH,),
        kv_lengths=(BATCH,),
        q_segment_ids=(BATCH, SEQ),
        kv_segment_ids=(BATCH, keys),
        mask=None if inputs.mask is None else dims(inputs.mask, dense, dense_full),
        bias=None if inputs.bias is None else dims(inputs.bias, dense, dense_full),
        alibi_slopes=None if inputs.alibi_slopes is None else dims(inputs.alibi_slopes, (BATCH, heads), (batch, num_heads)),
        dropout_seed=(next(own),),
    )
    side = tuple(f if x is not None else None for f, x in zip(side, inputs))
    if kernels.kind == "forward":
        leading = [q_f, kv_f, kv_f]
        outs = (q_f, stat_f)
    else:
        dlse = args[6]
        leading = [q_f, kv_f, kv_f, q_f, stat_f, q_f] + ([stat_f] if dlse is not None else [])
        outs = (q_f, kv_f, kv_f)
        if kernels.want_dbias:
            outs += (side[5],)
        if kernels.want_dslopes:
            outs += (side[6],)
    ins = tuple(leading) + tuple(f for f in side if f is not None)
    return ins, outs, group, limits


def _sharding_rule(call: Call, mesh, value_types, result_types) -> SdyShardingRule:
    del mesh, value_types, result_types
    # Factors in order of first appearance (Shardy wants the special ones listed in that order).
    used = dict.fromkeys(n for fs in call.in_factors for f in fs for n in (f if isinstance(f, CompoundFactor) else (f,)))
    compound = any(isinstance(f, CompoundFactor) for fs in call.in_factors for f in fs)
    sizes = {GROUP: call.group} if compound else {}  # a compound factor's sizes
    replicated = REPLICATED + ((SEQ, KEYS) if call.ring_limits else ())  # the ring's calls may shard the sequence
    return SdyShardingRule(
        tuple(ArrayMapping(*f) for f in call.in_factors),
        tuple(ArrayMapping(*f) for f in call.out_factors),
        need_replication_factors=tuple(f for f in used if f in replicated),
        **sizes,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Partitioning: which mesh axes each factor is sharded on, and the per-shard function.


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_of(sharding, ndim: int) -> tuple:
    spec = () if sharding is None or not hasattr(sharding, "spec") else tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _sharded_factors(call: Call, mesh, specs, explicit: bool = False) -> dict[str, tuple[str, ...]]:
    """Mesh axes of ``b``, ``k``, ``t`` and the ``vmap`` factors, read from the first leaf that has each (the query
    first: k/v follow its sequence axes).

    A sequence sharded for a call the ring does not implement is gathered (``t`` on no axes) under ``Auto`` axes;
    under ``Explicit`` ones (``explicit``) it raises ``NotImplementedError``.
    """
    axes = {}
    for factors, spec in zip(call.in_factors, specs):
        for f, entry in zip(factors, spec):
            name = f[0] if isinstance(f, CompoundFactor) else f  # query heads: the KV-head factor is the major one
            if name in axes or not (name in SUMMED or name == SEQ or name.startswith(VMAP)):
                continue
            axes[name] = _axes(entry)
    if call.ring_limits and axes.get(SEQ):
        if explicit:
            raise NotImplementedError(
                f"pallas_flash: the query's sequence (query {call.q_shape}, key {call.k_shape}) is sharded over mesh "
                f"axes {axes[SEQ]}, and context parallelism (ring attention) does not implement "
                f"{'; '.join(call.ring_limits)}. Replicate the sequence for this call (jax.sharding.reshard with None "
                "for the sequence dim) or drop the feature"
            )
        axes[SEQ] = ()  # the kernels take the whole sequence; XLA gathers it
    _check(call, mesh, axes)
    return axes


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _check(call: Call, mesh, axes) -> None:
    """Batch, heads and sequence must split evenly, heads in whole GQA groups; ``ValueError`` naming the mesh axes
    otherwise."""
    q_shape, k_shape = call.q_shape, call.k_shape
    batch, seq, num_heads, _ = q_shape
    num_kv_heads = k_shape[2]
    b_axes, h_axes, t_axes = axes.get(BATCH, ()), axes.get(HEADS, ()), axes.get(SEQ, ())
    if seq % _size(mesh, t_axes):
        raise ValueError(
            f"pallas_flash: the sequence dim (query {q_shape}) is sharded over mesh axes {t_axes} of size "
            f"{_size(mesh, t_axes)}, which does not divide its length {seq}; shard it over axes whose size divides it"
        )
    if batch % _size(mesh, b_axes):
        raise ValueError(
            f"pallas_flash: the batch dim (query {q_shape}) is sharded over mesh axes {b_axes} of size "
            f"{_size(mesh, b_axes)}, which does not divide batch {batch}; shard it over axes whose size divides it"
        )
    n = _size(mesh, h_axes)
    if num_heads % n or (num_kv_heads != 1 and num_kv_heads % n):  # MQA: every shard reads the one K/V head
        raise ValueError(
            f"pallas_flash: the heads (query {q_shape}, key {k_shape}) are sharded over mesh axes {h_axes} of size "
            f"{n}; each shard must hold whole GQA groups, so the query heads ({num_heads}) and the key/value heads "
            f"({num_kv_heads}) must both be divisible by {n}. Shard the heads over fewer devices or replicate them"
        )


def _pspec(factors, axes) -> PartitionSpec:
    entries = []
    for f in factors:
        name = f[0] if isinstance(f, CompoundFactor) else f
        a = axes.get(name, ())
        entries.append(None if not a else (a[0] if len(a) == 1 else a))
    return PartitionSpec(*entries)


def _shard_offsets(call: Call, axes):
    """uint32 ``[first batch row, first query head, query heads in all]`` of this shard, or None when not split."""
    b_axes, h_axes = axes.get(BATCH, ()), axes.get(HEADS, ())
    if not call.kernels.spec.has_dropout or not (b_axes or h_axes):
        return None
    batch, _, num_heads, _ = call.q_shape

    def first(axes_, total):
        if not axes_:
            return jnp.uint32(0)
        n = math.prod(jax.lax.axis_size(a) for a in axes_)
        return jax.lax.axis_index(axes_).astype(jnp.uint32) * jnp.uint32(total // n)

    return jnp.stack([first(b_axes, batch), first(h_axes, num_heads), jnp.uint32(num_heads)])


def _per_shard(call: Call, axes, mesh):
    """The function each device runs on its shards: the kernels, then the sums over shards of broadcast gradients."""

    def run(*leaves):
        outs = call.flat(_shard_offsets(call, axes), axes.get(SEQ, ()), mesh.axis_names)(*leaves)
        summed = []
        for out, factors in zip(outs, call.out_factors):
            names = {f[0] if isinstance(f, CompoundFactor) else f for f in factors}
            over = tuple(a for f in SUMMED if f not in names for a in axes.get(f, ()))
            summed.append(jax.lax.psum(out, over) if over else out)
        return tuple(summed)

    return run


def _partition(call: Call, mesh, arg_shapes, result_shape):
    specs = [_spec_of(a.sharding, len(a.shape)) for a in arg_shapes]
    axes = _sharded_factors(call, mesh, specs)
    arg_shardings = tuple(NamedSharding(mesh, _pspec(f, axes)) for f in call.in_factors)
    out_shardings = tuple(NamedSharding(mesh, _pspec(f, axes)) for f in call.out_factors)
    return mesh, _per_shard(call, axes, mesh), out_shardings, arg_shardings


def _infer_sharding(call: Call, mesh, arg_shapes, result_shape):
    """The results' shardings (GSPMD only; Shardy reads the rule)."""
    specs = [_spec_of(a.sharding, len(a.shape)) for a in arg_shapes]
    axes = _sharded_factors(call, mesh, specs)
    return tuple(NamedSharding(mesh, _pspec(f, axes)) for f in call.out_factors)


# ---------------------------------------------------------------------------------------------------------------------
# The primitive: abstract evaluation, vmap, lowering through custom_partitioning.


@functools.lru_cache(maxsize=256)
def _trace(call: Call):
    """``call.flat()`` under ``jax.jit``: its cache holds the kernels' traces (``cache_clear`` drops them)."""
    return jax.jit(call.flat())


def _jaxpr(call: Call, avals: tuple):
    """The kernels' closed jaxpr on global shapes: the primitive's ``jaxpr`` parameter (its results' avals).

    Traced by ``_trace``'s ``jax.jit``, whose cache keys a trace on JAX's whole trace context: the abstract mesh
    (the values carry it), ``jax_enable_x64`` (index dtypes), ``jax_default_matmul_precision``, ``compute_on``'s
    compute type and ``set_xla_metadata``'s attributes (the equations carry both into the lowering), and the rest."""
    with vma.kernels_untyped():  # in a check_vma=True shard_map: typed by ``_abstract_eval``
        return _trace(call).trace(*(jax.ShapeDtypeStruct(s, d) for s, d in avals)).jaxpr


@functools.lru_cache(maxsize=256)
def _out_tree(kernels: Kernels, in_tree, avals: tuple):
    args = jax.tree.unflatten(in_tree, [jax.ShapeDtypeStruct(s, d) for s, d in avals])
    with vma.kernels_untyped():
        return jax.tree.structure(jax.eval_shape(kernels, args))


def _bind(call: Call, leaves):
    jaxpr = _jaxpr(call, tuple((x.shape, x.dtype) for x in leaves))
    return partitioned_p.bind(*leaves, call=call, jaxpr=jaxpr)


def _abstract_eval(*avals, call: Call, jaxpr):
    # Shapes and dtypes alone: the jaxpr's avals carry the abstract mesh of its trace, which need not be this
    # bind's (another mesh's under ``jax.set_mesh``: wrong output shardings, or no compile). In a check_vma=True
    # shard_map they vary over every manual axis an input varies over (``vma``).
    return vma.typed_like([jax.core.ShapedArray(a.shape, a.dtype, weak_type=a.weak_type) for a in jaxpr.out_avals],
                          avals)


def _vmapped(call: Call, args, dims) -> tuple[Call, list]:
    """``vmap``: the mapped dims move to the front and become one more (shardable) factor."""
    axes = tuple(None if d is None else 0 for d in dims)
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    name = f"{VMAP}{len(call.levels)}"
    mapped = dataclasses.replace(
        call,
        levels=call.levels + (axes,),
        in_factors=tuple(f if ax is None else (name,) + f for f, ax in zip(call.in_factors, axes)),
        out_factors=tuple((name,) + f for f in call.out_factors),
    )
    return mapped, args


def _batch(args, dims, *, call: Call, jaxpr):
    mapped, args = _vmapped(call, args, dims)
    outs = _bind(mapped, args)
    return outs, (0,) * len(outs)


def _lower(ctx, *values, call: Call, jaxpr):
    kernels = jax.extend.core.jaxpr_as_fun(jaxpr)
    fn = custom_partitioning(lambda *leaves: tuple(kernels(*leaves)))
    fn.def_partition(
        partition=functools.partial(_partition, call),
        infer_sharding_from_operands=functools.partial(_infer_sharding, call),
        sharding_rule=functools.partial(_sharding_rule, call),
    )
    # In a check_vma=True shard_map the jaxpr was traced untyped (``_jaxpr``): it is lowered so too.
    if vma.varying(*ctx.avals_in):
        ctx = ctx.replace(avals_in=vma.untyped(ctx.avals_in), avals_out=vma.untyped(ctx.avals_out))
    with vma.kernels_untyped():
        return mlir.lower_fun(lambda *leaves: fn(*leaves), multiple_results=True)(ctx, *values)


partitioned_p = jax.extend.core.Primitive("pallas_flash_partitioned")
partitioned_p.multiple_results = True
partitioned_p.def_impl(functools.partial(dispatch.apply_primitive, partitioned_p))
partitioned_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[partitioned_p] = _batch
mlir.register_lowering(partitioned_p, _lower)
dispatch.prim_requires_devices_during_lowering.add(partitioned_p)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points (pallas_flash.op calls these in place of the backend's forward and backward).


def _apply(kernels: Kernels, args):
    if kernels.interpret and kernels.backend.interpret_effects(kernels.config, kernels.kind):
        # An interpreter with ordered host callbacks does not lower inside ``custom_partitioning``: the kernels
        # run on the whole arrays (a CPU test path; sharded inputs are gathered around them, and under Explicit
        # axes, whose sharded types the interpreter cannot index, replicated first).
        if explicit.mesh_of(jax.tree.leaves(args)) is not None:
            args = jax.tree.map(lambda x: jax.sharding.reshard(x, PartitionSpec()), args)
        return vma.run_kernels(kernels, args)
    leaves, in_tree = jax.tree.flatten(args)
    in_factors, out_factors, group, limits = _factors(kernels, args)
    q, k = args[0], args[1]
    out_tree = _out_tree(kernels, in_tree, tuple((x.shape, x.dtype) for x in leaves))
    call = Call(kernels, in_tree, in_factors, out_factors, group, tuple(q.shape), tuple(k.shape), ring_limits=limits)
    mesh = explicit.mesh_of(leaves)
    if mesh is not None:
        outs = explicit.bind(call, mesh, leaves)
    else:
        outs = _bind(call, leaves)
    return jax.tree.unflatten(out_tree, outs)


def forward(backend, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config, interpret: bool):
    """``backend.forward`` (``(out, lse2)``), partitioned over sharded batch and heads (and sequence: the ring)."""
    return _apply(Kernels("forward", backend, spec, config, interpret), (q, k, v, inputs))


def backward(backend, q, k, v, out, lse2, do, dlse, inputs: AttentionInputs, spec: AttentionSpec, *, config,
             interpret: bool, want_dbias: bool, want_dslopes: bool):
    """``backend.backward`` (``Gradients``), partitioned over sharded batch and heads (and sequence: the ring)."""
    kernels = Kernels("backward", backend, spec, config, interpret, want_dbias, want_dslopes)
    grads = _apply(kernels, (q, k, v, out, lse2, do, dlse, inputs))
    if explicit.mesh_of([q]) is None:
        # In a check_vma=True shard_map a cotangent has its primal's type (``vma.sum_to``).
        return grads._replace(**{g: vma.sum_to(getattr(grads, g), x) for g, x in (
            ("dq", q), ("dk", k), ("dv", v), ("dbias", inputs.bias), ("dslopes", inputs.alibi_slopes))})
    # Under Explicit axes the kernels ran on the rule's shardings; a custom_vjp's cotangents must have the
    # primals' types (q, k and v may be sharded differently: tensor-parallel MQA, a sequence-sharded q).
    like = lambda g, x: g if g is None or x is None else jax.sharding.reshard(g, jax.typeof(x).sharding.spec)  # noqa: E731
    return grads._replace(dq=like(grads.dq, q), dk=like(grads.dk, k), dv=like(grads.dv, v),
                          dbias=like(grads.dbias, inputs.bias), dslopes=like(grads.dslopes, inputs.alibi_slopes))
