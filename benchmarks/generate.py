"""GPT-2 generation speed with and without the KV cache: ``python -m benchmarks.generate``.

GPT-2 124M (``models.gpt2`` preset ``gpt2``, random weights), bf16 compute and
bf16 weights, greedy decoding of a 1k-token prompt into 1k new tokens, batch 1
and 32, three ways (``models.gpt2.generate``):

* ``no cache``: the path from before the cache (``use_cache=False``): every new
  token reruns the model over the whole ``block_size`` window (flash kernel,
  ``implementation="pallas"``) and computes logits at every position;
* ``cache + pallas``: the prompt prefilled with the flash kernel, then one
  jitted ``lax.fori_loop`` step per token whose attention reads the KV cache
  with ``decode_attention(implementation="pallas")`` (the split-K kernel);
* ``cache + xla``: the same with ``decode_attention(implementation="xla")``
  (plain ``jax.numpy`` over the cache).

``block_size`` is raised to 2048 (``get_config("gpt2", block_size=2048)``): 1k
prompt + 1k new tokens need 2048 learned positions, and GPT-2's own table has
1024. The no-cache path always runs the same fixed 2048-token window, so every
one of its steps costs the same; it is timed over ``--no-cache-tokens`` new
tokens (default 64) and its tokens/s holds for any number of new tokens. The
cached paths are timed over all the new tokens, prefill included: tokens/s =
batch x new tokens / seconds per ``generate`` call, the median of ``--samples``
calls after one compiling call (``pallas_flash.tuning.timer.time_fn``). Each
row runs in a fresh process (``benchmarks.common.run_worker``), so the peak
memory (``peak_bytes_in_use``) is its own. "same tokens" compares each cached
row's greedy tokens with the no-cache row's over the tokens both made (bf16
rounding can flip a near-tie, after which the texts differ).

Writes ``benchmarks/results/<device>/generate-<date>.md`` and ``.jsonl``. Run
from the repository root::

    PYTHONPATH=. python3 -m benchmarks.generate           # the full table (GPU)
    PYTHONPATH=. python3 -m benchmarks.generate --quick   # GPU: 128 new tokens; CPU: a tiny model smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time
from typing import Any

import pandas as pd

from benchmarks import common

PATHS = ("no_cache", "cache_pallas", "cache_xla")
LABEL = {"no_cache": "no cache", "cache_pallas": "cache + pallas", "cache_xla": "cache + xla"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One subprocess: one generation path at one batch size."""

    path: str
    batch: int
    prompt_len: int
    new_tokens: int  # timed new tokens
    model: str = "gpt2"
    block_size: int = 2048
    samples: int = 3
    seed: int = 0


def plan(quick: bool, on_gpu: bool, paths=PATHS, batches=None, *, no_cache_tokens: int = 64,
         samples: int | None = None) -> list[RunSpec]:
    """The rows, in run order: per batch (default 1 and 32; CPU 1 and 2), each path."""
    if not on_gpu:  # a smoke run of the script: the tiny model, a few tokens
        prompt, new, nc_new, model, block, default_samples = 16, 8, 4, "tiny", 64, 1
        batches = batches or (1, 2)
    else:
        prompt, new, model, block = 1024, 128 if quick else 1024, "gpt2", 2048
        nc_new, default_samples = min(no_cache_tokens, 16 if quick else no_cache_tokens), 1 if quick else 3
    n = default_samples if samples is None else samples
    batches = batches or (1, 32)
    return [RunSpec(p, b, prompt, nc_new if p == "no_cache" else new, model, block, n)
            for b in batches for p in paths]


# ---------------------------------------------------------------- worker side


def _worker(spec_dict: dict) -> dict[str, Any]:
    """Generate ``spec`` in this process; the timing (``{"probe": true}``: the device alone)."""
    import jax
    import numpy as np
    from flax import nnx

    from models import gpt2
    from pallas_flash.tuning.timer import time_fn

    info = common.device_info()
    if spec_dict.get("probe"):
        return info
    s = RunSpec(**spec_dict)
    cfg = gpt2.get_config(s.model, block_size=s.block_size, attention="pallas", dtype="bfloat16",
                          param_dtype="bfloat16")
    model = gpt2.GPT(cfg, rngs=nnx.Rngs(s.seed))
    prompt = jax.random.randint(jax.random.key(s.seed + 1), (s.batch, s.prompt_len), 0, cfg.vocab_size)
    options = dict(temperature=0.0, use_cache=s.path != "no_cache",
                   decode_implementation="xla" if s.path == "cache_xla" else "pallas")

    def call(prompt):
        return gpt2.generate(model, prompt, s.new_tokens, **options)

    t0 = time.perf_counter()
    tokens = np.asarray(jax.block_until_ready(call(prompt)))  # compiles, then runs once
    compile_s = time.perf_counter() - t0
    # One call per sample and a fixed number of samples: no estimate of a call's cost is needed (one call, unused).
    timing = time_fn(call, [(prompt,)], warmup=0, min_time=0.0, min_samples=s.samples, max_samples=s.samples,
                     target_sample_s=0.0, estimate_calls=1)
    dev = jax.devices()[0]
    return dict(info, compile_s=compile_s, timing=timing.as_dict(), seconds=timing.median_s,
                tokens_per_s=s.batch * s.new_tokens / timing.median_s,
                peak_bytes=(dev.memory_stats() or {}).get("peak_bytes_in_use"),
                new_tokens=tokens[:, s.prompt_len:].tolist())


# ---------------------------------------------------------------- parent side


def same_tokens(a: list[list[int]], b: list[list[int]]) -> str:
    """Sequences whose tokens agree over the length both made, as ``"k/n"``."""
    n = min(len(a[0]), len(b[0]))
    return f"{sum(x[:n] == y[:n] for x, y in zip(a, b))}/{len(a)}"


def records(specs: list[RunSpec], results: list[dict]) -> list[dict]:
    """One flat record per row, with the speed-ups against ``no cache`` and ``cache + xla`` at its batch."""
    by = {(s.batch, s.path): r for s, r in zip(specs, results) if r.get("ok")}
    out = []
    for s, r in zip(specs, results):
        rec = dict(kind="generate", **dataclasses.asdict(s), ok=bool(r.get("ok")))
        if not r.get("ok"):
            out.append(dict(rec, status=r.get("status", "ERR"), error=r.get("error")))
            continue
        rec.update(status="ok", tokens_per_s=r["tokens_per_s"], seconds=r["seconds"], compile_s=r["compile_s"],
                   peak_bytes=r["peak_bytes"], iqr_rel=r["timing"]["iqr_rel"])
        for name, path in (("vs_no_cache", "no_cache"), ("vs_xla", "cache_xla")):
            ref = by.get((s.batch, path))
            rec[name] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        ref = by.get((s.batch, "no_cache"))
        rec["same_tokens"] = same_tokens(r["new_tokens"], ref["new_tokens"]) if ref and s.path != "no_cache" else None
        out.append(rec)
    return out


def _table(recs: list[dict]) -> list[str]:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    rows = []
    for r in recs:
        row = {"batch": str(r["batch"]), "path": LABEL[r["path"]], "new tokens timed": str(r["new_tokens"])}
        if r["status"] != "ok":
            rows.append(dict(row, **{"tokens/s": f"{r['status']}: {(r.get('error') or '').replace('|', '/')}"}))
            continue
        rows.append(dict(row, **{
            "tokens/s": f"{r['tokens_per_s']:,.0f}", "ms per step": f"{1e3 * r['seconds'] / r['new_tokens']:.2f}",
            "vs no cache": ratio(r["vs_no_cache"]), "vs cache + xla": ratio(r["vs_xla"]),
            "same tokens": r["same_tokens"] or "-", "spread": f"{100 * r['iqr_rel']:.1f}%",
            "peak memory (GiB)": "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}",
            "compile + 1st call (s)": f"{r['compile_s']:.1f}"}))
    df = pd.DataFrame([{k: row.get(k, "") for k in max(rows, key=len)} for row in rows])
    align = ["left" if c == "path" else "right" for c in df.columns]
    return df.to_markdown(index=False, disable_numparse=True, colalign=align).splitlines()


def render_markdown(info: dict, specs: list[RunSpec], recs: list[dict], quick: bool) -> str:
    s = specs[0]
    lines = [
        f"# GPT-2 generation with the KV cache{' (quick run)' if quick else ''}", "",
        f"- device: {info['device']} ({info['platform']}), JAX {info['jax_version']}, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- model: `{s.model}` preset with block_size={s.block_size}, random weights, bf16 compute and weights; "
        f"greedy; prompt {s.prompt_len} tokens; `models.gpt2.generate`",
        "- tokens/s = batch x new tokens / seconds per `generate` call (prefill included), median of "
        f"{s.samples} call(s) after a compiling one; ms per step = seconds / new tokens; the no-cache path runs a fixed {s.block_size}-token window per "
        "step, so its per-token cost does not depend on how many tokens are timed",
        "- same tokens: sequences whose greedy tokens equal the no-cache row's over the tokens both made", ""]
    return "\n".join(lines + _table(recs)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="GPU: 128 new tokens, one timed call; CPU: tiny model")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; CPU 1,2)")
    p.add_argument("--no-cache-tokens", type=int, default=64, help="new tokens timed on the no-cache path (GPU)")
    p.add_argument("--samples", type=int, default=None, help="timed calls per row (default 3; --quick 1)")
    p.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS_DIR,
                   help="results root; files go to <out-dir>/<device-slug>/ (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per subprocess")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(_worker, args.worker)

    paths = tuple(x.strip() for x in args.paths.split(",") if x.strip())
    if not paths or any(x not in PATHS for x in paths):
        p.error(f"--paths takes a comma-separated subset of {PATHS}, got {args.paths!r}")
    try:
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    except ValueError:
        p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches or ()) or args.no_cache_tokens < 1 or (args.samples is not None and args.samples < 1):
        p.error("--batches, --no-cache-tokens and --samples take positive numbers")

    t_start = time.perf_counter()
    probed = common.probe_platform("benchmarks.generate", measures="GPU generation speed", smoke_flag="--quick",
                                   allow_cpu=args.quick)
    if probed is None:
        return 2
    info, on_gpu = probed
    specs = plan(args.quick, on_gpu, paths, batches, no_cache_tokens=args.no_cache_tokens, samples=args.samples)
    print(f"device: {info['device']}; {len(specs)} runs", flush=True)
    results = []
    for s in specs:
        t0 = time.perf_counter()
        r = common.run_worker("benchmarks.generate", dataclasses.asdict(s), args.timeout)
        results.append(r)
        what = f"{r['tokens_per_s']:,.0f} tokens/s, compile {r['compile_s']:.0f}s" if r.get("ok") else r["error"]
        print(f"  B={s.batch} {LABEL[s.path]}: {what} [{time.perf_counter() - t0:.0f}s]", flush=True)

    recs = records(specs, results)
    md = render_markdown(info, specs, recs, args.quick)
    folder = args.out_dir / info["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = common.unique_stem(folder, f"generate-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else ""))
    stem.with_suffix(".md").write_text(md)
    for rec in [dict(info, kind="meta", git=common.git_commit())] + recs:
        common.append_jsonl(stem.with_suffix(".jsonl"), rec)
    print("\n" + md)
    print(f"wrote {stem}.md, .jsonl in {time.perf_counter() - t_start:.0f}s")
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
