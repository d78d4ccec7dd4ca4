"""The Pallas Triton backend: forward and backward kernels lowered through Triton.

Files: ``forward.py`` and ``backward.py`` (the kernels and their launchers),
``program.py`` (what every program computes first; logits and visibility of
its tiles), ``blocks.py`` (which blocks a program visits), ``tiles.py`` (tile
loads and stores), ``side_inputs.py`` (the optional arrays as kernel inputs),
``config.py`` and ``tables/`` (block configs), ``tune.py`` (its tuning space).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_flash.backends.base import Gradients, KernelBackend
from pallas_flash.backends.triton.backward import flash_backward
from pallas_flash.backends.triton.config import BackwardConfig, FlashConfig, ForwardConfig, default_config
from pallas_flash.backends.triton.forward import flash_forward
from pallas_flash.spec import AttentionInputs, AttentionSpec

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))

__all__ = ["TritonBackend", "FlashConfig", "ForwardConfig", "BackwardConfig", "default_config"]


@dataclasses.dataclass(frozen=True)
class TritonBackend(KernelBackend):
    """Pallas kernels lowered through Triton: every feature of ``AttentionSpec``, head dims 16 to 256."""

    name = "triton"
    config_type = FlashConfig

    def supports(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> None:
        head_dim = q.shape[-1]
        if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            raise NotImplementedError(
                f"the Pallas kernels support head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got query {q.shape}"
            )
        if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"the Pallas kernels support bfloat16, float16 and float32, got {q.dtype}")
        if inputs.bias is not None and jnp.dtype(inputs.bias.dtype) not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"the Pallas kernels take a bfloat16, float16 or float32 bias, got {inputs.bias.dtype}")

    def default_config(self, q, k, spec: AttentionSpec) -> FlashConfig:
        return default_config(
            head_dim=q.shape[-1], dtype=q.dtype, causal=spec.causal, seq_q=q.shape[1], seq_k=k.shape[1]
        )

    def forward(self, q, k, v, inputs, spec, *, config: FlashConfig, interpret: bool):
        return flash_forward(q, k, v, inputs, spec=spec, config=config.fwd, interpret=interpret)

    def backward(self, q, k, v, out, lse, do, dlse, inputs, spec, *, config: FlashConfig, interpret: bool,
                 want_dbias: bool, want_dslopes: bool) -> Gradients:
        return flash_backward(
            q, k, v, out, lse, do, dlse, inputs, spec=spec, config=config.bwd, interpret=interpret,
            want_dbias=want_dbias, want_dslopes=want_dslopes,
        )
