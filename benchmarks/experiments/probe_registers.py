"""What register budget and CTAs per SM Mosaic GPU compiles a warp-specialised kernel for (NOTES 116).

A trivial kernel of two, then three warpgroups (one raises its registers to 200, the other lowers to 56), run with
the PTX and ptxas reports on: ``MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=. python3
benchmarks/experiments/probe_registers.py 2>&1 | grep -E "maxntid|minnctapersm|Used [0-9]+ registers"``.
In jax 0.11.2 every kernel carries ``.minnctapersm 1``: one CTA per SM, whatever its threads.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def body(x_ref, o_ref, smem, bar):
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _copy():
        plgpu.set_max_registers(200, action="increase")
        plgpu.copy_gmem_to_smem(x_ref, smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        plgpu.copy_smem_to_gmem(smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _idle():
        plgpu.set_max_registers(56, action="decrease")


for wgs in (2, 3):
    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((128, 128), jnp.float32),
                          scratch_types=[plgpu.SMEM((128, 128), jnp.float32), plgpu.Barrier(num_barriers=1)],
                          num_threads=wgs, thread_name="wg", kernel_name=f"probe_registers_{wgs}wg")
    print(wgs, "warpgroups, sum", float(jax.jit(kernel)(jnp.ones((128, 128), jnp.float32)).sum()), flush=True)
