"""GPT-2 training speed with each attention backend: ``python -m benchmarks.gpt2``.

On one GPU, trains GPT-2 124M (the ``python -m train`` step: bf16 compute, fp32
parameters, AdamW) at T=1024, batch 16 and T=4096, batch 4 (16k tokens per step),
once per attention backend (``pallas``, ``xla``, ``cudnn``), each in a fresh
process (``benchmarks.common.run_worker``) so that peak-memory numbers do not mix.
Reports tokens/s (steps dispatched back to back as ``python -m train`` runs them,
timed in windows of 10 synchronised at their ends; the median window, after the
warm-up steps and compilation), MFU (``6 N + 12 L T D`` FLOPs per token over the
GPU's dense bf16 peak, ``train.config.peak_flops``; none for a GPU not in its table)
and peak GPU memory (``peak_bytes_in_use``).
At T=1024 the ``pallas`` and ``xla`` runs go on to 300 steps from the same seed and
data (``train.data``) and their loss curves are compared and plotted.

Writes ``benchmarks/results/<device>/gpt2-<date>.md`` (tables), ``.png`` (loss
curves) and ``.jsonl`` (a meta line, one line per run as it finishes, a closing meta
line with the status); a second run the same day gets ``gpt2-<date>-2``. Interrupted
(Ctrl-C, SIGTERM), it writes what it has, marked partial, and exits 130. A backend not
available on the platform (cudnn on a CPU) is ``n/a`` in the table and the .jsonl; a CPU
smoke run exits 1 only when no run finished or one failed otherwise. About 5-8 minutes on
an H100, most of it compiling. Run from the repository root::

    PYTHONPATH=. python3 -m benchmarks.gpt2            # full report (GPU)
    PYTHONPATH=. python3 -m benchmarks.gpt2 --quick    # a few steps (CPU: the tiny model, xla)
    PYTHONPATH=. python3 -m benchmarks.gpt2 --loss-steps 0 --profile 5   # where the step time goes

``--profile N`` traces N more steps of each run with ``jax.profiler`` and adds GPU
kernel time per step by category (attention, matmul, copy, other: ``benchmarks.profile``),
GPU idle time and launches per step, the largest kernels and those the GPU waited for.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import pathlib
import statistics
import sys
import time
from typing import Any

import pandas as pd

from benchmarks import common

IMPLEMENTATIONS = ("pallas", "triton", "mosaic", "xla", "cudnn")  # what --attention takes
DEFAULT_IMPLS = ("pallas", "xla", "cudnn")  # a GPU run's (triton and mosaic: one pallas_flash backend by name)
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
        shapes, model, (warmup, timed, default_loss) = [(64, 2), (128, 1)], "tiny", (2, 3, 12)
    else:
        shapes, model, (warmup, timed, default_loss) = [(1024, 16), (4096, 4)], "gpt2", (3, 5, 20) if quick else (5, 30, 300)
    loss_steps = default_loss if loss_steps is None else loss_steps
    shapes = [(t, b) for t, b in shapes if seq_lens is None or t in seq_lens]
    return [RunSpec(impl, t, b, warmup, timed, loss_steps if i == 0 and impl in ("pallas", "xla") else 0, model,
                    profile_steps=profile_steps)
            for i, (t, b) in enumerate(shapes) for impl in impls]


# ---------------------------------------------------------------- worker side


def _pallas_kernels(mcfg, spec: RunSpec) -> str | None:
    """For ``attention="pallas"``: the kernel backend ``"auto"`` picks for each pass of the model's attention on this
    GPU (``pallas_flash/backends/auto_tables/``), e.g. ``"fwd mosaic, bwd mosaic"``; ``None`` for other backends."""
    if spec.attention != "pallas":
        return None
    import jax
    import jax.numpy as jnp

    from pallas_flash.backends.auto import AutoBackend
    from pallas_flash.spec import AttentionInputs, AttentionSpec

    head_dim = mcfg.n_embd // mcfg.n_head
    q = jax.ShapeDtypeStruct((spec.batch_size, spec.seq_len, mcfg.n_head, head_dim), jnp.dtype(mcfg.dtype))
    attn = AttentionSpec(scale=head_dim**-0.5, causal=True)
    return ", ".join(f"{p} {AutoBackend().choose(p, q, q, q, AttentionInputs(), attn)}" for p in ("fwd", "bwd"))


def _worker(spec_dict: dict) -> dict[str, Any]:
    """Train ``spec`` in this process; return the measurements (``{"probe": true}``: the device alone)."""
    import jax
    import numpy as np

    dev, info = jax.devices()[0], common.device_info()
    if spec_dict.get("probe"):
        return info
    from flax import nnx

    from models import gpt2
    from train import data as data_lib
    from train.config import TrainConfig, peak_flops
    from train.step import init_train_state, make_optimizer, make_train_step

    spec = RunSpec(**spec_dict)
    base = gpt2.get_config(spec.model)
    mcfg = dataclasses.replace(base, block_size=max(base.block_size, spec.seq_len), attention=spec.attention, dtype="bfloat16")
    total = max(spec.warmup_steps + spec.timed_steps, spec.loss_steps)
    tx, _ = make_optimizer(TrainConfig(config=spec.model, steps=max(total, 2), lr=spec.lr, warmup=min(100, total // 10)))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(mcfg, rngs=nnx.Rngs(0))))
    params, opt_state = jax.jit(functools.partial(init_train_state, mcfg, tx))(jax.random.key(spec.seed))
    step_fn = jax.jit(make_train_step(graphdef, tx, 1)[0], donate_argnums=(0, 1))
    sampler = data_lib.BatchSampler(data_lib.load_data(None).train, seq_len=spec.seq_len, batch_size=spec.batch_size,
                                    seed=spec.seed)
    key = jax.random.key(spec.seed)
    losses, times = [], []

    def steps(first: int, n: int) -> float:
        """Train steps ``first .. first+n-1`` dispatched back to back, as ``python -m train``
        does (the host prepares the next batch while the GPU works); waits for the last
        and returns the mean seconds per step."""
        nonlocal params, opt_state
        t0, metrics = time.perf_counter(), []
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

    warm = [steps(i, 1) for i in range(spec.warmup_steps)]  # one at a time: the first compiles
    compile_s = warm[0] if warm else None
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
    peak = peak_flops(dev)
    return dict(
        info, params=gpt2.param_count(mcfg), flops_per_token=fpt, step_s_median=step_s, step_s_all=times,
        tokens_per_s=tokens_per_s, mfu=tokens_per_s * fpt / peak if peak else None, peak_flops=peak,
        peak_bytes=(dev.memory_stats() or {}).get("peak_bytes_in_use"), compile_s=compile_s,
        losses=losses[: total if spec.loss_steps else spec.warmup_steps + spec.timed_steps], profile=profile,
        kernels=_pallas_kernels(mcfg, spec))


# ---------------------------------------------------------------- parent side


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _failure(r: dict) -> str:
    """How a run that did not finish shows: ``n/a`` (the backend is not available here, e.g. cudnn on a CPU; the
    .jsonl's status) or ``failed``."""
    return "n/a" if r.get("status") == "n/a" else "failed"


def _table(rows: list[dict], left: str) -> list[str]:
    """Markdown lines of a table, column ``left`` left-aligned and the others right."""
    df = pd.DataFrame(rows)
    align = ["left" if c == left else "right" for c in df.columns]
    return df.to_markdown(index=False, disable_numparse=True, colalign=align).splitlines()


def _curve_spec(specs: list[RunSpec]) -> RunSpec:
    """The first run that goes on to a loss curve (the plan gives them all the same length and steps)."""
    return next(s for s in specs if s.loss_steps)


def _curves(specs: list[RunSpec], results: list[dict]) -> dict[str, list[float]]:
    return {s.attention: r["losses"] for s, r in zip(specs, results) if s.loss_steps and r.get("ok")}


def _profile_lines(specs: list[RunSpec], results: list[dict]) -> list[str]:
    from benchmarks.profile import CATEGORIES

    profiled = [(s, r) for s, r in zip(specs, results) if r.get("ok") and r.get("profile")]
    if not profiled:
        return []
    rows = [{"T": str(s.seq_len), "attention backend": s.attention, "step": f"{1e3 * r['step_s_median']:.1f}",
             "kernels": f"{r['profile']['kernel_ms_per_step']:.1f}",
             **{c: f"{r['profile']['ms_per_step'][c]:.1f}" for c in CATEGORIES},
             "GPU idle": f"{r['profile']['idle_ms_per_step']:.1f}", "launches": f"{r['profile']['launches_per_step']:.0f}"}
            for s, r in profiled]
    lines = ["", f"## Where the step time goes ({specs[0].profile_steps} traced steps, GPU kernel time per step, ms)", ""]
    lines += _table(rows, "attention backend")
    for title, field in (("Largest kernels (ms per step):", "top"),
                         ("Where the GPU waits (idle ms per step before each kernel starts):", "idle_before")):
        lines += ["", title, ""]
        for s, r in profiled:
            shown = ", ".join(f"`{name[:60]}` {ms:.2f}" for name, ms in r["profile"][field][:6])
            lines.append(f"- T={s.seq_len} {s.attention}: {shown or '-'}")
    return lines


def render_markdown(info: dict[str, Any], specs: list[RunSpec], results: list[dict[str, Any]],
                    png_name: str | None, quick: bool) -> str:
    ok = [r for r in results if r.get("ok")]
    n_params = ok[0]["params"] if ok else None
    peaks = sorted({r["peak_flops"] for r in ok if r.get("peak_flops")})
    peak_text = " or ".join(f"{p / 1e12:.0f}" for p in peaks) + " TFLOP/s (the GPU's dense bf16 peak)" if peaks else \
        "the GPU's dense bf16 peak (not known for this device: no MFU)"
    lines = [
        f"# GPT-2 training throughput by attention backend{' (quick smoke run)' if quick else ''}", "",
        f"- device: {info['device']} ({info['platform']}), JAX {info['jax_version']}, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- model: `{specs[0].model}` preset" + (f", {n_params / 1e6:.1f}M parameters" if n_params else "")
        + ", bf16 compute, fp32 parameters, AdamW; one jitted train step (`train.step.make_train_step`)",
        f"- tokens/s from the median of {-(-specs[0].timed_steps // TIMING_WINDOW)} windows of up to {TIMING_WINDOW} "
        f"steps dispatched back to back (as `python -m train` runs), after {specs[0].warmup_steps} warm-up steps; "
        f"MFU = tokens/s x (6N + 12LTD) / {peak_text}; peak memory = `peak_bytes_in_use`, "
        "one fresh process per row"]
    kernels = {s.seq_len: r["kernels"] for s, r in zip(specs, results) if r.get("ok") and r.get("kernels")}
    if kernels:  # which kernels "pallas" ran: auto's choice per pass, from the auto table for this GPU
        lines.append("- `pallas` ran (`implementation=\"pallas\"`, per pass the backend "
                     "`pallas_flash/backends/auto_tables/` lists first for this GPU): "
                     + "; ".join(f"T={t}: {k}" for t, k in sorted(kernels.items())))
    lines.append("")
    by_key = {(s.seq_len, s.attention): r for s, r in zip(specs, results)}
    rows = []
    for s, r in zip(specs, results):
        row = {"T": str(s.seq_len), "batch": str(s.batch_size), "attention": s.attention}
        if not r.get("ok"):
            rows.append(dict(row, **{"tokens/s": f"{_failure(r)}: {r['error'].replace('|', '/')}"}))
            continue
        ref = by_key.get((s.seq_len, "xla"))
        rows.append(dict(row, **{
            "tokens/s": f"{r['tokens_per_s']:,.0f}", "MFU": "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "step (ms)": f"{1e3 * r['step_s_median']:.1f}", "peak memory (GiB)": _gib(r["peak_bytes"]),
            "compile (s)": f"{r['compile_s']:.1f}",
            "vs xla": f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and ref.get("ok") else "-"}))
    lines += _table([{k: row.get(k, "") for k in max(rows, key=len)} for row in rows], "attention")
    lines += _profile_lines(specs, results)
    curves = _curves(specs, results)
    if curves:
        curve_spec = _curve_spec(specs)
        lines += ["", f"## Loss, {curve_spec.loss_steps} steps at T={curve_spec.seq_len}, same seed and data", ""]
        for name, losses in curves.items():
            tail = losses[-min(20, len(losses)):]
            lines.append(f"- {name}: first {losses[0]:.4f}, mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
        if "pallas" in curves and "xla" in curves:
            diffs = [abs(a - b) for a, b in zip(curves["pallas"], curves["xla"])]
            lines.append(f"- max |pallas - xla| over the run: {max(diffs):.4f}; mean {sum(diffs) / len(diffs):.4f} "
                         "(bf16 rounding differences)")
        if png_name:
            lines += ["", f"![loss curves]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_losses(specs: list[RunSpec], results: list[dict[str, Any]], path: pathlib.Path) -> bool:
    curves = _curves(specs, results)
    if not curves:
        return False
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pd.DataFrame({k: pd.Series(v, index=range(1, len(v) + 1)) for k, v in curves.items()}).plot(ax=axes[0], linewidth=1)
    axes[0].set(xlabel="step", ylabel="training loss (nats/token)", title=f"GPT-2 T={_curve_spec(specs).seq_len}: loss by attention backend")
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
    p.add_argument("--attention", default=None, help=f"comma-separated backends from {','.join(IMPLEMENTATIONS)} "
                   f"(default: {','.join(DEFAULT_IMPLS)}; CPU --quick: xla)")
    p.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS_DIR,
                   help="results root; files go to <out-dir>/<device-slug>/ (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per subprocess")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the pallas/xla loss comparison at T=1024 (default 300; 0: none)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="trace STEPS more steps per run and report GPU "
                   "kernel time by category (attention, matmul, copy, other) and the largest kernels")
    p.add_argument("--seq-lens", default=None, help="comma-separated subset of the sequence lengths (GPU: 1024,4096)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(_worker, args.worker)

    t_start = time.perf_counter()
    probed = common.probe_platform("benchmarks.gpt2", measures="GPU training speed", smoke_flag="--quick",
                                   allow_cpu=args.quick)
    if probed is None:
        return 2
    info, on_gpu = probed
    impls = tuple(a.strip() for a in (args.attention or "").split(",") if a.strip())
    if args.attention and (not impls or any(a not in IMPLEMENTATIONS for a in impls)):
        p.error(f"--attention takes a comma-separated subset of {IMPLEMENTATIONS}, got {args.attention!r}")
    impls = impls or (DEFAULT_IMPLS if on_gpu else ("xla",))
    if args.loss_steps is not None and args.loss_steps < 0 or args.profile < 0:
        p.error("--loss-steps and --profile take a number of steps >= 0")
    try:
        seq_lens = tuple(int(t) for t in args.seq_lens.split(",")) if args.seq_lens else None
    except ValueError:
        p.error(f"--seq-lens takes comma-separated integers, got {args.seq_lens!r}")
    specs = _plan(args.quick, on_gpu, impls, loss_steps=args.loss_steps, profile_steps=args.profile, seq_lens=seq_lens)
    if not specs:
        p.error(f"--seq-lens {args.seq_lens} selects none of this plan's sequence lengths")
    print(f"device: {info['device']}; {len(specs)} runs", flush=True)

    folder = args.out_dir / info["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = common.unique_stem(folder, f"gpt2-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else ""))
    jsonl = stem.with_suffix(".jsonl")
    common.append_jsonl(jsonl, dict(info, kind="meta", status="running"))
    results, status = [], "complete"
    with common.sigterm_raises():
        try:
            for s in specs:
                t0 = time.perf_counter()
                # Room for the xla T=4096 run.
                r = common.run_worker("benchmarks.gpt2", dataclasses.asdict(s), args.timeout,
                                      {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"})
                results.append(r)
                common.append_jsonl(jsonl, {"spec": dataclasses.asdict(s), **r})  # kept if a later run is killed
                what = (f"{r['tokens_per_s']:,.0f} tokens/s, peak {_gib(r['peak_bytes'])} GiB, compile {r['compile_s']:.0f}s"
                        if r.get("ok") else f"{_failure(r)}: {r['error']}")
                print(f"  T={s.seq_len} batch={s.batch_size} {s.attention}: {what} [{time.perf_counter() - t0:.0f}s]",
                      flush=True)
        except (KeyboardInterrupt, common.Terminated) as e:
            status = f"partial: interrupted ({type(e).__name__} {e}) after {len(results)} of {len(specs)} runs"
    common.append_jsonl(jsonl, dict(info, kind="meta", status=status))
    ran = specs[: len(results)]
    png = stem.with_suffix(".png")
    has_png = plot_losses(ran, results, png) if results else False
    md = render_markdown(info, ran, results, png.name if has_png else None, args.quick) if results else ""
    if status != "complete":
        md = f"**{status}**\n\n" + md
    stem.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"{status}; wrote {stem}.md" + (", .png" if has_png else "") + f", .jsonl in {time.perf_counter() - t_start:.0f}s")
    if status != "complete":
        return 130
    return exit_status(results, on_gpu)


def exit_status(results: list[dict], on_gpu: bool) -> int:
    """0, or 1 for a CPU smoke run that failed: no run finished, or one failed other than as n/a (a backend not
    available on this platform, e.g. cudnn on a CPU). A GPU run's failures are its report's rows (exit 0)."""
    if on_gpu:
        return 0
    failed = any(not r.get("ok") and r.get("status") != "n/a" for r in results)
    return 0 if any(r.get("ok") for r in results) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
