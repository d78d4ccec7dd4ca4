"""Attention benchmark: pallas_flash against cuDNN, XLA and JAX's own Pallas kernel.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python3 -m benchmarks.attention --quick
    PYTHONPATH=. python3 -m benchmarks.attention --head-dims 64,128 --seq-lens 1k,4k,16k \\
        --impls pallas_flash,cudnn,pallas_mha --only fwd,fwd_bwd --dtypes bf16
    PYTHONPATH=. python3 -m benchmarks.attention --suite masks     # windows, packed documents, soft-cap
    PYTHONPATH=. python3 -m benchmarks.attention --memory          # peak memory against N

Suites (``benchmarks.harness``): ``attention``, the FlashAttention-2 paper's grid
(B·N tokens fixed, heads = hidden / D) over head dims, sequence lengths, causal,
GQA and dtypes; ``masks``, named problems with a sliding window, packed documents
(segment ids) and a logits soft-cap, where ``cudnn_packed`` (cuDNN's own packed
layout) joins for packed documents; ``memory``, peak memory of one forward+backward
against N, each point measured in a fresh process (or compile-only analysis).

Every (implementation, pass, problem) is first checked against a float32
reference on the same inputs (the output, and dq, dk, dv under a random
cotangent), then timed. Wrong results show as FAIL, out-of-memory as OOM,
unsupported as n/a, other exceptions as ERR; none are dropped. Results go to
``benchmarks/results/<device>/<date>[-tag].{md,jsonl,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys
import time
import warnings
from typing import Sequence

from benchmarks import common, harness, report
from benchmarks.harness import DTYPES, IMPLS, PASSES

SUITES = ("attention", "masks", "memory")
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32"}
MEMORY_SEQ_LENS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
SMOKE_TIMING = dict(min_samples=2, max_samples=3, max_inner=1)

# Not in the default grid: cuDNN's packed layout (masks suite only) and the Triton kernels named alone, which
# ``pallas_flash`` (auto) already runs on a GPU without an auto table (A/B them with ``--impls``).
_NOT_DEFAULT = ("cudnn_packed", "pallas_flash_triton")
_GRID = dict(head_dims=(64, 128, 256), seq_lens=(512, 1024, 2048, 4096, 8192, 16384, 32768), causal=(False, True), gqa=(1, 4),
             dtypes=("bf16", "fp16"), passes=PASSES, impls=tuple(i for i in IMPLS if i not in _NOT_DEFAULT), min_time=0.5,
             batch_tokens=16384, hidden=2048, time_budget=None)
_MASKS = dict(_GRID, dtypes=("bf16",), passes=("fwd", "fwd_bwd"), impls=("pallas_flash", "cudnn", "xla", "cudnn_packed"),
              min_time=0.3, time_budget=420.0)
_MEMORY = dict(_GRID, dtypes=("bf16",), seq_lens=MEMORY_SEQ_LENS, impls=("pallas_flash", "xla", "cudnn"))
# Defaults by (suite, profile): "full", "quick", or "cpu" (--allow-cpu without a GPU, --quick or not: tiny shapes,
# interpret mode).
DEFAULTS = {
    ("attention", "full"): _GRID,
    # The headline pair; a run is compile-bound, each impl adds ~5 s per shape.
    ("attention", "quick"): dict(_GRID, head_dims=(64, 128), seq_lens=(1024, 4096), gqa=(1,), dtypes=("bf16",),
                                 passes=("fwd", "fwd_bwd"), impls=("pallas_flash", "cudnn"), min_time=0.2),
    ("attention", "cpu"): dict(_GRID, head_dims=(32,), seq_lens=(128,), gqa=(1,), dtypes=("bf16",), min_time=0.02,
                               batch_tokens=256, hidden=64),
    ("masks", "full"): _MASKS, ("masks", "quick"): dict(_MASKS, min_time=0.2), ("masks", "cpu"): dict(_MASKS, min_time=0.0),
    ("memory", "full"): _MEMORY, ("memory", "quick"): _MEMORY, ("memory", "cpu"): dict(_MEMORY, seq_lens=(128, 256)),
}


# --- command line -------------------------------------------------------------------


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


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return vals


def _choices(text: str, choices: Sequence[str], what: str, aliases: dict | None = None) -> tuple[str, ...]:
    vals = tuple(dict.fromkeys((aliases or {}).get(t.lower(), t.lower()) for t in _split(text)))
    for t in vals:
        if t not in choices:
            raise ValueError(f"{what}: unknown value {t!r}; choose from {', '.join(choices)}")
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.attention", formatter_class=common.DefaultsHelpFormatter,
        description="Benchmark pallas_flash attention against cuDNN, XLA and JAX's Pallas mha: check each configuration "
        "against a float32 reference, then time it. Default: the full attention sweep (D 64/128/256, N 512..32k with "
        "B*N = 16k tokens and heads = 2048/D, causal and not, MHA and GQA 4:1, bf16 and fp16, fwd/fwd_bwd/bwd, all "
        "implementations) - long; run parts. --suite masks: sliding windows, packed documents, soft-cap.")
    sel = p.add_argument_group("what to run (later flags override --quick's choices)")
    sel.add_argument("--suite", choices=SUITES, default="attention", help="attention: the paper grid; masks: window, "
                     "segment-id and soft-cap problems (16 heads, D 128, B*T 16k); memory: the peak-memory sweep")
    sel.add_argument("--quick", action="store_true", help="D 64,128; N 1k,4k; causal and not; bf16; fwd,fwd_bwd; "
                     "pallas_flash and cudnn (aimed at under 2 min on an H100); on a CPU with --allow-cpu the tiny "
                     "smoke shapes are used instead")
    sel.add_argument("--only", metavar="PASSES", help=f"passes, comma-separated from {','.join(PASSES)} (fwd+bwd is "
                     "fwd_bwd; default all three, --quick and masks fwd,fwd_bwd)")
    sel.add_argument("--impls", help=f"implementations, comma-separated from {','.join(IMPLS)} (default all but "
                     f"{' and '.join(_NOT_DEFAULT)}; --quick pallas_flash,cudnn; masks and memory: see --suite, "
                     "--memory)")
    sel.add_argument("--problems", help="masks suite: problem names, run in that order (default: all: "
                     f"{','.join(harness.mask_problems())}; with --allow-cpu on a CPU: {','.join(harness.mask_problems(True))})")
    sel.add_argument("--head-dims", help="head dims D, e.g. 64,128 (default 64,128,256; --quick 64,128; "
                     "--allow-cpu on a CPU 32)")
    sel.add_argument("--seq-lens", help="sequence lengths N, e.g. 1k,4k,16k (default 512 to 32k; --quick 1k,4k; memory "
                     "1k to 128k; --allow-cpu on a CPU 128, memory 128,256)")
    sel.add_argument("--dtypes", help="comma-separated from bf16,fp16,fp32 (default bf16,fp16; --quick, masks, memory "
                     "and --allow-cpu on a CPU bf16)")
    sel.add_argument("--gqa", help="query heads per KV head, e.g. 1,4 (default 1,4; --quick and --allow-cpu on a "
                     "CPU 1)")
    sel.add_argument("--causal", choices=("both", "yes", "no"), help="causal masking (default both)")
    sel.add_argument("--batch-tokens", type=int, help="batch * N (default 16384; --allow-cpu on a CPU 256)")
    sel.add_argument("--hidden", type=int, help="heads * D (default 2048; --allow-cpu on a CPU 64)")
    sel.add_argument("--memory", action="store_true", help="the same as --suite memory: fwd+bwd, B=1, 16 heads, D=128, "
                     "causal, N 1k..128k (--seq-lens overrides), impls pallas_flash,xla,cudnn, first of --dtypes")
    sel.add_argument("--memory-method", choices=("measured", "analysis"), default="measured",
                     help="measured: each point in a fresh subprocess, reading peak_bytes_in_use (also records the "
                     "analysis); analysis: compile only, in-process, the executable's memory analysis")
    how = p.add_argument_group("how")
    how.add_argument("--min-time", type=float, help="seconds of timed samples per function (default 0.5, --quick 0.2, "
                     "masks 0.3; --allow-cpu on a CPU 0.02, masks 0)")
    how.add_argument("--warmup", type=int, default=1, help="extra warm-up calls after the checked (compiling) call")
    how.add_argument("--ref", choices=("f32", "cudnn", "none"), default="f32",
                     help="reference for the checks (f32 falls back to cudnn when it does not fit)")
    how.add_argument("--ref-budget-gb", type=float, default=8.0, help="GiB the chunked float32 reference may materialise at once")
    how.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no new problem after this many seconds "
                     "(default: none; masks 420); write the report with what was measured")
    how.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    how.add_argument("--jobs", type=int, default=4, help="XLA compilations run in parallel per problem")
    how.add_argument("--compile-cache", metavar="DIR", help="JAX persistent compilation cache directory (speeds up re-runs)")
    how.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test; tiny default shapes, interpret mode)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output directory; '{device}' is replaced by the device slug "
                     "(default benchmarks/results/{device})")
    out.add_argument("--tag", help="appended to the file names: <date>-<tag>.md (default: the suite, for masks and memory)")
    out.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    out.add_argument("--report-from", nargs="+", metavar="JSONL", help="no benchmarking: merge these raw .jsonl files "
                     "into one report (works on CPU)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str], on_cpu: bool = False) -> argparse.Namespace:
    """Parse and validate the command line; bad values exit with a clear message (status 2)."""
    parser = build_parser()
    a = parser.parse_args(list(argv))
    suite = "memory" if a.memory else a.suite
    # On a CPU, --allow-cpu's tiny shapes win over --quick's GPU shapes (interpret mode runs those for hours);
    # shapes given by flag (--head-dims, --seq-lens, ...) are used as given.
    profile = "cpu" if on_cpu and a.allow_cpu else "quick" if a.quick else "full"
    d = DEFAULTS[(suite, profile)]
    try:
        head_dims = _ints(a.head_dims, "--head-dims") if a.head_dims else d["head_dims"]
        seq_lens = tuple(parse_seq_len(t) for t in _split(a.seq_lens)) if a.seq_lens else d["seq_lens"]
        if not seq_lens:
            raise ValueError("--seq-lens: empty list")
        gqa = _ints(a.gqa, "--gqa") if a.gqa else d["gqa"]
        dtypes = _choices(a.dtypes, tuple(DTYPES), "--dtypes", DTYPE_ALIASES) if a.dtypes else d["dtypes"]
        passes = _choices(a.only, PASSES, "--only", {"fwd+bwd": "fwd_bwd", "fwdbwd": "fwd_bwd"}) if a.only else d["passes"]
        impls = _choices(a.impls, tuple(IMPLS), "--impls") if a.impls else d["impls"]
        causal = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal] if a.causal else d["causal"]
        batch_tokens = a.batch_tokens if a.batch_tokens is not None else d["batch_tokens"]
        hidden = a.hidden if a.hidden is not None else d["hidden"]
        if batch_tokens < 1 or hidden < 1:
            raise ValueError("--batch-tokens and --hidden must be positive")
        if a.problems and suite != "masks":
            raise ValueError("--problems goes with --suite masks")
        names = tuple(harness.mask_problems(small=profile == "cpu"))
        problems = _choices(a.problems, names, "--problems") if a.problems else None
        if suite == "attention":
            for dim in head_dims:
                if hidden % dim:
                    raise ValueError(f"--head-dims: D={dim} does not divide --hidden {hidden} (heads = hidden / D)")
                for g in (g for g in gqa if (hidden // dim) % g):
                    raise ValueError(f"--gqa {g} does not divide the {hidden // dim} heads of D={dim}")
        min_time = a.min_time if a.min_time is not None else d["min_time"]
        if (min_time <= 0 and profile != "cpu") or a.warmup < 0 or a.ref_budget_gb <= 0 or a.jobs < 1:
            raise ValueError("--min-time, --ref-budget-gb and --jobs must be positive, --warmup non-negative")
        time_budget = a.time_budget if a.time_budget is not None else d["time_budget"]
        if time_budget is not None and time_budget <= 0:
            raise ValueError("--time-budget must be positive")
        if a.tag is not None and (not a.tag or any(c in a.tag for c in "/\\ ")):
            raise ValueError(f"--tag {a.tag!r}: use a non-empty name without slashes or spaces")
        for path in a.report_from or ():
            if not pathlib.Path(path).is_file():
                raise ValueError(f"--report-from: no such file {path!r}")
    except ValueError as e:
        parser.error(str(e))
    # The parsed namespace with every default filled in: what the harness reads.
    return argparse.Namespace(**dict(
        vars(a), suite=suite, memory=suite == "memory", head_dims=head_dims, seq_lens=seq_lens, causal=causal, gqa=gqa,
        dtypes=dtypes, passes=passes, impls=impls, problems=problems, batch_tokens=batch_tokens, hidden=hidden,
        min_time=min_time, time_budget=time_budget, report_from=tuple(a.report_from or ()), profile=profile,
        timing=SMOKE_TIMING if profile == "cpu" else {}, argv=tuple(argv)))


def plan(opts: argparse.Namespace) -> list[harness.Problem]:
    """The problems of the speed suites, in run order."""
    if opts.suite == "masks":
        by_name = {dt: harness.mask_problems(small=opts.profile == "cpu", dtype=dt) for dt in opts.dtypes}
        return [by_name[dt][n] for dt in opts.dtypes for n in (opts.problems or by_name[dt])]
    return harness.grid_problems(opts.dtypes, opts.gqa, opts.head_dims, opts.seq_lens, opts.causal, opts.batch_tokens, opts.hidden)


# --- the report's header ---------------------------------------------------------------

METHOD_TEXT = """\
- **Implementations**: {impl_notes}
- **Problems**: {problems}
- **Check first**: every (implementation, pass, problem) is compared with a reference on the same random inputs before it is timed: ‖x − ref‖/‖ref‖ for the output (fwd), for dq, dk, dv under a random cotangent (bwd) and for all four (fwd_bwd); the largest must be below the tolerance ({tols}) and finite, else the cell is FAIL and not timed. Reference: `pallas_flash.testing.chunked_reference` (float32 `attention_reference`, matmul precision "highest", in chunks of batch, heads and query rows, at most {budget} GiB of logits at once); where that fails, cuDNN's result, and where that fails too the cell is marked `*` (not checked). The reference used is recorded per cell in the .jsonl.
- **Timing**: `jax.jit`, one checked call (compiles), {warmup} warm-up call(s), then `pallas_flash.tuning.timer.time_fn`: samples of back-to-back asynchronous calls closed by `jax.block_until_ready` on the host clock; the median per-call time (about {min_time} s of samples per function). Inputs are rotated over up to 3 sets when one set is smaller than 2 × 50 MB (L2). `bwd` times the jitted pullback alone (`jax.vjp` run beforehand, its residuals passed in), not (fwd+bwd) − fwd.
- **FLOPs**: {flops} TFLOP/s = FLOPs / median time. Ratio columns are TFLOP/s over cuDNN's in the same run.
- **Statuses**: FAIL wrong result, OOM out of memory, n/a not supported by that implementation, ERR any other exception (messages under Problems).
- **Memory**: {memory_text}
"""
PROBLEMS_TEXT = {
    "attention": "B·N = {tokens} tokens, heads = {hidden}/D (the FlashAttention-2 paper's sweep); GQA g:1 keeps the query heads and has heads/g K/V heads.",
    "masks": "causal; `local_window_size=(w, 0)`; packed documents as `q_segment_ids`/`kv_segment_ids` (for jax.nn a dense `[B, 1, T, T]` mask built once outside the timed function; `cudnn_packed` is cuDNN's own packed layout); `logits_soft_cap` (jax.nn has none: n/a).",
    "memory": "forward+backward, B=1, 16 heads, D=128, causal.",
}
FLOPS_TEXT = {
    "masks": "only the visible (query, key) pairs, counted exactly: 4·B·heads·D per pair forward, backward 2.5×, forward+backward 3.5×.",
    "attention": "4·B·heads·Tq·Tk·D for the forward, ×0.5 causal, backward 2.5×, forward+backward 3.5× (`Shape.flops`).",
}
MEMORY_TEXT = {
    "measured": "each (implementation, N) point runs in a fresh Python process (peak statistics are process-wide): jit + compile the forward+backward, create the inputs, run once, then read `jax.devices()[0].memory_stats()['peak_bytes_in_use']` (\"peak\", includes the inputs and outputs). The compiled executable's `memory_analysis()` (arguments + outputs + temporaries − aliased; \"analysis\") is recorded beside it.",
    "analysis": "compile-only, in this process: the compiled forward+backward executable's `memory_analysis()` (arguments + outputs + temporaries − aliased bytes). Nothing is run; a point whose analysis exceeds the device's memory limit is marked OOM.",
}


def _meta(opts: argparse.Namespace, dev: dict, status: str) -> dict:
    return dict(
        kind="meta", **dev,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="PYTHONPATH=. python3 -m benchmarks.attention " + shlex.join(opts.argv), commit=common.git_commit(),
        impls=list(opts.impls), status=status, speedups=harness.WINDOW_SPEEDUPS,
        method=METHOD_TEXT.format(
            impl_notes="; ".join(f"`{i}`: {IMPLS[i].note}" for i in opts.impls),
            problems=PROBLEMS_TEXT[opts.suite].format(tokens=opts.batch_tokens, hidden=opts.hidden),
            tols=", ".join(f"{k} {v:g}" for k, v in harness.TOLERANCE.items() if k in opts.dtypes),
            budget=f"{opts.ref_budget_gb:g}", warmup=opts.warmup, min_time=f"{opts.min_time:g}",
            flops=FLOPS_TEXT.get(opts.suite, FLOPS_TEXT["attention"]),
            memory_text=MEMORY_TEXT[opts.memory_method] if opts.memory else "not run (use --suite memory)."),
    )


def _out_stem(opts: argparse.Namespace, device_slug: str) -> pathlib.Path:
    out_dir = pathlib.Path(opts.out.replace("{device}", device_slug)) if opts.out else common.RESULTS_DIR / device_slug
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = opts.tag or (opts.suite if opts.suite != "attention" else None)
    return common.unique_stem(out_dir, datetime.date.today().isoformat() + (f"-{tag}" if tag else ""))


RECORD_KINDS = ("speed", "memory")  # what benchmarks.attention writes besides its meta lines


def _load_runs(paths: Sequence[str], warn=None) -> tuple[list[dict], list[dict], list[dict]]:
    """(records, metas, runs) of the files: each record gets ``run``, its file's name (the path where two names
    are alike; a record from an earlier merge keeps its own), and ``runs`` describes each run. ``ValueError``
    (naming the file) for a file that is not benchmarks.attention's records; a cut last line goes to ``warn``."""
    records, metas, runs = [], [], []
    names = [pathlib.Path(p).name for p in paths]
    for path, name in zip(paths, names):
        label = name if names.count(name) == 1 else str(path)
        recs, ms = common.load_jsonl([path], warn=warn)
        for r in recs:
            if r.get("kind") not in RECORD_KINDS or not isinstance(r.get("impl"), str):
                what = f"kind {r['kind']!r}" if "kind" in r else "no 'kind'"
                raise ValueError(f"{path} is not a benchmarks.attention record file (a record with {what}"
                                 f"{'' if 'impl' in r else ', no impl'}; expected kinds {', '.join(RECORD_KINDS)})")
        last = ms[-1] if ms else {}
        runs += last.get("runs") or [dict(run=label, commit=last.get("commit"), date=last.get("date"),
                                          status=last.get("status"), jax_version=last.get("jax_version"),
                                          jaxlib_version=last.get("jaxlib_version"))]
        records += [dict(r, run=r.get("run") or label) for r in recs]
        metas += ms
    return records, metas, runs


def _report_from(opts: argparse.Namespace) -> int:
    cut = []  # lines skipped (cut short): said on stderr and in the merged report's status

    def warn(msg: str) -> None:
        cut.append(pathlib.Path(msg.split(": ", 1)[0]).name)  # "<file>:<line>"
        print(f"warning: --report-from: {msg}", file=sys.stderr)

    try:
        records, metas, runs = _load_runs(opts.report_from, warn=warn)
    except (ValueError, OSError) as e:
        print(f"--report-from: {e}", file=sys.stderr)
        return 2
    if not records:
        print("no records in " + ", ".join(opts.report_from), file=sys.stderr)
        return 1
    devices = list(dict.fromkeys(m["device"] for m in metas if m.get("device")))
    if len(devices) > 1:  # one report's tables, header and ratios are one device's
        print(f"--report-from: the files come from {len(devices)} devices ({'; '.join(devices)}); "
              "merge the runs of one device at a time", file=sys.stderr)
        return 2
    meta = dict(metas[-1]) if metas else {"device": "?", "device_slug": "unknown"}
    for field, join in (("command", "` ; `".join), ("method", lambda ms: "\n".join(f"Run {i}:\n\n{m}" for i, m in enumerate(ms, 1)))):
        values = list(dict.fromkeys(m[field] for m in metas if m.get(field)))
        if len(values) > 1:  # runs with different settings: keep each one's
            meta[field] = join(values)
    meta["impls"] = report.impl_order((r["impl"] for r in records), [i for m in metas for i in m.get("impls", [])])
    meta["status"] = "merged from " + ", ".join(pathlib.Path(p).name for p in opts.report_from) + (
        f" (skipped, cut short: {', '.join(cut)})" if cut else "")
    meta["runs"] = runs  # each record's ``run``: ratios only within one run, duplicates listed
    meta["commit"] = ", ".join(dict.fromkeys(r["commit"] or "unknown" for r in runs))
    for field in ("jax_version", "jaxlib_version"):  # each run's own; not the last file's for all of them
        meta[field] = ", ".join(dict.fromkeys(r.get(field) or "?" for r in runs))
    meta["speedups"] = harness.WINDOW_SPEEDUPS
    if opts.out or opts.tag:
        stem = _out_stem(argparse.Namespace(**dict(vars(opts), suite="attention")), meta.get("device_slug", "unknown"))
    else:
        first = pathlib.Path(opts.report_from[0])
        stem = common.unique_stem(first.parent, first.stem + "-merged")
    for rec in [dict(meta, kind="meta")] + records:
        common.append_jsonl(stem.with_suffix(".jsonl"), rec)
    paths = report.write_report(records, meta, stem, plots=opts.plots)
    print(report.summary_text(records, meta["impls"], meta.get("speedups", ())))
    print("\nwrote " + ", ".join(str(p) for p in [stem.with_suffix(".jsonl"), *paths]))
    return 0


# --- running ------------------------------------------------------------------------------


def memory_record(opts: argparse.Namespace, impl: str, seq: int) -> dict:
    """One point of the memory sweep: measured in a fresh process, or analysed here."""
    if opts.memory_method == "analysis":
        return harness.memory_point(impl, seq, opts.dtypes[0], measure=False)
    spec = dict(impl=impl, seq=seq, dtype=opts.dtypes[0])
    rec = common.run_worker("benchmarks.attention", spec, timeout=180)
    if "kind" not in rec:  # the worker died before it could answer
        p = harness.memory_problem(seq, opts.dtypes[0])
        rec = dict(kind="memory", impl=impl, method="measured", **p.fields(), status=rec["status"], message=rec["error"])
    return rec


def _memory_worker(spec: dict) -> dict:
    return harness.memory_point(spec["impl"], spec["seq"], spec["dtype"], measure=True)


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return common.worker_main(_memory_worker, argv[argv.index("--worker") + 1])
    import jax

    on_cpu = jax.default_backend() != "gpu"
    opts = parse_args(argv, on_cpu=on_cpu)
    if opts.report_from:
        return _report_from(opts)
    if on_cpu and not opts.allow_cpu:
        print(f"benchmarks.attention needs an NVIDIA GPU, but JAX's default backend is {jax.default_backend()!r} "
              f"({jax.devices()[0]}). Run it on the GPU machine, or pass --allow-cpu for a smoke run with tiny shapes "
              "(cuDNN shows n/a; Pallas kernels run in interpret mode).", file=sys.stderr)
        return 2
    for msg in (r".*Pallas Triton backend is deprecated.*", r".*pallas\.ops\.gpu\.attention is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg, category=DeprecationWarning)
    if opts.compile_cache:
        jax.config.update("jax_compilation_cache_dir", opts.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from tqdm import tqdm

    dev = common.device_info()
    stem = _out_stem(opts, dev["device_slug"])
    jsonl = stem.with_suffix(".jsonl")
    common.append_jsonl(jsonl, _meta(opts, dev, "running"))
    work = ([(impl, seq) for seq in opts.seq_lens for impl in opts.impls] if opts.memory else plan(opts))
    records: list[dict] = []
    pending: list[str] = []  # problem lines, written in one go per problem (one bar redraw)

    def on_record(rec: dict) -> None:
        records.append(rec)
        common.append_jsonl(jsonl, rec)
        if rec.get("status") != "ok":
            pending.append(f"  {rec['impl']} {rec.get('pass', 'memory')} {report.where(rec)}: {rec['status']} {(rec.get('message') or '')[:160]}")

    if opts.profile == "cpu":
        print(f"CPU smoke run (--allow-cpu): tiny shapes, interpret mode ({opts.suite} suite"
              f"{'; --quick is for a GPU, its shapes are not used' if opts.quick else ''})")
    print(f"{dev['device']}: {len(work)} {'points' if opts.memory else 'problems'} x {len(opts.impls)} impls"
          f"{'' if opts.memory else f' x {len(opts.passes)} passes'} -> {stem}.*", flush=True)
    status = "complete"
    tty = sys.stderr.isatty()  # sparse progress updates in captured logs
    progress = tqdm(total=len(work), unit="cfg", mininterval=0.5 if tty else 30.0, dynamic_ncols=tty, file=sys.stderr)
    key = jax.random.key(opts.seed)
    with common.sigterm_raises():
        try:
            for i, item in enumerate(work):
                if opts.time_budget is not None and time.monotonic() - start > opts.time_budget:
                    status = f"partial: time budget of {opts.time_budget:g} s reached, {len(work) - i} of {len(work)} not run"
                    break
                if opts.memory:
                    progress.set_postfix_str(f"memory {item[0]} N={item[1]}", refresh=False)
                    on_record(memory_record(opts, *item))
                else:
                    progress.set_postfix_str(report.where(item.fields()), refresh=False)
                    harness.bench_problem(item, opts.impls, opts, jax.random.fold_in(key, i), on_record)
                    jax.clear_caches()
                if pending:
                    progress.write("\n".join(pending))
                    pending.clear()
                progress.update(1)
        except (KeyboardInterrupt, common.Terminated) as e:
            status = f"partial: interrupted ({type(e).__name__} {e}) after {len(records)} records"
        finally:
            progress.close()
    meta = _meta(opts, dev, status)
    common.append_jsonl(jsonl, meta)
    paths = report.write_report(records, meta, stem, plots=opts.plots)
    print("\n" + report.summary_text(records, opts.impls, meta["speedups"]))
    print(f"\n{status}; {time.monotonic() - start:.0f} s. Wrote " + ", ".join(str(p) for p in [jsonl, *paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
