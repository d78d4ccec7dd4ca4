"""GPT-2 training speed with each attention backend: ``python -m benchmarks.gpt2``.

On one GPU, trains GPT-2 124M (12 layers, width 768, vocab 50304, bf16
compute, fp32 parameters, AdamW: the ``python -m train`` step) at

* T=1024, batch 16, and
* T=4096, batch 4 (the same 16k tokens per step),

once per attention backend (``pallas``, ``xla``, ``cudnn``), each in a fresh
subprocess so that peak-memory numbers do not mix. For each it reports
tokens/s (steps dispatched back to back as ``python -m train`` runs them,
timed in windows of 10 synchronised at their ends; the median window; the
first warm-up steps and compilation excluded), MFU (FLOPs per token
``6 N + 12 L T D`` over a 989 TFLOP/s dense bf16 peak on H100/H200) and peak GPU
memory (``memory_stats()["peak_bytes_in_use"]``). At T=1024 the ``pallas`` and
``xla`` runs go on to 300 steps from the same seed and data (the Python
standard library's sources as bytes, ``train.data``), and their loss curves
are compared and plotted.

Writes ``benchmarks/results/<device>/gpt2-<date>.md`` (table), ``.png`` (loss
curves) and ``.json`` (raw numbers), and prints the table. About 5-8 minutes on
an H100, most of it compiling. ``--quick`` is a short smoke run (a few steps;
on a CPU the ``tiny`` model with XLA attention only, to test the script).

Run from the repository root::

    PYTHONPATH=. python3 -m benchmarks.gpt2            # full report (GPU)
    PYTHONPATH=. python3 -m benchmarks.gpt2 --quick    # smoke run
    PYTHONPATH=. python3 -m benchmarks.gpt2 --loss-steps 0 --profile 5   # where the step time goes

``--profile N`` traces N more steps of each run with ``jax.profiler`` and adds a
table of GPU kernel time per step by category (attention, matmul, copy, other:
``benchmarks.profile``), GPU idle time and launches per step, the largest
kernels and the kernels the GPU waited longest for.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMPLEMENTATIONS = ("pallas", "xla", "cudnn")
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
RESULT_TAG = "GPT2-BENCH-RESULT "
TIMING_WINDOW = 10  # steps per timed window; tokens/s comes from the median window


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One subprocess: a model/shape/backend and how many steps to take."""

    attention: str
    seq_len: int
    batch_size: int
    warmup_steps: int  # run but not timed (the first one also compiles)
    timed_steps: int
    loss_steps: int = 0  # if larger, keep training to this many steps (loss curve)
    model: str = "gpt2"
    seed: int = 0
    lr: float = 6e-4
    profile_steps: int = 0  # if > 0, trace this many more steps: GPU kernel time by category


def _plan(quick: bool, on_gpu: bool, impls: tuple[str, ...], *, loss_steps: int | None = None,
          profile_steps: int = 0, seq_lens: tuple[int, ...] | None = None) -> list[RunSpec]:
    if quick and not on_gpu:  # CPU smoke test of the script itself
        shapes, model, steps = [(64, 2), (128, 1)], "tiny", (2, 3, 12)
    elif quick:
        shapes, model, steps = [(1024, 16), (4096, 4)], "gpt2", (3, 5, 20)
    else:
        shapes, model, steps = [(1024, 16), (4096, 4)], "gpt2", (5, 30, 300)
    warmup, timed, default_loss_steps = steps
    loss_steps = default_loss_steps if loss_steps is None else loss_steps
    specs = []
    if seq_lens is not None:
        shapes = [(t, b) for t, b in shapes if t in seq_lens]
    for i, (seq_len, batch) in enumerate(shapes):
        for impl in impls:
            curve = i == 0 and impl in ("pallas", "xla")
            specs.append(RunSpec(impl, seq_len, batch, warmup, timed,
                                 loss_steps if curve else 0, model, profile_steps=profile_steps))
    return specs


# ---------------------------------------------------------------- worker side


def _worker(spec: RunSpec) -> dict[str, Any]:
    """Train ``spec`` in this process; return the measurements."""
    import jax
    import numpy as np
    from flax import nnx

    from models import gpt2
    from train import data as data_lib
    from train.config import TrainConfig
    from train.step import init_train_state, make_optimizer, make_train_step

    dev = jax.devices()[0]
    base = gpt2.get_config(spec.model)
    mcfg = dataclasses.replace(
        base, block_size=max(base.block_size, spec.seq_len), attention=spec.attention,
        dtype="bfloat16",
    )
    total = max(spec.warmup_steps + spec.timed_steps, spec.loss_steps)
    tcfg = TrainConfig(config=spec.model, steps=max(total, 2), lr=spec.lr, warmup=min(100, total // 10))
    tx, _ = make_optimizer(tcfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(mcfg, rngs=nnx.Rngs(0))))

    init = functools.partial(init_train_state, mcfg, tx)
    params, opt_state = jax.jit(init)(jax.random.key(spec.seed))
    step_fn, _ = make_train_step(graphdef, tx, 1)
    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
    data = data_lib.load_data(None)
    sampler = data_lib.BatchSampler(
        data.train, seq_len=spec.seq_len, batch_size=spec.batch_size, seed=spec.seed
    )
    key = jax.random.key(spec.seed)

    losses, times = [], []
    compile_s = None

    def steps(first: int, n: int) -> float:
        """Train steps ``first .. first+n-1`` dispatched back to back, as ``python -m train``
        does (the host prepares the next batch while the GPU works); waits for the last
        and returns the mean seconds per step."""
        nonlocal params, opt_state
        t0 = time.perf_counter()
        metrics = []
        for i in range(first, first + n):
            x, y = (jax.device_put(a) for a in sampler.batch(i))
            params, opt_state, m = step_fn(params, opt_state, x, y, np.int32(i), key)
            metrics.append(m)
        jax.block_until_ready(metrics)
        dt = (time.perf_counter() - t0) / n
        for i, m in enumerate(metrics, first):
            losses.append(float(m["loss"]))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"loss is {losses[-1]} at step {i}")
        return dt

    for i in range(spec.warmup_steps):  # one at a time: the first compiles
        dt = steps(i, 1)
        if i == 0:
            compile_s = dt
    done = spec.warmup_steps
    while done < spec.warmup_steps + spec.timed_steps:
        n = min(TIMING_WINDOW, spec.warmup_steps + spec.timed_steps - done)
        times.append(steps(done, n))
        done += n
    if total > done:  # the rest of the loss curve
        steps(done, total - done)
    profile = None
    if spec.profile_steps:  # after the timed steps, so the trace does not slow them
        from benchmarks.profile import kernel_breakdown

        profile = kernel_breakdown(lambda: steps(total, spec.profile_steps), spec.profile_steps)

    step_s = statistics.median(times)
    tokens_per_s = spec.batch_size * spec.seq_len / step_s
    fpt = gpt2.flops_per_token(mcfg, spec.seq_len)
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    on_gpu = dev.platform == "gpu"
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "params": gpt2.param_count(mcfg),
        "flops_per_token": fpt,
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * fpt / PEAK_FLOPS if on_gpu else None,
        "peak_bytes": peak,
        "compile_s": compile_s,
        "losses": losses[:total] if spec.loss_steps else losses[: spec.warmup_steps + spec.timed_steps],
        "profile": profile,
    }


def _worker_main(spec_json: str) -> None:
    spec = RunSpec(**json.loads(spec_json))
    try:
        result = {"ok": True, **_worker(spec)}
    except Exception as e:  # reported in the table (e.g. out of memory, unsupported)
        msg = f"{type(e).__name__}: {e}"
        result = {"ok": False, "error": msg.splitlines()[0][:300]}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side


def _run_subprocess(args: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # room for the xla T=4096 run
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        proc = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n(timed out after {timeout:.0f}s)"
    return proc.returncode, proc.stdout + proc.stderr


def _run(spec: RunSpec, timeout: float) -> dict[str, Any]:
    rc, out = _run_subprocess(
        ["-m", "benchmarks.gpt2", "--worker", json.dumps(dataclasses.asdict(spec))], timeout
    )
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = " | ".join(out.strip().splitlines()[-3:])
    return {"ok": False, "error": f"worker exited with {rc}: {tail[-300:]}"}


def _probe() -> dict[str, Any]:
    code = (
        "import json, jax; d = jax.devices()[0]; "
        "print(json.dumps({'platform': d.platform, 'device_kind': d.device_kind, "
        "'n': jax.device_count(), 'jax': jax.__version__}))"
    )
    rc, out = _run_subprocess(["-c", code], 180)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"could not start JAX (exit {rc}):\n{out[-2000:]}")


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def render_markdown(info: dict[str, Any], specs: list[RunSpec], results: list[dict[str, Any]],
                    png_name: str | None, quick: bool) -> str:
    ok = [r for r in results if r.get("ok")]
    n_params = ok[0]["params"] if ok else None
    lines = [
        f"# GPT-2 training throughput by attention backend{' (quick smoke run)' if quick else ''}",
        "",
        f"- device: {info['device_kind']} ({info['platform']}), JAX {info['jax']}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- model: `{specs[0].model}` preset"
        + (f", {n_params / 1e6:.1f}M parameters" if n_params else "")
        + ", bf16 compute, fp32 parameters, AdamW; one jitted train step (`train.make_train_step`)",
        f"- tokens/s from the median of {-(-specs[0].timed_steps // TIMING_WINDOW)} windows of "
        f"up to {TIMING_WINDOW} steps dispatched back to back (as `python -m train` runs), after "
        f"{specs[0].warmup_steps} warm-up steps; MFU = tokens/s x (6N + 12LTD) / "
        f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s; peak memory = `peak_bytes_in_use`, one fresh process per row",
        "",
        "| T | batch | attention | tokens/s | MFU | step (ms) | peak memory (GiB) | compile (s) "
        "| vs xla |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(s.seq_len, s.attention): r for s, r in zip(specs, results)}
    for s, r in zip(specs, results):
        if not r.get("ok"):
            lines.append(f"| {s.seq_len} | {s.batch_size} | {s.attention} | failed: "
                         f"{r['error'].replace('|', '/')} | | | | | |")
            continue
        ref = by_key.get((s.seq_len, "xla"))
        speedup = (f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
                   if ref and ref.get("ok") else "-")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {s.seq_len} | {s.batch_size} | {s.attention} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {1e3 * r['step_s_median']:.1f} | {_gib(r['peak_bytes'])} | {r['compile_s']:.1f} "
            f"| {speedup} |"
        )
    profiled = [(s, r) for s, r in zip(specs, results) if r.get("ok") and r.get("profile")]
    if profiled:
        from benchmarks.profile import CATEGORIES

        lines += ["", f"## Where the step time goes ({specs[0].profile_steps} traced steps, "
                  "GPU kernel time per step, ms)", "",
                  "| T | attention backend | step | kernels | " + " | ".join(CATEGORIES)
                  + " | GPU idle | launches |",
                  "|---:|---|---:|---:|" + "---:|" * len(CATEGORIES) + "---:|---:|"]
        for s, r in profiled:
            prof = r["profile"]
            cats = " | ".join(f"{prof['ms_per_step'][c]:.1f}" for c in CATEGORIES)
            lines.append(f"| {s.seq_len} | {s.attention} | {1e3 * r['step_s_median']:.1f} "
                         f"| {prof['kernel_ms_per_step']:.1f} | {cats} "
                         f"| {prof['idle_ms_per_step']:.1f} | {prof['launches_per_step']:.0f} |")
        lines += ["", "Largest kernels (ms per step):", ""]
        for s, r in profiled:
            top = ", ".join(f"`{name[:60]}` {ms:.2f}" for name, ms in r["profile"]["top"][:6])
            lines.append(f"- T={s.seq_len} {s.attention}: {top}")
        lines += ["", "Where the GPU waits (idle ms per step before each kernel starts):", ""]
        for s, r in profiled:
            waits = ", ".join(f"`{name[:60]}` {ms:.2f}" for name, ms in r["profile"]["idle_before"][:6])
            lines.append(f"- T={s.seq_len} {s.attention}: {waits or '-'}")
    curves = {s.attention: r["losses"] for s, r in zip(specs, results)
              if s.loss_steps and r.get("ok")}
    if curves:
        steps = specs[0].loss_steps
        lines += ["", f"## Loss, {steps} steps at T={specs[0].seq_len}, same seed and data", ""]
        for name, losses in curves.items():
            tail = losses[-min(20, len(losses)):]
            lines.append(f"- {name}: first {losses[0]:.4f}, mean of the last {len(tail)} steps "
                         f"{sum(tail) / len(tail):.4f}")
        if "pallas" in curves and "xla" in curves:
            diffs = [abs(a - b) for a, b in zip(curves["pallas"], curves["xla"])]
            lines.append(f"- max |pallas - xla| over the run: {max(diffs):.4f}; "
                         f"mean {sum(diffs) / len(diffs):.4f} (bf16 rounding differences)")
        if png_name:
            lines += ["", f"![loss curves]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_losses(specs: list[RunSpec], results: list[dict[str, Any]], path: pathlib.Path) -> bool:
    curves = {s.attention: r["losses"] for s, r in zip(specs, results)
              if s.loss_steps and r.get("ok")}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in curves.items():
        axes[0].plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
    axes[0].set(xlabel="step", ylabel="training loss (nats/token)",
                title=f"GPT-2 T={specs[0].seq_len}: loss by attention backend")
    axes[0].legend()
    if "pallas" in curves and "xla" in curves:
        diff = [a - b for a, b in zip(curves["pallas"], curves["xla"])]
        axes[1].plot(range(1, len(diff) + 1), diff, linewidth=1, color="tab:red")
        axes[1].axhline(0, color="gray", linewidth=0.5)
        axes[1].set(xlabel="step", ylabel="loss difference", title="pallas - xla")
    else:
        axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpt2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps only (CPU: tiny model, xla)")
    p.add_argument("--attention", default=None,
                   help="comma-separated backends (default: pallas,xla,cudnn; CPU --quick: xla)")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS,
                   help="results root; files go to <out-dir>/<device-slug>/ (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per subprocess")
    p.add_argument("--loss-steps", type=int, default=None,
                   help="steps of the pallas/xla loss comparison at T=1024 (default 300; 0: none)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="trace STEPS more steps per run and report GPU kernel time by category "
                        "(attention, matmul, copy, other) and the largest kernels")
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated subset of the sequence lengths (GPU: 1024,4096)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0

    t_start = time.perf_counter()
    info = _probe()
    on_gpu = info["platform"] == "gpu"
    if not on_gpu and not args.quick:
        print(f"benchmarks.gpt2 measures GPU training speed, but JAX found only "
              f"{info['platform']} ({info['device_kind']}). Run it on a GPU, or pass --quick "
              f"for a tiny smoke run of the script.", file=sys.stderr)
        return 2
    if args.attention:
        impls = tuple(a.strip() for a in args.attention.split(",") if a.strip())
        bad = [a for a in impls if a not in IMPLEMENTATIONS]
        if bad or not impls:
            p.error(f"--attention takes a comma-separated subset of {IMPLEMENTATIONS}, got {args.attention!r}")
    else:
        impls = IMPLEMENTATIONS if on_gpu else ("xla",)
    if args.loss_steps is not None and args.loss_steps < 0 or args.profile < 0:
        p.error("--loss-steps and --profile take a number of steps >= 0")
    seq_lens = None
    if args.seq_lens:
        try:
            seq_lens = tuple(int(t) for t in args.seq_lens.split(","))
        except ValueError:
            p.error(f"--seq-lens takes comma-separated integers, got {args.seq_lens!r}")
    specs = _plan(args.quick, on_gpu, impls, loss_steps=args.loss_steps, profile_steps=args.profile,
                  seq_lens=seq_lens)
    if not specs:
        p.error(f"--seq-lens {args.seq_lens} selects none of this plan's sequence lengths")
    print(f"device: {info['device_kind']}; {len(specs)} runs", flush=True)

    results = []
    for s in specs:
        t0 = time.perf_counter()
        r = _run(s, args.timeout)
        results.append(r)
        what = (f"{r['tokens_per_s']:,.0f} tokens/s, peak {_gib(r['peak_bytes'])} GiB, "
                f"compile {r['compile_s']:.0f}s" if r.get("ok") else r["error"])
        print(f"  T={s.seq_len} batch={s.batch_size} {s.attention}: {what} "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)

    folder = args.out_dir / slug(info["device_kind"])
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"gpt2-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    png = folder / f"{stem}.png"
    has_png = plot_losses(specs, results, png)
    md = render_markdown(info, specs, results, png.name if has_png else None, args.quick)
    (folder / f"{stem}.md").write_text(md)
    (folder / f"{stem}.json").write_text(json.dumps(
        {"device": info, "runs": [{"spec": dataclasses.asdict(s), **r} for s, r in zip(specs, results)]},
        indent=1) + "\n")
    print()
    print(md)
    print(f"wrote {folder / stem}.md" + (", .png" if has_png else "") + ", .json "
          f"in {time.perf_counter() - t_start:.0f}s")
    return 0 if all(r.get("ok") for r in results) or on_gpu else 1


if __name__ == "__main__":
    sys.exit(main())
