"""The harness: check-then-time the implementations of ``benchmarks.impls`` on the problems of ``benchmarks.problems``.

A ``Problem`` is one attention call (``benchmarks.problems``: the ``attention``
and ``masks`` suites; re-exported here); an ``Impl`` (``benchmarks.impls.IMPLS``)
builds the function to time for it. ``bench_problem`` runs every implementation on the same inputs: each
pass is checked against ``pallas_flash.testing.chunked_reference`` (the output, and
dq, dk, dv under a random cotangent), then timed with ``pallas_flash.tuning.timer``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from typing import Callable, Sequence

from benchmarks.common import classify_exception, short_message, tree_nbytes
from benchmarks.impls import IMPLS, Impl, length_extras  # noqa: F401 - Impl re-exported for the tests
from benchmarks.problems import (  # noqa: F401 - the problems, re-exported for the suites' scripts
    DTYPES,
    WINDOW_SPEEDUPS,
    Problem,
    grid_problems,
    mask_problems,
    packed_doc_lengths,
)
from pallas_flash.testing.shapes import Shape

# ||x - ref|| / ||ref|| must be under this (and finite) for a result to count.
TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 5e-3}
PASSES = ("fwd", "fwd_bwd", "bwd")
GRAD_NAMES = ("dq", "dk", "dv")


# --- one problem ----------------------------------------------------------------------


def make_inputs(p: Problem, key):
    """Random normal q, k, v and an output cotangent g in the problem's dtype."""
    import jax
    import jax.numpy as jnp

    dtype, s = jnp.dtype(DTYPES[p.dtype]), p.shape
    kq, kk, kv, kg = jax.random.split(key, 4)
    return tuple(jax.random.normal(kx, shp, dtype) for kx, shp in
                 ((kq, s.q_shape), (kk, s.kv_shape), (kv, s.kv_shape), (kg, s.q_shape)))


@dataclasses.dataclass
class Prepared:
    """The jitted functions of one implementation on one problem (or why there are none)."""

    impl: Impl
    error: Exception | None = None
    extras: dict | None = None
    fwd: Callable | None = None  # (q, k, v, extras) -> out
    fwd_bwd: Callable | None = None  # (q, k, v, g, extras) -> (out, (dq, dk, dv))
    make_pullback: Callable | None = None  # (q, k, v, extras) -> pullback (holds the residuals)
    pullback: Callable | None = None  # (pullback, g) -> (dq, dk, dv)

    def fn(self, pass_: str) -> Callable:
        return {"fwd": self.fwd, "fwd_bwd": self.fwd_bwd, "bwd": self.pullback}[pass_]

    def args(self, pass_: str, s: tuple, abstract: bool = False) -> tuple:
        """The arguments of ``fn(pass_)`` for the input set ``s = (q, k, v, g)`` (shapes alone: ``abstract``)."""
        import jax

        if pass_ != "bwd":
            return (*s[: 3 if pass_ == "fwd" else 4], self.extras)
        make = functools.partial(jax.eval_shape, self.make_pullback) if abstract else self.make_pullback
        return (make(*s[:3], self.extras), s[3])


def prepare(impl: Impl, p: Problem) -> Prepared:
    import jax

    try:
        f = impl.build(p)
        extras = impl.extras(p)
    except Exception as e:  # noqa: BLE001 - unsupported or unavailable implementation
        return Prepared(impl, error=e)

    def vjp(q, k, v, e):
        return jax.vjp(lambda q, k, v: f(q, k, v, **e), q, k, v)

    def fwd_bwd(q, k, v, g, e):
        out, pullback = vjp(q, k, v, e)
        return out, pullback(g)

    return Prepared(impl, None, extras, jax.jit(lambda q, k, v, e: f(q, k, v, **e)), jax.jit(fwd_bwd),
                    jax.jit(lambda q, k, v, e: vjp(q, k, v, e)[1]), jax.jit(lambda pb, g: pb(g)))


def precompile(prepared: Sequence[Prepared], example, passes: Sequence[str], threads: int) -> float:
    """Compile every function the passes will call, ``threads`` at a time; the wall seconds spent.

    Lowering (Python) runs in turn, ``compile()`` (releases the GIL) in a thread pool, filling the
    cache the later calls hit. Errors are ignored here: ``bench_impl`` repeats and records them.
    """
    import concurrent.futures

    import jax

    t0 = time.perf_counter()
    abstract = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example)
    lowered = []
    for p, pass_ in ((p, pass_) for p in prepared if p.error is None for pass_ in passes):
        try:
            if pass_ == "bwd":
                lowered.append(p.make_pullback.lower(*abstract[:3], p.extras))
            lowered.append(p.fn(pass_).lower(*p.args(pass_, abstract, abstract=True)))
        except Exception:  # noqa: BLE001 - recorded when the function is called
            pass

    def compile_(low):
        try:
            low.compile()
        except Exception:  # noqa: BLE001 - recorded when the function is called
            pass

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(compile_, lowered))
    return time.perf_counter() - t0


def check_outputs(named: dict, ref) -> dict[str, float]:
    """Relative error of each named output (``out``, ``dq``, ``dk``, ``dv``) that has a reference."""
    from pallas_flash.testing.errors import rel_err

    ref_of = {"out": ref.out, **dict(zip(GRAD_NAMES, ref.grads or ()))}
    return {name: rel_err(x, ref_of[name]) for name, x in named.items() if ref_of.get(name) is not None}


def bench_impl(prep: Prepared, p: Problem, sets: list, ref, opts) -> list[dict]:
    """Check then time one implementation on ``p`` for each of ``opts.passes``; one record per pass.

    ``sets`` are input tuples ``(q, k, v, g)``; the first is the one checked.
    """
    import jax

    from pallas_flash.tuning.timer import time_fn

    base = dict(kind="speed", impl=prep.impl.name, **p.fields())
    if prep.error is not None:
        status, message = classify_exception(prep.error), short_message(prep.error)
        return [dict(base, **{"pass": pass_}, status=status, message=message) for pass_ in opts.passes]
    records = []
    for pass_ in opts.passes:
        rec = dict(base, **{"pass": pass_}, tol=TOLERANCE[p.dtype], flops=p.flops(pass_))
        fn = args = first = named = None
        try:
            t0 = time.perf_counter()
            fn = prep.fn(pass_)
            args = [prep.args(pass_, s) for s in sets]
            first = jax.block_until_ready(fn(*args[0]))
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            named = {"fwd": lambda: {"out": first}, "bwd": lambda: dict(zip(GRAD_NAMES, first)),
                     "fwd_bwd": lambda: {"out": first[0], **dict(zip(GRAD_NAMES, first[1]))}}[pass_]()
            errs = check_outputs(named, ref) if ref.source not in (None, prep.impl.name) else {}
            rec.update(errs=errs, checked=bool(errs), ref=ref.source if errs else None)
            if ref.note:
                rec["message"] = ref.note
            if errs:
                rec["err"] = max(errs.values())
                if not rec["err"] < rec["tol"]:  # rel_err is inf for NaN/inf outputs
                    rec["status"] = "FAIL"
                    records.append(rec)
                    continue
            first = named = None  # drop the checked outputs before timing
            t = time_fn(fn, args, min_time=opts.min_time, warmup=opts.warmup, **opts.timing)
            rec.update(status="ok", time_s=t.median_s, tflops=rec["flops"] / t.median_s / 1e12, timing=t.as_dict())
        except Exception as e:  # noqa: BLE001 - every failure becomes a table cell
            rec.update(status=classify_exception(e), message=short_message(e))
        finally:
            fn = args = first = named = None  # free this pass's buffers before the next
        records.append(rec)
    return records


def bench_problem(p: Problem, impls: Sequence[str], opts, key, on_record: Callable[[dict], None]) -> None:
    """Every implementation that applies to ``p``, on shared inputs and one reference.

    Where the inputs or the reference cannot be made (out of memory, say), every implementation's cells of ``p``
    say so and the run goes on to the next problem."""
    import jax

    from pallas_flash.testing.chunked_reference import compute_reference
    from pallas_flash.tuning.timer import num_input_sets

    names = [name for name in impls if IMPLS[name].applies(p)]
    try:
        inputs = make_inputs(p, key)
        n_sets = num_input_sets(tree_nbytes(inputs))
        sets = [inputs] + [make_inputs(p, k) for k in jax.random.split(jax.random.fold_in(key, 1), n_sets - 1)]
    except Exception as e:  # noqa: BLE001 - every cell of the problem says why
        _record_setup_failure(p, names, opts, "the inputs", e, on_record)
        return
    prepared = [prepare(IMPLS[name], p) for name in names]
    compile_s = precompile(prepared, inputs, opts.passes, opts.jobs)

    def fallback(q, k, v, g, grads):  # cuDNN's result, where the float32 reference does not fit
        c = prepare(IMPLS["cudnn"], p)
        if c.error is not None:
            raise c.error
        return c.fwd_bwd(q, k, v, g, c.extras) if grads else (c.fwd(q, k, v, c.extras), None)

    seg = p.segment_ids()
    try:
        ref = compute_reference(
            *inputs, causal=p.shape.causal, grads=any(x != "fwd" for x in opts.passes),
            budget_bytes=int(opts.ref_budget_gb * 2**30), mode={"cudnn": "fallback"}.get(opts.ref, opts.ref),
            fallback=fallback, local_window_size=p.window_arg, logits_soft_cap=p.soft_cap,
            q_segment_ids=seg, kv_segment_ids=seg, **length_extras(p))
    except Exception as e:  # noqa: BLE001 - every cell of the problem says why
        _record_setup_failure(p, names, opts, "the reference", e, on_record)
        return
    for prep in prepared:
        for rec in bench_impl(prep, p, sets, ref, opts):
            rec["shape_compile_s"] = round(compile_s, 2)
            on_record(rec)
        gc.collect()
    del sets, inputs, ref, prepared
    gc.collect()


def _record_setup_failure(p: Problem, names, opts, what: str, error: Exception, on_record) -> None:
    """One record per implementation and pass of ``p``: its ``what`` could not be made."""
    status, message = classify_exception(error), f"{what}: {short_message(error)}"
    for name in names:
        for pass_ in opts.passes:
            on_record(dict(kind="speed", impl=name, **p.fields(), **{"pass": pass_}, status=status, message=message))
    gc.collect()


# --- peak memory --------------------------------------------------------------------


def memory_problem(seq: int, dtype: str, head_dim: int = 128, heads: int = 16) -> Problem:
    """The memory sweep's problem: forward+backward, B=1, causal."""
    return Problem(Shape(f"mem_n{seq}", 1, seq, seq, heads, heads, head_dim, True), dtype, "memory")


def memory_point(impl_name: str, seq: int, dtype: str, measure: bool, head_dim: int = 128, heads: int = 16) -> dict:
    """Peak memory of one jitted forward+backward of ``impl_name`` at length ``seq``.

    Always records the compiled executable's memory analysis (arguments +
    outputs + temporaries - aliased bytes); with ``measure`` also runs it and
    reads the device's ``peak_bytes_in_use`` (meaningful only in a fresh
    process: ``run_worker`` starts one per point).
    """
    import jax
    import jax.numpy as jnp

    p = memory_problem(seq, dtype, head_dim, heads)
    itemsize = jnp.dtype(DTYPES[dtype]).itemsize
    rec = dict(kind="memory", impl=impl_name, method="measured" if measure else "analysis", **p.fields(),
               io_bytes=8 * seq * heads * head_dim * itemsize)  # q, k, v, g in; out, dq, dk, dv out
    try:
        prep = prepare(IMPLS[impl_name], p)
        if prep.error is not None:
            raise prep.error
        abstract = jax.eval_shape(functools.partial(make_inputs, p), jax.random.key(0))
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in abstract]
        compiled = prep.fwd_bwd.lower(*specs, prep.extras).compile()
        ma = compiled.memory_analysis()
        if ma is not None:
            a = rec["analysis"] = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
                                       temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes)
            rec["analysis_bytes"] = a["argument"] + a["output"] + a["temp"] - a["alias"]
        stats = jax.devices()[0].memory_stats()
        rec["limit_bytes"] = (stats or {}).get("bytes_limit")
        if measure and not stats:
            raise NotImplementedError(
                f"measured peak memory needs a GPU: memory_stats() is empty on {jax.devices()[0].platform}")
        if measure:
            inputs = jax.block_until_ready(make_inputs(p, jax.random.key(0)))
            rec["inputs_peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
            jax.block_until_ready(compiled(*inputs, prep.extras))
            rec.update(peak_bytes=jax.devices()[0].memory_stats()["peak_bytes_in_use"], status="ok")
        elif rec["limit_bytes"] is not None and rec.get("analysis_bytes", 0) > rec["limit_bytes"]:
            rec.update(status="OOM", message="compiled analysis exceeds the device memory limit (not run)")
        else:
            rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        rec.update(status=classify_exception(e), message=short_message(e))
    return rec
