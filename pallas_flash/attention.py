"""The differentiable FlashAttention op: ``flash_attention`` and its ``custom_vjp``.

The forward saves only ``q, k, v, o`` and the per-row log-sum-exp as
residuals (plus the side inputs: lengths, segment ids, the caller's own mask
or bias, ALiBi slopes, the dropout seed); the backward recomputes the
attention probabilities blockwise. Nothing of size ``Tq x Tk`` is ever
created, forward or backward, except the bias gradient itself when the
caller differentiates a dense bias.

The kernels themselves live behind a backend (today ``pallas_flash.triton``,
Pallas lowered through Triton); this module and the public API only see its
two functions ``forward(...) -> (out, lse)`` and ``backward(...) -> (dq, dk, dv)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from pallas_flash import _validate
from pallas_flash.config import FlashConfig, default_config
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.triton import backward as _triton_bwd
from pallas_flash.triton import forward as _triton_fwd

__all__ = ["flash_attention", "flash_attention_op"]


def _default_interpret() -> bool:
    """Pallas interpret mode unless the default device is an NVIDIA GPU."""
    return jax.default_backend() != "gpu"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """A static value carried in the residuals' tree structure (no array leaf)."""

    value: tuple


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, inputs: AttentionInputs, spec: AttentionSpec, config: FlashConfig, interpret: bool):
    out, _ = _triton_fwd.flash_forward(q, k, v, inputs, spec=spec, config=config.fwd, interpret=interpret)
    return out


def _flash_fwd(q, k, v, inputs, spec, config, interpret):
    # symbolic_zeros: every array leaf arrives as CustomVJPPrimal(value, perturbed);
    # the bias gradient (a Tq x Tk write) and the ALiBi slopes' gradient are
    # only computed when that input is being differentiated.
    want_dbias = inputs.bias is not None and bool(inputs.bias.perturbed)
    want_dslopes = inputs.alibi_slopes is not None and bool(inputs.alibi_slopes.perturbed)
    q, k, v, inputs = custom_vjp_primal_tree_values((q, k, v, inputs))
    out, lse = _triton_fwd.flash_forward(q, k, v, inputs, spec=spec, config=config.fwd, interpret=interpret)
    return out, (q, k, v, inputs, out, lse, _Static((want_dbias, want_dslopes)))


def _flash_bwd(spec, config, interpret, residuals, do):
    q, k, v, inputs, out, lse, wants = residuals
    want_dbias, want_dslopes = wants.value
    if isinstance(do, SymbolicZero):
        do = jnp.zeros(do.shape, do.dtype)
    dq, dk, dv, dbias, dslopes = _triton_bwd.flash_backward(
        q,
        k,
        v,
        out,
        lse,
        do,
        inputs,
        spec=spec,
        config=config.bwd,
        interpret=interpret,
        want_dbias=want_dbias,
        want_dslopes=want_dslopes,
    )
    # Integer side inputs (lengths, segment ids, mask, seed) get no cotangent,
    # nor do a bias or slopes that are not being differentiated.
    d_inputs = jax.tree.map(lambda _: None, inputs)._replace(bias=dbias, alibi_slopes=dslopes)
    return dq, dk, dv, d_inputs


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


def flash_attention_op(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The op every public entry point lowers to: validated inputs, a built spec.

    ``config=None`` picks the shipped default for this shape and GPU.
    """
    if interpret is None:
        interpret = _default_interpret()
    if config is None:
        config = default_config(
            head_dim=q.shape[-1], dtype=q.dtype, causal=spec.causal, seq_q=q.shape[1], seq_k=k.shape[1]
        )
    elif not isinstance(config, FlashConfig):
        raise TypeError(f"config must be a pallas_flash.FlashConfig, got {type(config).__name__}")
    return _flash(q, k, v, inputs, spec, config, bool(interpret))


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
    _validate.check_qkv(q, k, v)
    _validate.check_kernel_support(q)
    head_dim = q.shape[-1]
    scale = _validate.check_scale(scale, head_dim)
    spec = AttentionSpec(scale=scale, causal=bool(causal))
    return flash_attention_op(q, k, v, AttentionInputs(), spec=spec, config=config, interpret=interpret)
