"""Launching the backward's kernels: each as a kernel of its own, or several in one launch.

A ``KernelPlan`` is a kernel ready to launch: its body with the static parameters bound (all but its
``CtaOrder``), its operands, output types and shared-memory scratch. ``launch`` runs one plan on its own grid.
``launch_together`` runs several plans as one kernel whose grid is one axis (``common.SHARED_AXIS``): the first
plan's CTAs, then the next's, each CTA taking its plan's role, with that plan's scratch allocated in a scope of
its own (``pl.run_scoped``; the plans' scratch overlaps, so the launch needs the largest plan's shared memory,
not the sum). The deterministic backward runs its dK/dV and dQ kernels so: the two read the same residuals
and neither reads what the other writes, and apart each ends on a partial last wave of CTAs (2048 CTAs of
either at D=128 and B*N = 16k tokens: 15.5 waves on 132 SMs), where together only the launch's last wave is
partial, and the dQ CTAs start as the dK/dV CTAs drain instead of after the last of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu.common import SHARED_AXIS, CtaOrder, launch_params

__all__ = ["KernelPlan", "launch", "launch_together"]


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """A kernel ready to launch: ``body(*operand_refs, *output_refs, order=..., **scratch)``, the ``operands``,
    ``out_types`` (a tuple of ``jax.ShapeDtypeStruct``), the ``scratch`` types by name, the ``order`` its CTAs
    take and the kernel's ``name`` (what profilers show)."""

    body: Callable[..., None]
    operands: tuple[jax.Array, ...]
    out_types: tuple[jax.ShapeDtypeStruct, ...]
    scratch: dict[str, Any]
    order: CtaOrder
    name: str


def launch(plan: KernelPlan, interpret) -> tuple[jax.Array, ...]:
    """Runs ``plan`` as a kernel of its own, on its order's grid; its outputs as a tuple."""
    body = lambda *refs, **scratch: plan.body(*refs, order=plan.order, **scratch)
    outs = plgpu.kernel(
        body,
        out_type=plan.out_types,
        scratch_types=plan.scratch,
        grid=plan.order.grid,
        grid_names=plan.order.grid_names,
        **launch_params(interpret, plan.name),
    )(*plan.operands)
    return tuple(outs)


def launch_together(plans: tuple[KernelPlan, ...], interpret, name: str) -> tuple[tuple[jax.Array, ...], ...]:
    """Runs ``plans`` in one launch, in that order along its grid; each plan's outputs as a tuple, as ``launch``
    gives them. An operand two plans share (the same array) is passed once."""
    operands: list[jax.Array] = []
    slots = []  # per plan, the positions of its operands in ``operands``
    for plan in plans:
        slots.append([_slot(operands, x) for x in plan.operands])
    starts, orders = [], []
    for plan in plans:
        starts.append(sum(p.order.ctas for p in plans[: len(starts)]))
        orders.append(dataclasses.replace(plan.order, offset=starts[-1]))
    ends = starts[1:] + [starts[-1] + plans[-1].order.ctas]
    out_types = tuple(t for plan in plans for t in plan.out_types)
    first_out = [sum(len(p.out_types) for p in plans[:i]) for i in range(len(plans))]

    def body(*refs):
        in_refs, out_refs = refs[: len(operands)], refs[len(operands):]
        cta = lax.axis_index(SHARED_AXIS)
        for i, plan in enumerate(plans):
            mine = [in_refs[j] for j in slots[i]] + list(out_refs[first_out[i]: first_out[i] + len(plan.out_types)])
            if i == 0:
                runs_here = cta < ends[0]
            elif i == len(plans) - 1:
                runs_here = cta >= starts[i]
            else:
                runs_here = (cta >= starts[i]) & (cta < ends[i])

            @pl.when(runs_here)
            def _role(plan=plan, mine=mine, order=orders[i]):
                pl.run_scoped(lambda **scratch: plan.body(*mine, order=order, **scratch), collective_axes="wg",
                              **plan.scratch)

    outs = plgpu.kernel(
        body,
        out_type=out_types,
        grid=(ends[-1],),
        grid_names=(SHARED_AXIS,),
        **launch_params(interpret, name),
    )(*operands)
    return tuple(tuple(outs[first_out[i]: first_out[i] + len(p.out_types)]) for i, p in enumerate(plans))


def _slot(operands: list, x) -> int:
    """``x``'s position in ``operands``, appended when it is not there (by identity: the same array)."""
    for j, y in enumerate(operands):
        if y is x:
            return j
    operands.append(x)
    return len(operands) - 1
