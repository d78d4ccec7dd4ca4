"""What the Mosaic GPU backward kernels share: warpgroup roles, register split, layouts, shared-memory tiles.

Both kernels (``backward.py``'s dK/dV kernel, ``backward_dq.py``'s dQ kernel)
run one CTA of two compute warpgroups and one memory warpgroup, like the
forward. ``mma`` is the one place a wgmma takes its left operand from
registers: in interpret mode (no interpreter rule for that in jax 0.11.2) it is
fed from a shared-memory copy instead.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

COMPUTE_WGS = 2
MEMORY_WG = COMPUTE_WGS
COMPUTE_REGISTERS = 232
MEMORY_REGISTERS = 40
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
i32 = functools.partial(jnp.asarray, dtype=jnp.int32)  # loop bounds stay int32 under jax_enable_x64


def tiled_smem(shape, dtype, swizzle: int = 128):
    """Shared memory in the wgmma/TMA operand layout: 8-row tiles one swizzle span wide."""
    cols = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(swizzle)))


def interpret_params(interpret):
    """``interpret``: False (compiled), True (default interpret mode) or an ``InterpretGPUParams`` (e.g. ``detect_races``)."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


def bcast(x, shape, dim: int):
    return lax.broadcast_in_dim(x, shape, [dim])


def mma(acc_ref, a, b_ref, stage, interpret: bool):
    """``acc += a @ b`` with ``a`` in registers (through ``stage`` in shared memory in interpret mode)."""
    if interpret:
        stage[...] = a
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, stage, b_ref)
    else:
        plgpu.wgmma(acc_ref, a, b_ref)
