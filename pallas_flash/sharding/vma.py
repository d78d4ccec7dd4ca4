"""The kernels inside ``jax.shard_map(..., check_vma=True)``: which mesh axes their results vary over.

Under ``check_vma=True`` every value in the ``shard_map`` carries the manual mesh axes it varies over
(``jax.typeof(x).manual_axis_type.varying``), and a ``pallas_call`` must be told its outputs' (the
``manual_axis_type`` of its ``out_shape``), which the backends' kernels do not say. The kernels therefore run
untyped (``kernels_untyped``) and their results are then declared varying over the union of the inputs' axes
(``to_varying``): what a device computes from its shards differs wherever any input does. Inside that untyped
region the kernels' operands are re-typed as varying over nothing (``_plain``, a no-op reshape), as every value is
in a ``check_vma=False`` shard_map: Pallas' interpret mode lowers a kernel's body with its operands' types, and
mixing varying blocks with its (invariant) grid indices fails there. The partitioned primitive
(``partition.py``) traces its kernels untyped and types its results the same way (``typed_like``, ``untyped``).

A gradient of an input that varies over fewer axes than the kernels' output (a key replicated over the axes the
query is sharded on) is the sum of the devices' shares: ``sum_to`` ``psum``-s it down to its primal's type, as
JAX's own transpose of an implicit ``pcast`` would. Without ``check_vma`` every value varies over nothing and all
of this is the identity: that path runs exactly as before.
"""

from __future__ import annotations

import contextlib

import jax

__all__ = ["varying", "kernels_untyped", "to_varying", "run_kernels", "typed_like", "untyped", "sum_to"]


def _axes(x) -> frozenset:
    """The axes an array (or an abstract value) varies over."""
    aval = jax.typeof(x) if isinstance(x, jax.Array) else x
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset() if mat is None else frozenset(mat.varying)


def varying(*trees) -> frozenset:
    """The mesh axes any array leaf of ``trees`` varies over (empty outside a ``check_vma=True`` shard_map)."""
    return frozenset().union(*(_axes(x) for x in jax.tree.leaves(trees)))


def _ordered(axes) -> tuple:
    """``axes`` in the current mesh's order (the order ``pcast``/``psum`` name them in JAX's own rules)."""
    names = jax.sharding.get_abstract_mesh().axis_names
    return tuple(a for a in names if a in axes) + tuple(sorted((a for a in axes if a not in names), key=str))


def kernels_untyped():
    """A context in which a ``pallas_call`` may leave its outputs' ``manual_axis_type`` unset.

    JAX 0.11.2 has no public switch for this: ``jax._src.config._check_vma`` is the flag ``shard_map`` sets for
    its body (Pallas turns it off the same way to trace a kernel's body). Outside a ``check_vma=True``
    ``shard_map`` it is already off, and this is a no-op. Declaring ``manual_axis_type`` at every ``pallas_call``
    and ``plgpu.kernel`` of the backends instead would need no private name, but touches every kernel wrapper.
    """
    try:
        from jax._src import config  # JAX 0.11.2
    except ImportError:  # pragma: no cover - a JAX without it
        return contextlib.nullcontext()
    flag = getattr(config, "_check_vma", None)
    return contextlib.nullcontext() if flag is None else flag(False)


def to_varying(tree, axes):
    """Every array leaf of ``tree`` declared varying over ``axes`` too (``jax.lax.pcast``; none: unchanged)."""

    def cast(x):
        missing = frozenset(axes) - _axes(x)
        return jax.lax.pcast(x, _ordered(missing), to="varying") if missing else x

    return jax.tree.map(cast, tree) if axes else tree


def _plain(x):
    """``x`` (traced untyped) as a value varying over no axis: Pallas' HLO interpreter (interpret mode) lowers a
    kernel's body with the types of its operands, and its block indices vary over nothing."""
    if not _axes(x):
        return x
    return jax.lax.squeeze(jax.lax.expand_dims(x, (0,)), (0,))  # the untyped op's result varies over no axis


def run_kernels(fn, *args):
    """``fn(*args)`` (a backend's kernels) with its results varying over the union of the inputs' axes."""
    axes = varying(args)
    with kernels_untyped():
        if axes:  # the kernels see values varying over nothing, as they are typed in a check_vma=False shard_map
            args = jax.tree.map(_plain, args)
        out = fn(*args)
    return to_varying(out, axes)


def typed_like(avals, in_avals) -> list:
    """Results ``avals`` (varying over nothing) of a call on ``in_avals``: varying over the union of their axes."""
    typed = [a for a in in_avals if _axes(a)]
    if not typed:
        return list(avals)
    mesh = typed[0].sharding.mesh  # the shard_map's (abstract, manual) mesh, which a varying type names
    mat = jax.sharding.ManualAxisType(varying=varying(*typed))
    sharding = lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*[None] * a.ndim))  # noqa: E731
    return [a.update(manual_axis_type=mat, sharding=sharding(a)) for a in avals]


def untyped(avals) -> list:
    """``avals`` varying over no mesh axis: the types of a jaxpr traced under ``kernels_untyped``."""
    plain = jax.sharding.ManualAxisType()
    return [a.update(manual_axis_type=plain) if getattr(a, "manual_axis_type", plain) is not plain else a
            for a in avals]


def sum_to(ct, primal):
    """The cotangent ``ct`` summed over the axes it varies over and ``primal`` does not (``None`` stays ``None``)."""
    if ct is None or primal is None:
        return ct
    extra = _axes(ct) - _axes(primal)
    return jax.lax.psum(ct, _ordered(extra)) if extra else ct
