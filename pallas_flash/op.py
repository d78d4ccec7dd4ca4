"""The differentiable attention op of every kernel backend: ``attention_op`` and its ``custom_vjp``.

``attention_op`` returns ``(out, lse)``, both differentiable: the log-sum-exp's
cotangent folds into the backward's per-row ``delta`` (see
``backends.base.softmax_delta``), so partial results can be merged
(``pallas_flash.combine``) and differentiated through the merge.

The forward saves only ``q, k, v, out`` and the per-row log-sum-exp as
residuals (plus the side inputs: lengths, segment ids, the caller's own mask
or bias, ALiBi slopes, the dropout seed); the backward recomputes the
attention probabilities blockwise. Nothing of size ``Tq x Tk`` is ever
created, forward or backward, except the bias gradient itself when the
caller differentiates a dense bias. The backend, its config and the spec are
static arguments: one compiled kernel per value.

Every kernel call goes through ``pallas_flash.sharding.partition``: under
``jit`` with inputs sharded over batch or heads, each device runs the kernels
on its own shard (no all-gather); on one device it is the plain call.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from pallas_flash.sharding import partition
from pallas_flash.spec import AttentionInputs, AttentionSpec, named_residuals

__all__ = ["attention_op"]

LN2 = math.log(2.0)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """A static value carried in the residuals' tree structure (no array leaf)."""

    value: tuple


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def attention_op(q, k, v, inputs: AttentionInputs, spec: AttentionSpec, backend, config, interpret: bool):
    """``(out [B, Tq, N, H], lse [B, N, Tq] float32)`` of ``backend``'s kernels; differentiable in both."""
    out, lse2 = partition.forward(backend, q, k, v, inputs, spec, config=config, interpret=interpret)
    return out, lse2 * LN2


def _attention_fwd(q, k, v, inputs, spec, backend, config, interpret):
    # symbolic_zeros: every array leaf arrives as CustomVJPPrimal(value, perturbed);
    # the bias gradient (a Tq x Tk write) and the ALiBi slopes' gradient are
    # only computed when that input is being differentiated.
    want_dbias = inputs.bias is not None and bool(inputs.bias.perturbed)
    want_dslopes = inputs.alibi_slopes is not None and bool(inputs.alibi_slopes.perturbed)
    q, k, v, inputs = custom_vjp_primal_tree_values((q, k, v, inputs))
    out, lse2 = named_residuals(*_first_order_forward(q, k, v, inputs, spec, backend, config, interpret))
    # The residual is the kernels' own log2-domain lse: no round trip through the natural log.
    return (out, lse2 * LN2), (q, k, v, inputs, out, lse2, _Static((want_dbias, want_dslopes)))


def _attention_bwd(spec, backend, config, interpret, residuals, cotangents):
    q, k, v, inputs, out, lse2, wants = residuals
    want_dbias, want_dslopes = wants.value
    do, dlse = cotangents
    if isinstance(do, SymbolicZero):
        do = jnp.zeros(do.shape, do.dtype)
    if isinstance(dlse, SymbolicZero):
        dlse = None  # the usual case: only the output is differentiated
    grads = _first_order_backward(
        q, k, v, out, lse2, do, dlse, inputs, spec, backend, config, interpret, want_dbias, want_dslopes
    )
    # Integer side inputs (lengths, segment ids, mask, seed) get no cotangent,
    # nor do a bias or slopes that are not being differentiated.
    d_inputs = jax.tree.map(lambda _: None, inputs)._replace(bias=grads.dbias, alibi_slopes=grads.dslopes)
    return grads.dq, grads.dk, grads.dv, d_inputs


attention_op.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _first_order_forward(q, k, v, inputs, spec, backend, config, interpret):
    """The forward kernels as the VJP's forward rule runs them: differentiating that rule
    (as grad of grad does) raises ``NotImplementedError`` like the backward."""
    return partition.forward(backend, q, k, v, inputs, spec, config=config, interpret=interpret)


@_first_order_forward.defjvp
def _no_second_order_forward(spec, backend, config, interpret, primals, tangents):
    raise _second_order_error(backend)


@functools.partial(jax.custom_jvp, nondiff_argnums=tuple(range(8, 14)))
def _first_order_backward(q, k, v, out, lse2, do, dlse, inputs, spec, backend, config, interpret, want_dbias,
                          want_dslopes):
    """The backend's backward kernels. They have no derivative of their own: differentiating them
    (grad of grad, hessian, jvp of a vjp) raises ``NotImplementedError`` saying what to use instead."""
    return partition.backward(
        backend, q, k, v, out, lse2, do, dlse, inputs, spec, config=config, interpret=interpret,
        want_dbias=want_dbias, want_dslopes=want_dslopes,
    )


@_first_order_backward.defjvp
def _no_second_order_backward(spec, backend, config, interpret, want_dbias, want_dslopes, primals, tangents):
    raise _second_order_error(backend)


def _second_order_error(backend) -> NotImplementedError:
    return NotImplementedError(
        f"second-order derivatives (grad of grad, hessian) of the {backend.name!r} attention kernels are not "
        "implemented: their backward pass is itself a kernel without a derivative. Use "
        "implementation='xla' (jax.nn's attention, differentiable to any order) for higher-order derivatives."
    )
