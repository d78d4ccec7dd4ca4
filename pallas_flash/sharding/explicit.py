"""The partitioned kernels under a mesh whose axes are ``Explicit``: the shardings are in the types at trace time.

There the same per-shard function as ``partition.py``'s partition callback runs in ``jax.shard_map``, the specs
read from the arguments' types (``custom_partitioning`` never sees an explicitly sharded type, which Pallas'
interpret mode cannot slice). The call is a primitive of its own with ``partition.py``'s batching rule, so a
``vmap`` level becomes one more factor, sharded on whatever axis the batched type puts the mapped dim on. Staged
(under ``jit``) or evaluated, the primitive runs the ``shard_map`` in place: no jaxpr holds it. (``vmap`` of the
``shard_map`` itself gave the mapped dim a replicated spec and batched the body with the axis still Explicit in
its context, whose types the interpreted kernels' stores rejected.)
"""

from __future__ import annotations

import jax
import jax.extend
from jax._src import core
from jax._src.interpreters import partial_eval as pe
from jax.interpreters import batching
from jax.sharding import AxisType

from pallas_flash.sharding import partition  # imports this module first: read its names at call time only

__all__ = ["mesh_of", "bind"]


def mesh_of(leaves):
    """The mesh of the leaves' types when it has ``Explicit`` axes (shardings known at trace time), else None.

    Leaves whose types carry no mesh (plain arrays) under ``jax.set_mesh`` of a mesh with Explicit axes take that
    mesh, replicated on it (as ``jax.jit`` treats them there): traced under its Explicit context, the interpreted
    kernels' values carry the mesh and their plain refs do not, which their stores rejected (a ShardingTypeError).
    """
    mesh = getattr(jax.typeof(leaves[0]).sharding, "mesh", None)
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return mesh


def _run(call, mesh, leaves):
    """The per-shard function in ``shard_map``, the specs read from the types."""
    p = partition
    specs = [p._spec_of(jax.typeof(x).sharding, x.ndim) for x in leaves]
    axes = p._sharded_factors(call, mesh, specs, explicit=True)
    in_specs = tuple(p._pspec(f, axes) for f in call.in_factors)
    out_specs = tuple(p._pspec(f, axes) for f in call.out_factors)
    leaves = [
        x if tuple(jax.typeof(x).sharding.spec) == tuple(s) else jax.sharding.reshard(x, s)
        for x, s in zip(leaves, in_specs)
    ]
    run = jax.shard_map(p._per_shard(call, axes, mesh), mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                        check_vma=False)
    return run(*leaves)


def _batch(args, dims, *, call, mesh):
    mapped, args = partition._vmapped(call, args, dims)
    outs = explicit_p.bind(*args, call=mapped, mesh=mesh)
    return outs, (0,) * len(outs)


def _stage(trace, source_info, *tracers, call, mesh):
    del source_info
    with core.set_current_trace(trace):
        return _run(call, mesh, tracers)


explicit_p = jax.extend.core.Primitive("pallas_flash_explicit")
explicit_p.multiple_results = True
explicit_p.def_impl(lambda *leaves, call, mesh: _run(call, mesh, leaves))
batching.primitive_batchers[explicit_p] = _batch
pe.custom_staging_rules[explicit_p] = _stage


def bind(call, mesh, leaves):
    """The kernels' outputs (flat) for ``partition.Call`` ``call`` on ``mesh``'s Explicit axes."""
    return explicit_p.bind(*leaves, call=call, mesh=mesh)
