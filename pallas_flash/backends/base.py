"""The backend interface: what the public API and the differentiable op see of an implementation.

A backend takes one validated call, ``(q, k, v, AttentionInputs, AttentionSpec)``,
and either refuses it in ``supports`` (``NotImplementedError``, so the API can
fall back to the next implementation) or computes it:

- ``Backend.attention(...) -> out``: the differentiable result, for any backend.
- ``KernelBackend``: a backend with its own forward and backward kernels.
  ``forward(...) -> (out, lse)`` and ``backward(...) -> Gradients``; its
  ``attention`` is ``pallas_flash.op``'s ``custom_vjp``, which saves
  ``q, k, v, out, lse`` and calls ``backward``. Each kernel backend owns its
  config type (``config_type``) and its default-config lookup.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_flash import op
from pallas_flash.spec import AttentionInputs, AttentionSpec, DefaultConfig


class Gradients(NamedTuple):
    """A kernel backend's backward result; ``dbias``/``dslopes`` are None unless asked for."""

    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    dbias: jax.Array | None = None
    dslopes: jax.Array | None = None


def softmax_delta(out: jax.Array, do: jax.Array, dlse: jax.Array | None) -> jax.Array:
    """``rowsum(dO * O) - dlse`` as float32 ``[B, N, Tq]``: the per-row term of ``dS = P * (dP - delta)``.

    The cotangent of the log-sum-exp adds ``P * dlse`` to ``dS``, so it folds
    into delta; ``dlse=None`` (the output alone is differentiated) adds nothing.
    """
    delta = jnp.einsum("bqnh,bqnh->bnq", out.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    return delta


class Backend(abc.ABC):
    """One implementation of attention. Instances are hashable (they are static arguments under ``jit``)."""

    name: str

    @abc.abstractmethod
    def supports(self, q: jax.Array, k: jax.Array, v: jax.Array, inputs: AttentionInputs, spec: AttentionSpec) -> None:
        """Return if this backend computes the call; raise ``NotImplementedError`` saying why not otherwise."""

    @abc.abstractmethod
    def attention(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config=None, interpret=None):
        """The attention output ``[B, Tq, N, H]``, differentiable."""

    def __repr__(self) -> str:
        return f"<pallas_flash backend {self.name!r}>"


class KernelBackend(Backend):
    """A backend with its own forward and backward kernels (see the module docstring)."""

    config_type: type
    # True when the kernels' interpret mode runs ordered host callbacks (Mosaic GPU's interpreter), which
    # ``custom_partitioning`` cannot lower: interpreted calls then run unpartitioned (``sharding.partition``).
    interpret_has_effects: bool = False

    def interpret_effects(self, config, kind: str) -> bool:
        """Whether the ``kind`` pass (``"forward"``/``"backward"``) with ``config`` runs ordered host callbacks in
        interpret mode (``interpret_has_effects``; ``"auto"`` asks the backend it picked for that pass)."""
        return self.interpret_has_effects

    @abc.abstractmethod
    def default_config(self, q: jax.Array, k: jax.Array, spec: AttentionSpec) -> Any:
        """The config used when the caller passes none (shipped tables, the user's tuned cache, a heuristic)."""

    def shard_config(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> Any:
        """The default config for the arrays the kernels run on (a device's shard under ``jit`` with sharded
        inputs; else the call's): ``default_config``'s."""
        return self.default_config(q, k, spec)

    @abc.abstractmethod
    def forward(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config, interpret: bool):
        """``(out [B, Tq, N, H], lse2 [B, N, Tq] float32)``.

        ``lse2`` is the log-sum-exp in the log2 domain (``log2(sum_j 2^(s_j log2 e))``),
        ``-inf`` for rows that see no key, NaN for rows that see a NaN. The op
        saves it as it is for the backward and gives callers ``lse2 * ln 2``.
        """

    @abc.abstractmethod
    def backward(self, q, k, v, out, lse2, do, dlse, inputs: AttentionInputs, spec: AttentionSpec, *, config,
                 interpret: bool, want_dbias: bool, want_dslopes: bool) -> Gradients:
        """Gradients from the residuals and the cotangents of ``out`` and (None when unused) the natural ``lse``."""

    def resolve(self, q, k, spec: AttentionSpec, config, interpret):
        """``(config, interpret)`` with the defaults filled in and the config's type checked."""
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        if config is None:
            config = DefaultConfig(self.default_config(q, k, spec))
        elif not isinstance(config, (self.config_type, DefaultConfig)):
            raise TypeError(
                f"config must be a {self.config_type.__module__}.{self.config_type.__name__} for the {self.name!r} "
                f"backend, got {type(config).__name__}"
            )
        return config, bool(interpret)

    def attention(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config=None, interpret=None):
        return self.attention_with_lse(q, k, v, inputs, spec, config=config, interpret=interpret)[0]

    def attention_with_lse(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config=None, interpret=None):
        """``(out, lse)``, both differentiable (``pallas_flash.op``)."""
        batch, seq_q, num_heads, _ = q.shape
        if batch * seq_q * num_heads == 0 or k.shape[1] == 0:
            # Nothing to compute (as jax.nn: empty arrays; rows with no key give zeros). A constant
            # has zero gradients of the right shapes.
            return jnp.zeros(q.shape, q.dtype), jnp.full((batch, num_heads, seq_q), -jnp.inf, jnp.float32)
        config, interpret = self.resolve(q, k, spec, config, interpret)
        return op.attention_op(q, k, v, inputs, spec, self, config, interpret)
