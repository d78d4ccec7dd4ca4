"""Where a jitted step's GPU time goes: kernel time per step from a ``jax.profiler`` trace.

``kernel_breakdown(run, steps)`` traces one call of ``run()`` (``steps`` steps, waited
for) and sums each kernel's duration on the GPU plane's compute streams, grouped by
name: ``attention`` (``pallas_flash_*``, cuDNN's fused attention and its passes beside it, JAX's Pallas ``mha``),
``matmul`` (cuBLAS/cuBLASLt/CUTLASS GEMMs), ``copy`` (memcpy/memset) and ``other``
(XLA's fusions: elementwise, reductions, layer norms, the optimizer, XLA's unfused
attention). Without a GPU plane (a CPU run) the result is ``None``.
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
    # cuDNN's: its fused kernels (``cudnn_generated_...sdpa...``) and the passes beside them (``void cudnn::fusion::
    # compute_dot_do_o_specialized<...>``, ``convert_dq_to_16bits``); the memset of its float32 dQ stays a copy
    if k.startswith("pallas_flash") or "sdpa" in k or "flash_fprop" in k or "flash_bprop" in k or "cudnn" in k:
        return "attention"
    if k == "mha" or k.startswith("mha_"):  # JAX's Pallas (Triton) attention
        return "attention"
    if any(s in k for s in ("gemm", "xmma", "nvjet", "cutlass", "wgmma")):
        return "matmul"
    if "memcpy" in k or "memset" in k:
        return "copy"
    return "other"


def gpu_kernel_events(profile_data) -> list[tuple[float, float, str]] | None:
    """``(start_ns, end_ns, name)`` of every kernel on the GPU compute streams, sorted by start.

    None without a GPU plane (a CPU trace).
    """
    events = []
    found = False
    for plane in profile_data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        found = True
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # skip the derived "XLA Ops"/"XLA Modules" lines
                continue
            events.extend((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events)
    return sorted(events) if found else None


def kernel_totals(events: list[tuple[float, float, str]]) -> dict[str, float]:
    """Total nanoseconds per kernel name."""
    totals: dict[str, float] = collections.defaultdict(float)
    for start, end, name in events:
        totals[name] += end - start
    return dict(totals)


def idle_gaps(events: list[tuple[float, float, str]], steps: int, top: int = 15) -> dict[str, Any]:
    """When the GPU runs no kernel between the first and the last one traced.

    Returns the idle milliseconds per step, the kernel launches per step, and
    the ``top`` kernels that the GPU waited longest for (idle time summed over
    the gaps that end with that kernel's start), which points at host-side
    launch overhead or synchronisation.
    """
    idle_before: dict[str, float] = collections.defaultdict(float)
    idle = 0.0
    busy_until = None
    for start, end, name in events:
        if busy_until is not None and start > busy_until:
            idle += start - busy_until
            idle_before[name] += start - busy_until
        busy_until = end if busy_until is None else max(busy_until, end)
    ranked = sorted(idle_before.items(), key=lambda kv: -kv[1])[:top]
    return {
        "idle_ms_per_step": idle / steps / 1e6,
        "launches_per_step": len(events) / steps,
        "idle_before": [(name, ns / steps / 1e6) for name, ns in ranked],
    }


def summarize(kernel_ns: dict[str, float], steps: int, top: int = 40) -> dict[str, Any]:
    """Milliseconds per step by category, their sum, and the ``top`` kernels by time."""
    per_step = {name: ns / steps / 1e6 for name, ns in kernel_ns.items()}
    cats = {c: 0.0 for c in CATEGORIES}
    for name, ms in per_step.items():
        cats[category(name)] += ms
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1])[:top]
    return {"ms_per_step": cats, "kernel_ms_per_step": sum(per_step.values()), "top": ranked}


def kernel_breakdown(run: Callable[[], Any], steps: int) -> dict[str, Any] | None:
    """Trace one call of ``run``, which runs ``steps`` steps and waits for them, and
    summarise the GPU kernel time and idle time per step (None on a CPU)."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run()
        paths = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not paths:
            return None
        events = gpu_kernel_events(ProfileData.from_file(paths[-1]))
    if events is None:
        return None
    return {**summarize(kernel_totals(events), steps), **idle_gaps(events, steps)}
