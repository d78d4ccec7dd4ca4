"""Context parallelism: ring attention over N GPUs against the single-GPU kernel: ``python -m benchmarks.ring``.

Causal attention, B=1, 16 heads, D=128, bf16, 32k tokens per GPU (the issue's
measurement, #13): ``pallas_flash.sharding.ring`` over all GPUs (or
``--devices N``) in the ``zigzag`` and ``contiguous`` layouts, forward and
forward+backward, against the single-GPU Pallas kernel on the whole N x 32k
sequence. The FLOP count is the standard causal count of the whole sequence
(``Shape.flops``); a ring's per-GPU TFLOP/s divides it by the number of GPUs,
so a ring that scaled perfectly would show the single-GPU kernel's TFLOP/s
("vs 1 GPU" = 1.00). Each run is one fresh process (``benchmarks.common.run_worker``):
compile and check once, then time with ``pallas_flash.tuning.timer.time_fn``.
A ring's output and gradients (random cotangent) are checked against the
single-GPU kernel's on the same inputs (``rel err``; bf16 both).

Writes ``benchmarks/results/<device>/ring-<date>.{md,jsonl}``. Run from the
repository root on a machine with 2 or more GPUs::

    PYTHONPATH=. python3 -m benchmarks.ring
    PYTHONPATH=. python3 -m benchmarks.ring --devices 2 --tokens-per-device 16384 --layouts zigzag
    PYTHONPATH=. python3 -m benchmarks.ring --allow-cpu        # smoke run: 4 host devices, tiny, interpret mode

Overlap of the K/V transfers with the kernels is XLA's latency-hiding
scheduler's job; ``XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true``
is the flag to try where the ring falls short.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import shlex
import sys
import time

from benchmarks import common

PASSES = ("fwd", "fwd_bwd")
LAYOUTS = ("zigzag", "contiguous")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = 2e-2  # ring vs the single-GPU kernel, both bf16
CPU_DEVICES = 4


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement: ``layout`` None is the single-GPU kernel on the whole sequence."""

    layout: str | None
    devices: int
    tokens_per_device: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    passes: tuple[str, ...]
    min_time: float

    @property
    def seq(self) -> int:
        return self.devices * self.tokens_per_device

    @property
    def label(self) -> str:
        return "1 GPU kernel" if self.layout is None else f"ring {self.layout}"


def _flops(run: Run, pass_: str) -> float:
    from pallas_flash.testing.shapes import Shape

    return Shape("whole", 1, run.seq, run.seq, run.heads, run.kv_heads, run.head_dim, True).flops(pass_)


def _worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import pallas_flash as pf
    from pallas_flash.sharding.context import sequence_parallel_attention
    from pallas_flash.testing.errors import rel_err
    from pallas_flash.tuning.timer import time_fn

    if spec.get("probe"):
        return common.device_info()
    run = Run(**{**spec, "passes": tuple(spec["passes"])})
    devices = jax.devices()
    if len(devices) < run.devices:
        raise ValueError(f"--devices {run.devices}, but JAX sees {len(devices)} device(s)")
    dtype = jnp.dtype(DTYPES[run.dtype])
    rng = np.random.default_rng(0)
    shapes = [(1, run.seq, run.heads, run.head_dim), *[(1, run.seq, run.kv_heads, run.head_dim)] * 2,
              (1, run.seq, run.heads, run.head_dim)]
    home = devices[0]
    q, k, v, g = (jax.device_put(jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype), home) for s in shapes)

    def single(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")

    if run.layout is None:
        attention, args = single, (q, k, v, g)
    else:
        mesh = jax.make_mesh((run.devices,), ("seq",), axis_types=(AxisType.Auto,), devices=devices[:run.devices])
        place = NamedSharding(mesh, P(None, "seq"))
        order = (lambda x: pf.zigzag(x, run.devices)) if run.layout == "zigzag" else (lambda x: x)
        args = tuple(jax.device_put(order(x), place) for x in (q, k, v, g))

        def attention(q, k, v):
            return sequence_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", layout=run.layout, is_causal=True,
                                               implementation="pallas")

    def fwd_bwd(q, k, v, g):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(g)

    fns = {"fwd": jax.jit(lambda q, k, v, g: attention(q, k, v)), "fwd_bwd": jax.jit(fwd_bwd)}
    result = {"label": run.label, "layout": run.layout, "devices": 1 if run.layout is None else run.devices,
              "seq": run.seq, "passes": {}}
    for pass_ in run.passes:
        t0 = time.perf_counter()
        first = jax.block_until_ready(fns[pass_](*args))
        compile_s = time.perf_counter() - t0
        timing = time_fn(fns[pass_], [args], min_time=run.min_time)
        flops = _flops(run, pass_)
        gpus = 1 if run.layout is None else run.devices
        rec = dict(ms=timing.median_s * 1e3, iqr_rel=timing.iqr_rel, compile_s=compile_s,
                   tflops_per_gpu=flops / gpus / timing.median_s / 1e12)
        if run.layout is not None:  # against the single-GPU kernel on the same inputs
            back = (lambda x: pf.unzigzag(x, run.devices)) if run.layout == "zigzag" else (lambda x: x)
            got = [first] if pass_ == "fwd" else [first[0], *first[1]]
            want = ([jax.jit(single)(q, k, v)] if pass_ == "fwd"
                    else (lambda o, pb: [o, *pb(g)])(*jax.vjp(single, q, k, v)))
            errs = [rel_err(jax.device_put(back(x), home), w) for x, w in zip(got, want)]
            rec["rel_err"] = max(errs)
            rec["check"] = "ok" if rec["rel_err"] <= TOLERANCE else "FAIL"
        result["passes"][pass_] = rec
        del first
    return result


def render_markdown(info: dict, runs: list[Run], results: list[dict], command: str) -> str:
    r0 = runs[0]
    single = next((res for run, res in zip(runs, results) if run.layout is None and res.get("ok")), None)
    lines = [
        f"# Ring attention (context parallelism), {info['device']} x {r0.devices}",
        "",
        f"{datetime.date.today().isoformat()}; jax {info['jax_version']}; commit {common.git_commit()}; `{command}`",
        "",
        f"Causal, B=1, {r0.heads} heads ({r0.kv_heads} K/V), D={r0.head_dim}, {r0.dtype}; "
        f"{r0.tokens_per_device} tokens per GPU, {r0.seq} in all. TFLOP/s per GPU: the causal FLOPs of the whole "
        f"sequence / GPUs / time. vs 1 GPU: against the single-GPU kernel on the whole sequence.",
        "",
        "| run | GPUs | pass | ms | TFLOP/s per GPU | vs 1 GPU | rel err vs 1 GPU | compile s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run, res in zip(runs, results):
        if not res.get("ok"):
            lines.append(f"| {run.label} | {run.devices} | - | {res.get('status', 'ERR')}: {res.get('error', '')} | | | | |")
            continue
        for pass_, rec in res["passes"].items():
            base = single["passes"].get(pass_) if single else None
            vs = f"{rec['tflops_per_gpu'] / base['tflops_per_gpu']:.2f}" if base else "-"
            err = f"{rec['rel_err']:.1e} {rec['check']}" if "rel_err" in rec else "-"
            lines.append(f"| {res['label']} | {res['devices']} | {pass_} | {rec['ms']:.2f} | {rec['tflops_per_gpu']:.3g} | "
                         f"{vs} | {err} | {rec['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, help="GPUs on the ring (default: all)")
    p.add_argument("--tokens-per-device", type=int, help="sequence tokens per GPU (default 32768; CPU 64)")
    p.add_argument("--heads", type=int, help="query heads (default 16; CPU 2)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, help="D (default 128; CPU 32)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated from zigzag,contiguous")
    p.add_argument("--only", default=",".join(PASSES), help="passes, comma-separated from fwd,fwd_bwd")
    p.add_argument("--no-single", dest="single", action="store_false", help="skip the single-GPU baseline")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed samples per function")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per subprocess")
    p.add_argument("--allow-cpu", action="store_true", help=f"run without a GPU: {CPU_DEVICES} host devices, tiny "
                   "shapes, interpret mode (a smoke test of the script)")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="results root; files go to <out-dir>/<device>/")
    p.add_argument("--tag", help="appended to the file name: ring-<date>-<tag>")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(_worker, args.worker)

    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={CPU_DEVICES}"} if args.allow_cpu else None
    probed = common.probe_platform("benchmarks.ring", measures="GPUs", smoke_flag="--allow-cpu",
                                   allow_cpu=args.allow_cpu, env=env)
    if probed is None:
        return 2
    info, on_gpu = probed
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    passes = tuple(x.strip() for x in args.only.split(",") if x.strip())
    if not set(layouts) <= set(LAYOUTS) or not set(passes) <= set(PASSES) or not (layouts or args.single):
        p.error(f"--layouts takes a subset of {LAYOUTS}, --only a subset of {PASSES}")
    devices = args.devices or info["device_count"]
    if not 1 <= devices <= info["device_count"]:
        p.error(f"--devices {devices}: JAX sees {info['device_count']} device(s)")
    heads = args.heads or (16 if on_gpu else 2)
    shape = dict(devices=devices, tokens_per_device=args.tokens_per_device or (32768 if on_gpu else 64), heads=heads,
                 kv_heads=args.kv_heads or heads, head_dim=args.head_dim or (128 if on_gpu else 32), dtype=args.dtype,
                 passes=passes, min_time=args.min_time if on_gpu else 0.0)
    runs = ([Run(None, **shape)] if args.single else []) + [Run(layout, **shape) for layout in layouts]
    print(f"device: {info['device']} x {info['device_count']}; {len(runs)} runs", flush=True)

    results = []
    for run in runs:
        t0 = time.perf_counter()
        spec = {**dataclasses.asdict(run), "passes": list(run.passes)}
        res = common.run_worker("benchmarks.ring", spec, args.timeout, env)
        results.append(res)
        what = (", ".join(f"{k} {r['ms']:.2f} ms {r['tflops_per_gpu']:.0f} TFLOP/s/GPU" for k, r in res["passes"].items())
                if res.get("ok") else res["error"])
        print(f"  {run.label} ({run.seq} tokens): {what} [{time.perf_counter() - t0:.0f}s]", flush=True)

    folder = pathlib.Path(args.out_dir) / info["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    base = f"ring-{datetime.date.today().isoformat()}" + (f"-{args.tag}" if args.tag else "") + ("" if on_gpu else "-cpu")
    stem = common.unique_stem(folder, base)
    command = "PYTHONPATH=. python3 -m benchmarks.ring " + shlex.join(sys.argv[1:] if argv is None else argv)
    md = render_markdown(info, runs, results, command)
    stem.with_suffix(".md").write_text(md)
    for rec in [dict(info, kind="meta", command=command, commit=common.git_commit())] + [
            {"run": dataclasses.asdict(r), **res} for r, res in zip(runs, results)]:
        common.append_jsonl(stem.with_suffix(".jsonl"), rec)
    print("\n" + md + f"\nwrote {stem}.md, .jsonl")
    checks = [rec.get("check", "ok") for res in results if res.get("ok") for rec in res["passes"].values()]
    return 0 if all(res.get("ok") for res in results) and all(c == "ok" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
