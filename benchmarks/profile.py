"""Where a jitted step's GPU time goes: kernel time per step from a ``jax.profiler`` trace.

``kernel_breakdown(run, steps)`` traces ``steps`` calls of ``run()`` (each call
synchronised by the caller), reads the trace's GPU plane and sums each kernel's
duration on the compute streams. Kernels are grouped by name:

* ``attention``: pallas_flash's kernels (``pallas_flash_*``), cuDNN's fused
  attention (``*sdpa*``, ``*flash_fprop*``/``*flash_bprop*``, ``cudnn*``) and
  JAX's Pallas ``mha``;
* ``matmul``: cuBLAS/cuBLASLt/CUTLASS GEMMs (``gemm``, ``xmma``, ``nvjet``, ``cutlass``);
* ``copy``: memcpy/memset;
* ``other``: everything else (XLA's fusions: elementwise, reductions, layer norms,
  softmax and the optimizer, and XLA's own unfused attention).

Without a GPU plane in the trace (a CPU run) the result is ``None``.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from typing import Any, Callable

CATEGORIES = ("attention", "matmul", "copy", "other")


def category(kernel: str) -> str:
    """The group of a GPU kernel, by its name."""
    k = kernel.lower()
    if k.startswith("pallas_flash") or "sdpa" in k or "flash_fprop" in k or "flash_bprop" in k or k.startswith("cudnn") or k == "mha" or k.startswith("mha_"):
        return "attention"
    if any(s in k for s in ("gemm", "xmma", "nvjet", "cutlass", "wgmma")):
        return "matmul"
    if "memcpy" in k or "memset" in k:
        return "copy"
    return "other"


def gpu_kernel_ns(profile_data) -> dict[str, float] | None:
    """Total nanoseconds per kernel name on the GPU compute streams, or None without a GPU plane."""
    totals: dict[str, float] = collections.defaultdict(float)
    found = False
    for plane in profile_data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        found = True
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # skip the derived "XLA Ops"/"XLA Modules" lines
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
    return dict(totals) if found else None


def summarize(kernel_ns: dict[str, float], steps: int, top: int = 10) -> dict[str, Any]:
    """Milliseconds per step by category, their sum, and the ``top`` kernels by time."""
    per_step = {name: ns / steps / 1e6 for name, ns in kernel_ns.items()}
    cats = {c: 0.0 for c in CATEGORIES}
    for name, ms in per_step.items():
        cats[category(name)] += ms
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1])[:top]
    return {"ms_per_step": cats, "kernel_ms_per_step": sum(per_step.values()), "top": ranked}


def kernel_breakdown(run: Callable[[], Any], steps: int) -> dict[str, Any] | None:
    """Trace ``steps`` calls of ``run`` and summarise the GPU kernel time per step (None on a CPU)."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        paths = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not paths:
            return None
        kernel_ns = gpu_kernel_ns(ProfileData.from_file(paths[-1]))
    return None if kernel_ns is None else summarize(kernel_ns, steps)
