"""The Mosaic GPU backend's configs: the forward kernel's blocks and pipeline depth, validated.

``MosaicConfig`` pairs the forward config with the backward's, which is the
Triton backend's ``BackwardConfig`` for as long as the backward delegates to
the Triton kernels (see ``pallas_flash.backends.mosaic_gpu``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_flash.backends.triton import config as triton_config

__all__ = ["MosaicForwardConfig", "MosaicConfig", "default_config", "smem_bytes", "HEAD_DIMS", "MAX_SMEM_BYTES"]

HEAD_DIMS = (64, 128, 256)
# Shared memory a CTA may use on sm_90 (227 KiB), less what the kernel keeps beside its tiles
# (barriers, the log-sum-exp staging buffers, Mosaic's own reserve).
MAX_SMEM_BYTES = 227 * 1024 - 4 * 1024
# Rows of one compute warpgroup's query tile: one wgmma M dimension (64) per warpgroup.
BLOCK_Q = 64


def smem_bytes(block_q: int, block_kv: int, num_stages: int, head_dim: int, dtype: Any) -> int:
    """Shared memory of the forward's tiles: two query tiles (one per compute warpgroup) and the K/V ring."""
    item = jnp.dtype(dtype).itemsize
    return item * head_dim * (2 * block_q + 2 * num_stages * block_kv)


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
    """Forward kernel: a CTA of two compute warpgroups (``block_q`` query rows each) and one memory warpgroup.

    ``block_kv``: keys per pipeline step (the N of the QK^T wgmma, the K of PV);
    ``num_stages``: K/V blocks in flight in the shared-memory ring.
    """

    block_q: int = BLOCK_Q
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MosaicForwardConfig.{name}={value!r} must be an int")
        if self.block_q != BLOCK_Q:
            raise ValueError(f"MosaicForwardConfig.block_q={self.block_q} must be {BLOCK_Q} (one wgmma M per warpgroup)")
        if self.block_kv not in (64, 128, 192, 256):
            raise ValueError(f"MosaicForwardConfig.block_kv={self.block_kv} must be one of 64, 128, 192, 256")
        if not 2 <= self.num_stages <= 6:
            raise ValueError(f"MosaicForwardConfig.num_stages={self.num_stages} must be in [2, 6]")

    def check_fits(self, head_dim: int, dtype: Any) -> None:
        """``ValueError`` when the tiles of this config would not fit in one CTA's shared memory."""
        need = smem_bytes(self.block_q, self.block_kv, self.num_stages, head_dim, dtype)
        if need > MAX_SMEM_BYTES:
            raise ValueError(
                f"{self} needs {need} bytes of shared memory at head_dim={head_dim} ({jnp.dtype(dtype).name}), "
                f"more than the {MAX_SMEM_BYTES} available: use a smaller block_kv or fewer num_stages"
            )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """The Mosaic backend's config: its forward kernel's, and the (Triton) backward's."""

    fwd: MosaicForwardConfig = MosaicForwardConfig()
    bwd: triton_config.BackwardConfig = triton_config.BackwardConfig()

    def __post_init__(self):
        if not isinstance(self.fwd, MosaicForwardConfig):
            raise TypeError(f"MosaicConfig.fwd must be a MosaicForwardConfig, got {type(self.fwd).__name__}")
        if not isinstance(self.bwd, triton_config.BackwardConfig):
            raise TypeError(f"MosaicConfig.bwd must be a Triton BackwardConfig, got {type(self.bwd).__name__}")


def _default_forward(head_dim: int, dtype: Any, causal: bool) -> MosaicForwardConfig:
    """The largest key block and deepest ring that fit: D=64 three 128-key stages, D=128 two, D=256 two 64-key stages.

    Non-causal D=64 takes 256-key blocks (two stages): 3% over 128-key blocks at N=4k on an H200
    (427.7 vs 415.6 TFLOP/s, one sweep, 2026-12-01); at D=128, 64-key blocks were 15-20% slower.
    """
    if head_dim <= 64 and not causal:
        return MosaicForwardConfig(block_kv=256, num_stages=2)
    for block_kv, stages in ((128, 3), (128, 2), (64, 2)):
        cfg = MosaicForwardConfig(block_kv=block_kv, num_stages=stages)
        if smem_bytes(cfg.block_q, block_kv, stages, head_dim, dtype) <= MAX_SMEM_BYTES:
            return cfg
    return MosaicForwardConfig(block_kv=64, num_stages=2)


def default_config(*, head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int) -> MosaicConfig:
    """The forward's heuristic config and the Triton backend's default backward config for this shape."""
    bwd = triton_config.default_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=seq_q, seq_k=seq_k).bwd
    return MosaicConfig(fwd=_default_forward(head_dim, dtype, causal), bwd=bwd)
