"""Attention benchmark: pallas_flash against cuDNN, XLA and JAX's own Pallas kernel.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python3 -m benchmarks.attention --quick
    PYTHONPATH=. python3 -m benchmarks.attention --head-dims 64,128 --seq-lens 1k,4k,16k \\
        --impls pallas_flash,cudnn,pallas_mha --only fwd,fwd_bwd --dtypes bf16
    PYTHONPATH=. python3 -m benchmarks.attention --memory

Every implementation runs in this one process on the same inputs:

* ``pallas_flash``: ``pallas_flash.dot_product_attention(..., implementation="pallas")``;
* ``cudnn`` and ``xla``: ``jax.nn.dot_product_attention(..., implementation=...)``;
* ``pallas_mha``: ``jax.experimental.pallas.ops.gpu.attention.mha`` (needs Tq and
  Tk multiples of its 128 block; it has no GQA, so for GQA shapes K and V are
  repeated to all query heads with ``jnp.repeat`` inside the timed function).

Each (implementation, pass, shape, dtype) is first checked against a float32
XLA computation on the same inputs (the output, and for backward passes dq, dk
and dv under a random cotangent), then timed (see ``benchmarks.timing``).
Wrong results show as FAIL, out-of-memory as OOM, unsupported as n/a, other
exceptions as ERR; none are dropped. Results go to
``benchmarks/results/<device>/<date>[-tag].{md,jsonl,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import warnings
from typing import Callable, Sequence

from benchmarks import report
from pallas_flash.testing.shapes import Shape, paper_grid

IMPLS = ("pallas_flash", "cudnn", "xla", "pallas_mha")
PASSES = ("fwd", "fwd_bwd", "bwd")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32"}
# ||out - ref|| / ||ref|| must be under this (and not NaN) for a result to count.
TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 5e-3}
MEMORY_IMPLS = ("pallas_flash", "xla", "cudnn")
MEMORY_SHAPE = dict(batch=1, heads=16, head_dim=128, causal=True)
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

# Defaults: (full run, --quick, --allow-cpu smoke run on a machine without a GPU).
DEFAULTS = {
    "full": dict(
        head_dims=(64, 128, 256),
        seq_lens=(512, 1024, 2048, 4096, 8192, 16384, 32768),
        causal=(False, True),
        gqa=(1, 4),
        dtypes=("bf16", "fp16"),
        passes=("fwd", "fwd_bwd", "bwd"),
        impls=IMPLS,
        min_time=0.5,
        batch_tokens=16384,
        hidden=2048,
    ),
    "quick": dict(
        head_dims=(64, 128),
        seq_lens=(1024, 4096),
        causal=(False, True),
        gqa=(1,),
        dtypes=("bf16",),
        passes=("fwd", "fwd_bwd"),
        impls=("pallas_flash", "cudnn"),  # the headline pair; a run is compile-bound, each impl adds ~5 s per shape
        min_time=0.2,
        batch_tokens=16384,
        hidden=2048,
    ),
    "cpu": dict(
        head_dims=(32,),
        seq_lens=(128,),
        causal=(False, True),
        gqa=(1,),
        dtypes=("bf16",),
        passes=("fwd", "fwd_bwd", "bwd"),
        impls=IMPLS,
        min_time=0.02,
        batch_tokens=256,
        hidden=64,
    ),
}
MEMORY_SEQ_LENS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k


# --- implementations -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Impl:
    """One attention implementation: ``build(shape)`` returns ``f(q, k, v) -> out``.

    ``build`` raises ``NotImplementedError`` for shapes the implementation does
    not support (shown as n/a).
    """

    name: str
    build: Callable[[Shape], Callable]
    note: str = ""


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _build_pallas_flash(shape: Shape):
    import pallas_flash

    def f(q, k, v):
        return pallas_flash.dot_product_attention(q, k, v, is_causal=shape.causal, implementation="pallas")

    return f


def _build_jax_nn(implementation: str):
    def build(shape: Shape):
        import jax

        if implementation == "cudnn" and not _on_gpu():
            raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")

        def f(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=shape.causal, implementation=implementation)

        return f

    return build


def _import_pallas_mha():
    """JAX's Pallas GPU attention module (its import warns that it is deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention

    return attention


def _build_pallas_mha(shape: Shape):
    import jax.numpy as jnp

    mod = _import_pallas_mha()
    blocks = mod.BlockSizes.get_default()
    for name, t in (("Tq", shape.seq_q), ("Tk", shape.seq_k)):
        if t % min(blocks.block_q, t):
            raise NotImplementedError(f"pallas_mha needs {name}={t} to be a multiple of its block {blocks.block_q}")
    groups = shape.num_heads // shape.num_kv_heads
    scale = 1.0 / math.sqrt(shape.head_dim)
    interpret = not _on_gpu()

    def f(q, k, v):
        if groups > 1:  # no GQA in this kernel: materialise the repeated K/V
            k = jnp.repeat(k, groups, axis=2)
            v = jnp.repeat(v, groups, axis=2)
        return mod.mha(
            q, k, v, None, sm_scale=scale, causal=shape.causal, block_sizes=blocks, interpret=interpret
        )

    return f


IMPL_REGISTRY: dict[str, Impl] = {
    "pallas_flash": Impl("pallas_flash", _build_pallas_flash, "pallas_flash.dot_product_attention(implementation='pallas')"),
    "cudnn": Impl("cudnn", _build_jax_nn("cudnn"), "jax.nn.dot_product_attention(implementation='cudnn')"),
    "xla": Impl("xla", _build_jax_nn("xla"), "jax.nn.dot_product_attention(implementation='xla')"),
    "pallas_mha": Impl(
        "pallas_mha",
        _build_pallas_mha,
        "jax.experimental.pallas.ops.gpu.attention.mha, default BlockSizes; for GQA, K/V repeated with jnp.repeat inside the timed function",
    ),
}


# --- inputs, passes, reference ---------------------------------------------


def make_inputs(shape: Shape, dtype, key):
    """Random normal q, k, v and an output cotangent g (never zeros)."""
    import jax

    kq, kk, kv, kg = jax.random.split(key, 4)
    return (
        jax.random.normal(kq, shape.q_shape, dtype),
        jax.random.normal(kk, shape.kv_shape, dtype),
        jax.random.normal(kv, shape.kv_shape, dtype),
        jax.random.normal(kg, shape.q_shape, dtype),
    )


def fwd_bwd_fn(f):
    """``(q, k, v, g) -> (out, (dq, dk, dv))``: one forward and its backward."""
    import jax

    def fb(q, k, v, g):
        out, pullback = jax.vjp(f, q, k, v)
        return out, pullback(g)

    return fb


@dataclasses.dataclass
class Reference:
    """Reference outputs in float32 (``None`` where not available) and where they came from."""

    out: object = None
    grads: tuple | None = None
    source: str | None = None  # "f32-xla", "cudnn", or None
    note: str = ""


def _chunk_plan(batch: int, kv_heads: int, groups: int, seq_q: int, seq_k: int, factor: int, budget: int):
    """(batches, kv heads, query rows) per reference chunk, each dividing its axis.

    A chunk materialises about ``factor`` float32 arrays of
    ``batches * kv_heads * groups * rows * seq_k``; that must fit ``budget``.
    """

    def largest_divisor_at_most(n, cap):
        cap = max(1, min(n, cap))
        return next(d for d in range(cap, 0, -1) if n % d == 0)

    per_row = groups * seq_k * 4 * factor
    rows = seq_q
    while rows * per_row > budget and rows % 2 == 0 and rows > 8:
        rows //= 2
    if rows * per_row > budget:
        raise MemoryError(f"reference chunk of {rows} query rows needs {rows * per_row / 2**30:.1f} GiB")
    heads = largest_divisor_at_most(kv_heads, budget // (rows * per_row)) if rows == seq_q else 1
    batches = largest_divisor_at_most(batch, budget // (heads * rows * per_row)) if heads == kv_heads else 1
    return batches, heads, rows


def _ref_chunk_fn(causal: bool, grads: bool):
    """Jitted float32 XLA attention on one chunk (query rows offset by ``offset``)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(q, k, v, g, offset):
        q, k, v, g = (x.astype(jnp.float32) for x in (q, k, v, g))

        def f(q, k, v):
            mask = None
            if causal:  # top-left aligned at the chunk's absolute query position
                rows = offset + jnp.arange(q.shape[1])[:, None]
                cols = jnp.arange(k.shape[1])[None, :]
                mask = (cols <= rows)[None, None]
            with jax.default_matmul_precision("highest"):
                return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

        if not grads:
            return f(q, k, v), None
        out, pullback = jax.vjp(f, q, k, v)
        return out, pullback(g)

    return run


def reference_f32(q, k, v, g, causal: bool, grads: bool, budget_bytes: int):
    """Float32 XLA attention (and gradients under cotangent ``g``), computed in chunks.

    Chunks split batch, KV-head groups and query rows so that the materialised
    ``[chunk, Tq, Tk]`` logits stay within ``budget_bytes``; key/value
    gradients are summed over query chunks. Returns ``(out, (dq, dk, dv) or None)``.
    """
    import jax.numpy as jnp

    B, Tq, N, _ = q.shape
    Tk, K = k.shape[1], k.shape[2]
    G = N // K
    nb, nk, tq = _chunk_plan(B, K, G, Tq, Tk, 6 if grads else 3, budget_bytes)
    run = _ref_chunk_fn(causal, grads)
    outs_b, grads_b = [], []
    for b0 in range(0, B, nb):
        outs_h, grads_h = [], []
        for h0 in range(0, K, nk):
            qs, ks = slice(h0 * G, (h0 + nk) * G), slice(h0, h0 + nk)
            kc, vc = k[b0 : b0 + nb, :, ks], v[b0 : b0 + nb, :, ks]
            outs_q, dqs, dk, dv = [], [], None, None
            for r0 in range(0, Tq, tq):
                qc = q[b0 : b0 + nb, r0 : r0 + tq, qs]
                gc_ = g[b0 : b0 + nb, r0 : r0 + tq, qs]
                out, gr = run(qc, kc, vc, gc_, jnp.int32(r0))
                outs_q.append(out)
                if grads:
                    dqs.append(gr[0])
                    dk = gr[1] if dk is None else dk + gr[1]
                    dv = gr[2] if dv is None else dv + gr[2]
            outs_h.append(jnp.concatenate(outs_q, axis=1))
            if grads:
                grads_h.append((jnp.concatenate(dqs, axis=1), dk, dv))
        outs_b.append(jnp.concatenate(outs_h, axis=2))
        if grads:
            grads_b.append(tuple(jnp.concatenate([gh[i] for gh in grads_h], axis=2) for i in range(3)))
    out = jnp.concatenate(outs_b, axis=0)
    if not grads:
        return out, None
    return out, tuple(jnp.concatenate([gb[i] for gb in grads_b], axis=0) for i in range(3))


def compute_reference(shape: Shape, inputs, need_grads: bool, mode: str, budget_bytes: int) -> Reference:
    """The reference for one shape: float32 XLA, else cuDNN (``mode="f32"`` falls back), else none."""
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import classify_exception, short_message

    q, k, v, g = inputs
    if mode == "none":
        return Reference(note="not checked (--ref none)")
    notes = []
    if mode == "f32":
        try:
            out, grads = reference_f32(q, k, v, g, shape.causal, need_grads, budget_bytes)
            jax.block_until_ready((out, grads))
            return Reference(out, grads, "f32-xla")
        except Exception as e:  # noqa: BLE001 - any failure means: try the next reference
            status = classify_exception(e)
            notes.append("ref too large" if status == "OOM" or isinstance(e, MemoryError) else f"f32 ref {status}: {short_message(e, 120)}")
            gc.collect()
    try:
        f = IMPL_REGISTRY["cudnn"].build(shape)
        if need_grads:
            out, grads = jax.jit(fwd_bwd_fn(f))(q, k, v, g)
            grads = tuple(x.astype(jnp.float32) for x in grads)
        else:
            out, grads = jax.jit(f)(q, k, v), None
        out = out.astype(jnp.float32)
        jax.block_until_ready((out, grads))
        return Reference(out, grads, "cudnn", "; ".join(notes + ["checked against cuDNN"]))
    except Exception as e:  # noqa: BLE001
        notes.append(f"cuDNN ref {classify_exception(e)}")
    return Reference(note="; ".join(notes) or "no reference")


@functools.lru_cache(maxsize=None)
def _rel_err_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def rel_err(x, ref):
        d = x.astype(jnp.float32) - ref
        return jnp.sqrt(jnp.sum(d * d)) / jnp.sqrt(jnp.sum(ref * ref))

    return rel_err


def check_outputs(named: dict, ref: Reference) -> dict[str, float]:
    """Relative error of each named output (``out``, ``dq``, ``dk``, ``dv``) that has a reference."""
    rel_err = _rel_err_fn()
    ref_of = {"out": ref.out}
    if ref.grads is not None:
        ref_of.update(zip(("dq", "dk", "dv"), ref.grads))
    errs = {}
    for name, x in named.items():
        if ref_of.get(name) is not None:
            errs[name] = float(rel_err(x, ref_of[name]))
    return errs


# --- one implementation on one shape ---------------------------------------


@dataclasses.dataclass
class Options:
    """Everything the harness needs, parsed and validated (see ``parse_args``)."""

    head_dims: tuple[int, ...]
    seq_lens: tuple[int, ...]
    causal: tuple[bool, ...]
    gqa: tuple[int, ...]
    dtypes: tuple[str, ...]
    passes: tuple[str, ...]
    impls: tuple[str, ...]
    batch_tokens: int
    hidden: int
    min_time: float
    warmup: int
    ref: str
    ref_budget_gb: float
    memory: bool
    memory_method: str
    out: str | None
    tag: str | None
    time_budget: float | None
    allow_cpu: bool
    plots: bool
    seed: int
    compile_cache: str | None
    jobs: int
    report_from: tuple[str, ...]
    profile: str  # "full", "quick" or "cpu": which defaults filled the unset options
    argv: tuple[str, ...] = ()


def _shape_fields(shape: Shape, dtype_name: str, gqa: int) -> dict:
    return dict(
        name=shape.name,
        dtype=dtype_name,
        gqa=gqa,
        batch=shape.batch,
        seq_q=shape.seq_q,
        seq_k=shape.seq_k,
        heads=shape.num_heads,
        kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        causal=shape.causal,
    )


@dataclasses.dataclass
class Prepared:
    """The jitted functions of one implementation on one shape (or why there are none)."""

    impl: Impl
    error: Exception | None = None
    fwd: Callable | None = None  # (q, k, v) -> out
    fwd_bwd: Callable | None = None  # (q, k, v, g) -> (out, (dq, dk, dv))
    make_pullback: Callable | None = None  # (q, k, v) -> pullback (a pytree holding the residuals)
    pullback: Callable | None = None  # (pullback, g) -> (dq, dk, dv)


def prepare(impl: Impl, shape: Shape) -> Prepared:
    import jax

    try:
        f = impl.build(shape)
    except Exception as e:  # noqa: BLE001 - unsupported or unavailable implementation
        return Prepared(impl, error=e)
    return Prepared(
        impl,
        fwd=jax.jit(f),
        fwd_bwd=jax.jit(fwd_bwd_fn(f)),
        make_pullback=jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1]),
        pullback=jax.jit(lambda pb, g: pb(g)),
    )


def precompile(prepared: Sequence[Prepared], example, passes: Sequence[str], threads: int) -> float:
    """Compile every function the passes will call, ``threads`` XLA compilations at a time.

    Lowering (Python) runs here in turn; ``compile()`` (C++, releases the GIL)
    runs in a thread pool. A compiled ``Lowered`` fills the same cache that the
    later calls hit. Any error is ignored here: the call in ``bench_impl``
    repeats it and records it. Returns the wall seconds spent.
    """
    import concurrent.futures

    import jax

    t0 = time.perf_counter()
    q, k, v, g = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example)
    lowered = []
    for p in prepared:
        if p.error is not None:
            continue
        todo = []
        if "fwd" in passes:
            todo.append(lambda p=p: p.fwd.lower(q, k, v))
        if "fwd_bwd" in passes:
            todo.append(lambda p=p: p.fwd_bwd.lower(q, k, v, g))
        if "bwd" in passes:
            todo.append(lambda p=p: p.make_pullback.lower(q, k, v))
            todo.append(lambda p=p: p.pullback.lower(jax.eval_shape(p.make_pullback, q, k, v), g))
        for lower in todo:
            try:
                lowered.append(lower())
            except Exception:  # noqa: BLE001 - recorded when the function is called
                pass

    def compile_one(low):
        try:
            low.compile()
        except Exception:  # noqa: BLE001 - recorded when the function is called
            pass

    if threads > 1 and len(lowered) > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(compile_one, lowered))
    else:
        for low in lowered:
            compile_one(low)
    return time.perf_counter() - t0


def bench_impl(prep: Prepared, shape: Shape, dtype_name: str, gqa: int, sets: list, ref: Reference, opts: Options) -> list[dict]:
    """Check then time one implementation on ``shape`` for each requested pass; one record per pass.

    ``sets`` are input tuples ``(q, k, v, g)``; the first is the one checked.
    """
    import jax

    from benchmarks.timing import classify_exception, short_message, time_fn

    base = dict(kind="speed", impl=prep.impl.name, **_shape_fields(shape, dtype_name, gqa))
    tol = TOLERANCE[dtype_name]
    if prep.error is not None:
        status, message = classify_exception(prep.error), short_message(prep.error)
        return [dict(base, **{"pass": p}, status=status, message=message) for p in opts.passes]

    records = []
    for pass_ in opts.passes:
        rec = dict(base, **{"pass": pass_}, tol=tol, flops=shape.flops(pass_))
        fn = args = first = named = None
        try:
            t0 = time.perf_counter()
            if pass_ == "fwd":
                fn, args = prep.fwd, [s[:3] for s in sets]
                first = fn(*args[0])
                named = {"out": first}
            elif pass_ == "fwd_bwd":
                fn, args = prep.fwd_bwd, [tuple(s) for s in sets]
                first = fn(*args[0])
                named = {"out": first[0], **dict(zip(("dq", "dk", "dv"), first[1]))}
            else:  # bwd: the pullback alone, its residuals computed beforehand
                fn = prep.pullback
                args = [(prep.make_pullback(*s[:3]), s[3]) for s in sets]
                first = fn(*args[0])
                named = dict(zip(("dq", "dk", "dv"), first))
            jax.block_until_ready(first)
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)

            errs = check_outputs(named, ref) if ref.source not in (None, prep.impl.name) else {}
            rec.update(errs=errs, checked=bool(errs), ref=ref.source if errs else None)
            if ref.note:
                rec["message"] = ref.note
            if errs:
                err = max(errs.values()) if all(e == e for e in errs.values()) else float("nan")
                rec["err"] = err
                if not (err < tol):  # also catches NaN
                    rec["status"] = "FAIL"
                    records.append(rec)
                    continue
            first = named = None  # drop the checked outputs before timing

            timing = time_fn(fn, args, min_time=opts.min_time, warmup=opts.warmup)
            rec.update(
                status="ok",
                time_s=timing.median_s,
                tflops=rec["flops"] / timing.median_s / 1e12,
                timing=timing.as_dict(),
            )
        except Exception as e:  # noqa: BLE001 - every failure becomes a table cell
            rec.update(status=classify_exception(e), message=short_message(e))
        finally:
            fn = args = first = named = None  # free this pass's buffers before the next
        records.append(rec)
    return records


def bench_shape(shape: Shape, dtype_name: str, gqa: int, opts: Options, key, on_record: Callable[[dict], None]) -> None:
    """All requested implementations on one shape, on shared inputs and one reference."""
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import num_input_sets, tree_nbytes

    dtype = jnp.dtype(DTYPE_NAMES[dtype_name])
    inputs = make_inputs(shape, dtype, key)
    n_sets = num_input_sets(tree_nbytes(inputs))
    sets = [inputs] + [make_inputs(shape, dtype, k) for k in jax.random.split(jax.random.fold_in(key, 1), n_sets - 1)]
    prepared = [prepare(IMPL_REGISTRY[name], shape) for name in opts.impls]
    compile_s = precompile(prepared, inputs, opts.passes, opts.jobs)
    need_grads = any(p != "fwd" for p in opts.passes)
    ref = compute_reference(shape, inputs, need_grads, opts.ref, int(opts.ref_budget_gb * 2**30))
    for prep in prepared:
        for rec in bench_impl(prep, shape, dtype_name, gqa, sets, ref, opts):
            rec["shape_compile_s"] = round(compile_s, 2)
            on_record(rec)
        gc.collect()
    del sets, inputs, ref, prepared
    gc.collect()


# --- memory sweep -----------------------------------------------------------


def memory_point(impl_name: str, seq: int, dtype_name: str, measure: bool, head_dim: int = 128, heads: int = 16) -> dict:
    """Peak memory of one jitted forward+backward (B=1, causal) of ``impl_name`` at length ``seq``.

    Always records the compiled executable's memory analysis (arguments +
    outputs + temporaries - aliased bytes); with ``measure`` also runs it and
    reads the device's ``peak_bytes_in_use`` (meaningful only in a fresh
    process, which is why ``run_memory`` starts one per point).
    """
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import classify_exception, short_message

    shape = Shape(f"mem_n{seq}", MEMORY_SHAPE["batch"], seq, seq, heads, heads, head_dim, MEMORY_SHAPE["causal"])
    dtype = jnp.dtype(DTYPE_NAMES[dtype_name])
    itemsize = dtype.itemsize
    rec = dict(
        kind="memory",
        impl=impl_name,
        method="measured" if measure else "analysis",
        **_shape_fields(shape, dtype_name, 1),
        # q, k, v, g in; out, dq, dk, dv out
        io_bytes=8 * shape.batch * seq * heads * head_dim * itemsize,
    )
    try:
        f = IMPL_REGISTRY[impl_name].build(shape)
        fb = jax.jit(fwd_bwd_fn(f))
        specs = [jax.ShapeDtypeStruct(s, dtype) for s in (shape.q_shape, shape.kv_shape, shape.kv_shape, shape.q_shape)]
        compiled = fb.lower(*specs).compile()
        ma = compiled.memory_analysis()
        if ma is not None:
            parts = dict(
                argument=ma.argument_size_in_bytes,
                output=ma.output_size_in_bytes,
                temp=ma.temp_size_in_bytes,
                alias=ma.alias_size_in_bytes,
            )
            rec["analysis"] = parts
            rec["analysis_bytes"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
        stats = jax.devices()[0].memory_stats()
        limit = (stats or {}).get("bytes_limit")
        rec["limit_bytes"] = limit
        if measure and not stats:
            raise NotImplementedError(f"measured peak memory needs a GPU: memory_stats() is empty on {jax.devices()[0].platform}")
        if measure:
            inputs = make_inputs(shape, dtype, jax.random.key(0))
            jax.block_until_ready(inputs)
            rec["inputs_peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
            jax.block_until_ready(compiled(*inputs))
            rec["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
            rec["status"] = "ok"
        else:
            fits = limit is None or rec.get("analysis_bytes", 0) <= limit
            rec["status"] = "ok" if fits else "OOM"
            if not fits:
                rec["message"] = "compiled analysis exceeds the device memory limit (not run)"
    except Exception as e:  # noqa: BLE001
        rec.update(status=classify_exception(e), message=short_message(e))
    return rec


_WORKER_TAG = "MEMORY_POINT_RESULT "


def _memory_worker(spec_json: str) -> int:
    """Entry point of the per-point subprocess: print one tagged JSON line."""
    spec = json.loads(spec_json)
    rec = memory_point(spec["impl"], spec["seq"], spec["dtype"], measure=True)
    print(_WORKER_TAG + json.dumps(rec), flush=True)
    return 0


def _memory_subprocess(impl: str, seq: int, dtype_name: str, timeout: float) -> dict:
    """``memory_point(..., measure=True)`` in a fresh Python process (peak stats are per process)."""
    from benchmarks.timing import short_message

    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-worker", json.dumps(dict(impl=impl, seq=seq, dtype=dtype_name))]
    base = dict(kind="memory", impl=impl, method="measured", seq_q=seq, seq_k=seq, dtype=dtype_name, gqa=1,
                batch=MEMORY_SHAPE["batch"], heads=16, kv_heads=16, head_dim=128, causal=True, name=f"mem_n{seq}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(base, status="ERR", message=f"subprocess timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_WORKER_TAG):
            return json.loads(line[len(_WORKER_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    status = "OOM" if any("RESOURCE_EXHAUSTED" in ln or "out of memory" in ln.lower() for ln in tail) else "ERR"
    return dict(base, status=status, message=short_message(RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))))


def run_memory(opts: Options, on_record: Callable[[dict], None], progress) -> None:
    """The peak-memory sweep: every (impl, N), measured in subprocesses or analysed in-process."""
    dtype_name = opts.dtypes[0]
    for seq in opts.seq_lens:
        for impl in opts.impls:
            progress.set_postfix_str(f"memory {impl} N={seq}", refresh=False)
            if opts.memory_method == "measured":
                rec = _memory_subprocess(impl, seq, dtype_name, timeout=180)
            else:
                rec = memory_point(impl, seq, dtype_name, measure=False)
                gc.collect()
            on_record(rec)
            progress.update(1)
            if _deadline_passed(opts):
                return


# --- command line -----------------------------------------------------------


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_seq_len(text: str) -> int:
    """``"4096"`` or ``"4k"`` (x1024) -> 4096."""
    t = text.strip().lower()
    try:
        n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"cannot parse sequence length {text!r} (use integers like 512, 4096 or 4k)") from None
    if n < 1:
        raise ValueError(f"sequence length must be positive, got {text!r}")
    return n


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return vals


def _choice_list(text: str, choices: Sequence[str], what: str, aliases: dict | None = None) -> tuple[str, ...]:
    vals = []
    for t in _split(text):
        t = (aliases or {}).get(t.lower(), t.lower())
        if t not in choices:
            raise ValueError(f"{what}: unknown value {t!r}; choose from {', '.join(choices)}")
        if t not in vals:
            vals.append(t)
    if not vals:
        raise ValueError(f"{what}: empty list")
    return tuple(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.attention",
        description=(
            "Benchmark pallas_flash attention against cuDNN, XLA and JAX's Pallas mha: check each "
            "configuration against a float32 reference, then time it. Default: the full sweep "
            "(D 64/128/256, N 512..32k with B*N = 16k tokens and heads = 2048/D, causal and not, "
            "MHA and GQA 4:1, bf16 and fp16, fwd/fwd_bwd/bwd, all implementations) - long; run parts."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sel = p.add_argument_group("what to run (later flags override --quick's choices)")
    sel.add_argument("--quick", action="store_true", help="D 64,128; N 1k,4k; causal and not; bf16; fwd,fwd_bwd; pallas_flash and cudnn (aimed at under 2 min on an H100)")
    sel.add_argument("--only", metavar="PASSES", help=f"passes, comma-separated from {','.join(PASSES)} (fwd+bwd is fwd_bwd)")
    sel.add_argument("--impls", help=f"implementations, comma-separated from {','.join(IMPLS)}")
    sel.add_argument("--head-dims", help="head dims D, e.g. 64,128")
    sel.add_argument("--seq-lens", help="sequence lengths N, e.g. 1k,4k,16k")
    sel.add_argument("--dtypes", help="comma-separated from bf16,fp16,fp32")
    sel.add_argument("--gqa", help="query heads per KV head, e.g. 1,4")
    sel.add_argument("--causal", choices=("both", "yes", "no"), help="causal masking (default both)")
    sel.add_argument("--batch-tokens", type=int, help="batch * N (default 16384)")
    sel.add_argument("--hidden", type=int, help="heads * D (default 2048)")
    sel.add_argument(
        "--memory",
        action="store_true",
        help=(
            "run the peak-memory sweep INSTEAD of the throughput sweep: fwd+bwd, B=1, 16 heads, D=128, causal, "
            "N 1k..128k (--seq-lens overrides), impls pallas_flash,xla,cudnn (--impls overrides), first of --dtypes"
        ),
    )
    sel.add_argument(
        "--memory-method",
        choices=("measured", "analysis"),
        default="measured",
        help="measured: run each point in a fresh subprocess and read peak_bytes_in_use (also records the analysis); "
        "analysis: compile only, in-process, and report the executable's memory analysis",
    )
    how = p.add_argument_group("how")
    how.add_argument("--min-time", type=float, help="seconds of timed samples per function (default 0.5, --quick 0.2)")
    how.add_argument("--warmup", type=int, default=1, help="extra warm-up calls after the checked (compiling) call")
    how.add_argument("--ref", choices=("f32", "cudnn", "none"), default="f32", help="reference for the checks (f32 falls back to cudnn when it does not fit)")
    how.add_argument("--ref-budget-gb", type=float, default=8.0, help="GiB the chunked float32 reference may materialise at once")
    how.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no new shape after this many seconds; write the report with what was measured")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--jobs", type=int, default=4, help="XLA compilations run in parallel per shape (1: one at a time)")
    how.add_argument("--compile-cache", metavar="DIR", help="JAX persistent compilation cache directory (speeds up re-runs)")
    how.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test; tiny default shapes)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output directory; '{device}' is replaced by the device slug (default benchmarks/results/{device})")
    out.add_argument("--tag", help="appended to the file names: <date>-<tag>.md")
    out.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    out.add_argument("--report-from", nargs="+", metavar="JSONL", help="no benchmarking: merge these raw .jsonl files into one report (works on CPU)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str], on_cpu: bool = False) -> Options:
    """Parse and validate the command line; bad values exit with a clear message (status 2)."""
    parser = build_parser()
    a = parser.parse_args(list(argv))
    profile = "quick" if a.quick else "full"
    if on_cpu and a.allow_cpu and not a.quick:
        profile = "cpu"
    d = DEFAULTS[profile]
    try:
        head_dims = _int_list(a.head_dims, "--head-dims") if a.head_dims else d["head_dims"]
        if a.seq_lens:
            seq_lens = tuple(parse_seq_len(t) for t in _split(a.seq_lens))
            if not seq_lens:
                raise ValueError("--seq-lens: empty list")
        else:
            seq_lens = d["seq_lens"] if not a.memory else (128, 256) if profile == "cpu" else MEMORY_SEQ_LENS
        gqa = _int_list(a.gqa, "--gqa") if a.gqa else d["gqa"]
        dtypes = _choice_list(a.dtypes, tuple(DTYPE_NAMES), "--dtypes", DTYPE_ALIASES) if a.dtypes else d["dtypes"]
        passes = _choice_list(a.only, PASSES, "--only", {"fwd+bwd": "fwd_bwd", "fwdbwd": "fwd_bwd"}) if a.only else d["passes"]
        if a.impls:
            impls = _choice_list(a.impls, IMPLS, "--impls")
        else:
            impls = MEMORY_IMPLS if a.memory else d["impls"]
        causal = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal] if a.causal else d["causal"]
        batch_tokens = a.batch_tokens if a.batch_tokens is not None else d["batch_tokens"]
        hidden = a.hidden if a.hidden is not None else d["hidden"]
        if batch_tokens < 1 or hidden < 1:
            raise ValueError("--batch-tokens and --hidden must be positive")
        if not a.memory:
            for dim in head_dims:
                if hidden % dim:
                    raise ValueError(f"--head-dims: D={dim} does not divide --hidden {hidden} (heads = hidden / D)")
                for g in gqa:
                    if (hidden // dim) % g:
                        raise ValueError(f"--gqa {g} does not divide the {hidden // dim} heads of D={dim}")
        min_time = a.min_time if a.min_time is not None else d["min_time"]
        if min_time <= 0 or a.warmup < 0 or a.ref_budget_gb <= 0 or a.jobs < 1:
            raise ValueError("--min-time, --ref-budget-gb and --jobs must be positive, --warmup non-negative")
        if a.time_budget is not None and a.time_budget <= 0:
            raise ValueError("--time-budget must be positive")
        if a.tag is not None and (not a.tag or any(c in a.tag for c in "/\\ ")):
            raise ValueError(f"--tag {a.tag!r}: use a non-empty name without slashes or spaces")
        for path in a.report_from or ():
            if not pathlib.Path(path).is_file():
                raise ValueError(f"--report-from: no such file {path!r}")
    except ValueError as e:
        parser.error(str(e))
    return Options(
        head_dims=head_dims,
        seq_lens=seq_lens,
        causal=causal,
        gqa=gqa,
        dtypes=dtypes,
        passes=passes,
        impls=impls,
        batch_tokens=batch_tokens,
        hidden=hidden,
        min_time=min_time,
        warmup=a.warmup,
        ref=a.ref,
        ref_budget_gb=a.ref_budget_gb,
        memory=a.memory,
        memory_method=a.memory_method,
        out=a.out,
        tag=a.tag,
        time_budget=a.time_budget,
        allow_cpu=a.allow_cpu,
        plots=a.plots,
        seed=a.seed,
        compile_cache=a.compile_cache,
        jobs=a.jobs,
        report_from=tuple(a.report_from or ()),
        profile=profile,
        argv=tuple(argv),
    )


def plan(opts: Options) -> list[tuple[str, int, Shape]]:
    """The (dtype, gqa, shape) configurations of the throughput sweep, in run order."""
    out = []
    for dtype_name in opts.dtypes:
        for g in opts.gqa:
            for shape in paper_grid(opts.head_dims, opts.seq_lens, opts.causal, opts.batch_tokens, opts.hidden, g):
                out.append((dtype_name, g, shape))
    return out


# --- running ----------------------------------------------------------------

_START = time.monotonic()


def _deadline_passed(opts: Options) -> bool:
    return opts.time_budget is not None and time.monotonic() - _START > opts.time_budget


class _Terminated(Exception):
    """Raised from the SIGTERM handler so that a killed run still writes its report."""


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


def _git_commit() -> str | None:
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:  # no git on the machine, or not a checkout
        return None


METHOD_TEXT = """\
- **Implementations**: {impl_notes}
- **Shapes**: B·N = {tokens} tokens, heads = {hidden}/D (the FlashAttention-2 paper's sweep); GQA g:1 keeps the query heads and has heads/g K/V heads.
- **Check first**: every (implementation, pass, shape) is compared with a reference on the same random inputs before it is timed: ‖x − ref‖/‖ref‖ for the output (fwd), for dq, dk, dv under a random cotangent (bwd) and for all four (fwd_bwd); the largest must be below the tolerance ({tols}) and not NaN, else the cell is FAIL and not timed. Reference: float32 XLA attention (`jax.nn.dot_product_attention(implementation="xla")` on inputs upcast to float32, matmul precision "highest"), computed in chunks of batch, heads and query rows (at most {budget} GiB of logits at once); where that fails, cuDNN's result, and where that fails too the cell is marked `*` (not checked). The reference used is recorded per cell in the .jsonl.
- **Timing**: `jax.jit`, one checked call (compiles), {warmup} warm-up call(s), then samples of back-to-back asynchronous calls closed by `jax.block_until_ready` on the host clock; the median per-call time over ≥5 samples (about {min_time} s of samples per function). Inputs are rotated over up to 3 sets when one set is smaller than 2 × 50 MB (L2). `bwd` times the jitted pullback alone (`jax.vjp` run beforehand, its residuals passed in), not (fwd+bwd) − fwd.
- **FLOPs**: 4·B·heads·Tq·Tk·D for the forward, ×0.5 causal, backward 2.5×, forward+backward 3.5× (`Shape.flops`); TFLOP/s = FLOPs / median time. Ratio columns are TFLOP/s over cuDNN's in the same run.
- **Statuses**: FAIL wrong result, OOM out of memory, n/a not supported by that implementation, ERR any other exception (messages under Problems).
- **Memory**: {memory_text}
"""

MEMORY_TEXT = {
    "measured": "each (implementation, N) point runs in a fresh Python process (peak statistics are process-wide): jit + compile the forward+backward, create the inputs, run once, then read `jax.devices()[0].memory_stats()['peak_bytes_in_use']` (\"peak\", includes the inputs and outputs). The compiled executable's `memory_analysis()` (arguments + outputs + temporaries − aliased; \"analysis\") is recorded beside it.",
    "analysis": "compile-only, in this process: the compiled forward+backward executable's `memory_analysis()` (arguments + outputs + temporaries − aliased bytes). Nothing is run; a point whose analysis exceeds the device's memory limit is marked OOM.",
}


def _meta(opts: Options, dev, status: str) -> dict:
    import numpy as np  # noqa: F401 - make sure the environment is complete

    return dict(
        kind="meta",
        device=dev.name,
        device_slug=dev.slug,
        device_count=dev.count,
        platform=dev.platform,
        memory_bytes=dev.memory_bytes,
        jax_version=dev.jax_version,
        jaxlib_version=dev.jaxlib_version,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="PYTHONPATH=. python3 -m benchmarks.attention " + shlex.join(opts.argv),
        commit=_git_commit(),
        impls=list(opts.impls),
        status=status,
        method=METHOD_TEXT.format(
            impl_notes="; ".join(f"`{IMPL_REGISTRY[i].name}`: {IMPL_REGISTRY[i].note}" for i in opts.impls),
            tokens=opts.batch_tokens,
            hidden=opts.hidden,
            tols=", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items() if k in opts.dtypes),
            budget=f"{opts.ref_budget_gb:g}",
            warmup=opts.warmup,
            min_time=f"{opts.min_time:g}",
            memory_text=MEMORY_TEXT[opts.memory_method] if opts.memory else "not run (use --memory).",
        ),
    )


def _out_stem(opts: Options, slug: str) -> pathlib.Path:
    out_dir = pathlib.Path(opts.out.replace("{device}", slug)) if opts.out else RESULTS_DIR / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = opts.tag or ("memory" if opts.memory else None)
    base = datetime.date.today().isoformat() + (f"-{tag}" if tag else "")
    return report.unique_stem(out_dir, base)


def _progress(total: int):
    """A tqdm bar on stderr; sparse updates when stderr is not a terminal (keeps captured logs short)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="cfg", mininterval=0.5 if tty else 30.0, dynamic_ncols=tty, file=sys.stderr)


def _report_from(opts: Options) -> int:
    records, metas = report.load_jsonl(pathlib.Path(p) for p in opts.report_from)
    if not records:
        print("no records in " + ", ".join(opts.report_from), file=sys.stderr)
        return 1
    meta = dict(metas[-1]) if metas else {"device": "?", "device_slug": "unknown"}
    commands = list(dict.fromkeys(m["command"] for m in metas if m.get("command")))
    if len(commands) > 1:
        meta["command"] = "` ; `".join(commands)
    methods = list(dict.fromkeys(m["method"] for m in metas if m.get("method")))
    if len(methods) > 1:  # runs with different settings: keep each one's description
        meta["method"] = "\n".join(f"Run {i}:\n\n{text}" for i, text in enumerate(methods, 1))
    meta["impls"] = report.impl_order(records, [i for m in metas for i in m.get("impls", [])])
    meta["status"] = "merged from " + ", ".join(pathlib.Path(p).name for p in opts.report_from)
    if opts.out or opts.tag:
        stem = _out_stem(dataclasses.replace(opts, memory=False), meta.get("device_slug", "unknown"))
    else:
        first = pathlib.Path(opts.report_from[0])
        stem = report.unique_stem(first.parent, first.stem + "-merged")
    for rec in [dict(meta, kind="meta")] + records:
        report.append_jsonl(stem.with_suffix(".jsonl"), rec)
    paths = report.write_report(records, meta, stem, plots=opts.plots)
    print(report.summary_text(records, meta["impls"]))
    print("\nwrote " + ", ".join(str(p) for p in [stem.with_suffix(".jsonl")] + paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    global _START
    _START = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--memory-worker" in argv:
        return _memory_worker(argv[argv.index("--memory-worker") + 1])

    # Decide CPU or not before parsing (the --allow-cpu defaults depend on it) without importing jax twice.
    import jax

    on_cpu = jax.default_backend() != "gpu"
    opts = parse_args(argv, on_cpu=on_cpu)
    if opts.report_from:
        return _report_from(opts)
    if on_cpu and not opts.allow_cpu:
        print(
            f"benchmarks.attention needs an NVIDIA GPU, but JAX's default backend is {jax.default_backend()!r} "
            f"({jax.devices()[0]}). Run it on the GPU machine, or pass --allow-cpu for a smoke run "
            "with tiny shapes (cuDNN shows n/a; Pallas kernels run in interpret mode).",
            file=sys.stderr,
        )
        return 2
    for msg in (r".*Pallas Triton backend is deprecated.*", r".*pallas\.ops\.gpu\.attention is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg, category=DeprecationWarning)
    if opts.compile_cache:
        jax.config.update("jax_compilation_cache_dir", opts.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from benchmarks.timing import device_info

    dev = device_info()
    stem = _out_stem(opts, dev.slug)
    jsonl = stem.with_suffix(".jsonl")
    records: list[dict] = []
    report.append_jsonl(jsonl, _meta(opts, dev, "running"))

    pending: list[str] = []  # problem lines, written in one go per shape (one bar redraw)

    def on_record(rec: dict) -> None:
        records.append(rec)
        report.append_jsonl(jsonl, rec)
        if rec.get("status") != "ok":
            where = f"{rec['dtype']} D={rec['head_dim']} N={rec['seq_q']}{' causal' if rec['causal'] else ''}"
            pending.append(f"  {rec['impl']} {rec.get('pass', 'memory')} {where}: {rec['status']} {(rec.get('message') or '')[:160]}")

    def flush_problems() -> None:
        if pending:
            progress.write("\n".join(pending))
            pending.clear()

    configs = [] if opts.memory else plan(opts)
    total = len(opts.seq_lens) * len(opts.impls) if opts.memory else len(configs)
    if opts.profile == "cpu":
        print(f"CPU smoke run (--allow-cpu): tiny shapes, N={opts.seq_lens}, D={opts.head_dims}, tokens={opts.batch_tokens}, hidden={opts.hidden}")
    print(f"{dev.name}: {'memory sweep' if opts.memory else f'{total} shapes x {len(opts.impls)} impls x {len(opts.passes)} passes'} -> {stem}.*", flush=True)

    status = "complete"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    progress = _progress(total)
    try:
        if opts.memory:
            run_memory(opts, on_record, progress)
        else:
            key = jax.random.key(opts.seed)
            for i, (dtype_name, g, shape) in enumerate(configs):
                if _deadline_passed(opts):
                    status = f"partial: time budget of {opts.time_budget:g} s reached, {len(configs) - i} of {len(configs)} shapes not run"
                    break
                label = f"{dtype_name} D={shape.head_dim} N={report.seq_label(shape.seq_q)}{' causal' if shape.causal else ''}{f' gqa{g}' if g > 1 else ''}"
                progress.set_postfix_str(label, refresh=False)
                bench_shape(shape, dtype_name, g, opts, jax.random.fold_in(key, i), on_record)
                flush_problems()
                progress.update(1)
                jax.clear_caches()
        if opts.memory and _deadline_passed(opts) and len(records) < total:
            status = f"partial: time budget of {opts.time_budget:g} s reached, {total - len(records)} of {total} points not run"
    except (KeyboardInterrupt, _Terminated) as e:
        status = f"partial: interrupted ({type(e).__name__} {e}) after {len(records)} records"
    finally:
        flush_problems()
        progress.close()
        signal.signal(signal.SIGTERM, previous)

    meta = _meta(opts, dev, status)
    report.append_jsonl(jsonl, meta)
    paths = report.write_report(records, meta, stem, plots=opts.plots)
    elapsed = time.monotonic() - _START
    print()
    print(report.summary_text(records, opts.impls))
    print(f"\n{status}; {elapsed:.0f} s. Wrote " + ", ".join(str(p) for p in [jsonl] + paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
