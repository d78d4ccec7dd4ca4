"""Shared test setup: the platform, fresh random inputs, the one tolerance table.

Kernel tests run everywhere: on a CPU the Pallas kernels run in interpret mode
(the real kernel logic, small shapes from ``pallas_flash.testing.shapes.CPU_CASES``); on
a GPU the same tests run the compiled kernels on ``GPU_CASES``. Tests marked
``gpu`` need a GPU and are skipped elsewhere with that reason.
"""

from __future__ import annotations

import os
import secrets

# Four host devices, so the sharding and ring-attention tests run on a CPU
# (interpret mode); set before JAX starts. On a GPU this only affects the host
# platform; the GPU tests use the GPUs there are.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax
import jax.numpy as jnp
import pytest

ON_GPU = jax.default_backend() == "gpu"
HOST_DEVICES = len(jax.devices("cpu"))

# On NVIDIA GPUs XLA multiplies float32 in TF32 by default (errors ~1e-3). The
# XLA and Flax results the tests compare against must be float32, as on a CPU
# (our kernels multiply float32 in full float32 whatever this says).
jax.config.update("jax_default_matmul_precision", "highest")

# Relative error ||x - ref|| / ||ref|| against the float64 reference computed
# on the same (rounded) inputs, for outputs and for dq, dk, dv alike.
# float32 runs in full float32 (no TF32); bf16/fp16 carry the rounding of P
# and of the outputs (bf16 has 8 bits of mantissa, fp16 11).
TOLERANCE = {
    jnp.dtype(jnp.float32): 1e-4,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 4e-3,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; on CPU the kernels are covered in Pallas interpret mode")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Each compiled executable holds memory mappings, and jit caches keep them alive: the Mosaic GPU interpreter
# compiles every kernel's per-warpgroup jaxpr (about 200 mappings per interpreted kernel test), so one pytest
# process ran past Linux's vm.max_map_count (65530) and XLA aborted the process inside a compile. Past this
# many mappings, the caches are cleared after a test.
MAX_MAPPINGS_BEFORE_CLEARING = 30_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compile_caches():
    yield
    if _mappings() > MAX_MAPPINGS_BEFORE_CLEARING:
        jax.clear_caches()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (printed on failure); PALLAS_FLASH_SEED pins it to reproduce one."""
    value = int(os.environ.get("PALLAS_FLASH_SEED") or secrets.randbits(31))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Both backends' user caches in ``tmp_path``, read afresh; no shipped Mosaic table (the Mosaic config tests)."""
    from pallas_flash.backends.mosaic_gpu import config as mosaic_config
    from pallas_flash.backends.triton import config as triton_config

    monkeypatch.setenv("PALLAS_FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mosaic_config, "shipped_table", lambda gpu: {})
    triton_config.read_user_table.cache_clear()
    yield tmp_path
    triton_config.read_user_table.cache_clear()


from pallas_flash.testing.errors import rel_err  # noqa: E402, F401 - re-exported: NaN/inf in x gives inf
