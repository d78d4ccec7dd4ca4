"""The Pallas Mosaic GPU backend (Hopper, sm_90): ``implementation="mosaic"``.

Files: ``forward.py`` (the warp-specialised TMA + wgmma forward kernel, one CTA
per query tile or persistent, and its launcher), ``forward_schedules.py`` (its
compute warpgroups' two schedules: turn-taking, and FlashAttention-3's
intra-warpgroup overlap), ``backward.py`` (the backward's design and its padding and dispatch),
``backward_dkdv.py`` (the dK/dV kernel, with dQ fused by TMA reductions or, in the
deterministic mode, the default, the separate dQ kernel of ``backward_dq.py``), ``backward_wide.py`` (the head-dim-256 backward: the two
compute warpgroups split by role, not by rows), ``common.py`` (what all the
kernels share: warpgroup roles, layouts, tiles, the memory warpgroup's
loops), ``config.py`` (``MosaicConfig``: the kernels' blocks and pipeline
depths), ``tune.py`` (the tuner's space).

The kernels compute plain and causal attention with GQA/MQA, any sequence
lengths (Tq != Tk, not block multiples), head dims 64, 128 and 256, in
bfloat16 and float16, with

- per-batch sequence lengths (``query_seq_lengths``/``key_value_seq_lengths``:
  blocks past a row's lengths are not loaded; ``tests/test_mosaic_lengths.py``);
- local windows (``local_window_size``: each query tile streams only the key
  blocks its window reaches, and only blocks that cross a window edge are
  masked; ``tests/test_mosaic_window.py``);
- segment ids (``q_segment_ids``/``kv_segment_ids``, packed documents: the ids
  travel by TMA with the K (or Q) blocks, and for sorted ids each tile streams
  only the blocks its segments span, and blocks wholly inside the tile's one
  segment go unmasked; ``tests/test_mosaic_segments.py``).

Each is tested in interpret mode and on the GPU. Everything else (masks, bias,
ALiBi, soft-cap, dropout, position offsets, float32, other head dims, GPUs other
than compute capability 9.0) is refused by ``supports`` with
``NotImplementedError``, so a caller can fall back to ``"triton"``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_flash.backends.base import Gradients, KernelBackend
from pallas_flash.backends.mosaic_gpu import common
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.config import (
    HEAD_DIMS,
    MosaicBackwardConfig,
    MosaicConfig,
    MosaicForwardConfig,
    default_config,
)
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.backends.triton.config import gpu_capability
from pallas_flash.spec import AttentionInputs, AttentionSpec

SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16))
COMPUTE_CAPABILITY = "9.0"
# The optional features (``AttentionSpec.features`` keys) that ``supports`` lets through to the kernels.
KERNEL_FEATURES: frozenset[str] = frozenset({"lengths", "window", "segments"})

__all__ = ["MosaicBackend", "MosaicConfig", "MosaicForwardConfig", "MosaicBackwardConfig", "default_config"]


def _gpu_compute_capability() -> str | None:
    """The first GPU's compute capability (``"9.0"``), or None without a GPU."""
    if jax.default_backend() != "gpu":
        return None
    return gpu_capability() or None


@dataclasses.dataclass(frozen=True)
class MosaicBackend(KernelBackend):
    """The Mosaic GPU forward and backward kernels (sm_90); the backward recomputes the probabilities
    from the forward's residuals ``(q, k, v, out, lse2)`` (``lse2`` in the log2 domain)."""

    name = "mosaic"
    config_type = MosaicConfig
    interpret_has_effects = True  # plgpu's interpreter: interpreted calls run unpartitioned

    def supports(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> None:
        features = [phrase for key, phrase in spec.features().items() if key not in KERNEL_FEATURES]
        if features:
            raise NotImplementedError(f"the Mosaic GPU kernels do not implement {', '.join(features)}")
        if not spec.scale > 0:  # masked logits are -inf before the scale: a scale <= 0 would make them +inf or NaN
            raise NotImplementedError(f"the Mosaic GPU kernels need a positive scale, got scale={spec.scale}")
        if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"the Mosaic GPU kernels support bfloat16 and float16, got {q.dtype}")
        if q.shape[-1] not in HEAD_DIMS:
            raise NotImplementedError(
                f"the Mosaic GPU kernels support head_dim in {HEAD_DIMS}, got query {tuple(q.shape)}"
            )
        capability = _gpu_compute_capability()
        if capability is not None and capability != COMPUTE_CAPABILITY:
            raise NotImplementedError(
                f"the Mosaic GPU kernels need an sm_90 (Hopper) GPU, this one has compute capability {capability}"
            )

    def default_config(self, q, k, spec: AttentionSpec) -> MosaicConfig:
        config = default_config(
            head_dim=q.shape[-1], dtype=q.dtype, causal=spec.causal, seq_q=q.shape[1], seq_k=k.shape[1],
            features=frozenset(spec.features()), kv_groups=q.shape[2] // max(k.shape[2], 1),  # no heads: 0 // 1
            batch_heads=q.shape[0] * q.shape[2],
        )
        if jax.default_backend() != "gpu" and not common.interpret_fits(config.fwd.compute_wgs):
            # No GPU: the kernels run in interpret mode, where three compute warpgroups buy nothing and may not
            # fit the host's threads (a hang); two compute the same attention.
            config = dataclasses.replace(config, fwd=dataclasses.replace(config.fwd, compute_wgs=common.COMPUTE_WGS))
        return config

    def forward(self, q, k, v, inputs, spec, *, config: MosaicConfig, interpret: bool):
        return mosaic_forward(q, k, v, inputs, spec=spec, config=config.fwd, interpret=interpret)

    def backward(self, q, k, v, out, lse, do, dlse, inputs, spec, *, config: MosaicConfig, interpret: bool,
                 want_dbias: bool, want_dslopes: bool) -> Gradients:
        if want_dbias or want_dslopes:  # ``supports`` refuses bias and ALiBi: never asked for
            raise NotImplementedError("the Mosaic GPU backward computes no bias or ALiBi-slope gradients")
        return mosaic_backward(q, k, v, out, lse, do, dlse, spec=spec, config=config.bwd, inputs=inputs,
                               interpret=interpret)
