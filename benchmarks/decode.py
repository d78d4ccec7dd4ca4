"""Decode benchmark: ``pallas_flash.decode_attention`` against cuDNN and XLA over a KV cache.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python3 -m benchmarks.decode            # B 1,8,32 x 1k..128k cached tokens
    PYTHONPATH=. python3 -m benchmarks.decode --quick    # B 1,8 x 8k,32k, shorter timing
    PYTHONPATH=. python3 -m benchmarks.decode --sweep    # the split kernel's launch variants at a few points

One new token per sequence (Tq = 1), 32 query heads over 8 KV heads, D = 128,
bf16, every sequence holding the whole cache. Each implementation is checked
against the ``"xla"`` path's output on the same inputs (float32 accumulation;
cuDNN's where that fails; the reference itself and a cell with no reference are
marked ``*``, not checked), then timed with ``pallas_flash.tuning.timer.time_fn``
(inputs rotated over enough sets that K/V are not L2-resident). Columns: ms,
TB/s of the bytes moved (K and V read, 2·B·tokens·K·D·2, plus q read and the
output written, 2·B·N·D·2: ``point_bytes``) over the time, and the ratio of
cuDNN's time to each one's. Results: ``benchmarks/results/<device>/<date>-decode[-tag].{md,jsonl}``.

``--layers L`` times one decode step of an L-layer model instead: one jitted
call runs the attention over L distinct caches (one per layer) and the time
per layer is reported. A lone call of a small decode is bound by JAX's
per-call dispatch (~50 us on the GPU machine, the same for every
implementation); inside one executable, as in a model's decode step or
``models.generate``'s loop, only the kernels remain.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks import common

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, "bfloat16"
TOLERANCE = 2e-2
FULL = dict(batches=(1, 8, 32), tokens=(1024, 8192, 32768, 131072), min_time=0.3)
QUICK = dict(batches=(1, 8), tokens=(8192, 32768), min_time=0.15)
SWEEP_POINTS = ((1, 131072), (8, 131072))
# (block_k, num_warps, num_stages, programs_per_sm, merge): the first is the shipped DecodeConfig.
SWEEP_VARIANTS = (
    (64, 4, 4, 8, "pallas"), (64, 4, 3, 4, "pallas"), (64, 4, 4, 4, "pallas"), (64, 4, 3, 8, "pallas"),
)
DEFAULT_IMPLS = ("pallas_flash", "pallas_flash_paged", "cudnn", "xla")
BASELINE = "cudnn"
LAYER_BYTES = 32 << 30  # --layers: at most this many bytes of K/V caches in one step


def point_bytes(batch: int, tokens: int) -> tuple[int, int]:
    """``(kv_bytes, bytes)`` of one decode call: the K and V caches read at their full length (every sequence
    holds ``tokens``), and those plus the query read and the output written (the TB/s columns' bytes)."""
    import jax.numpy as jnp

    itemsize = jnp.dtype(DTYPE).itemsize
    kv = 2 * batch * tokens * KV_HEADS * HEAD_DIM * itemsize
    return kv, kv + 2 * batch * HEADS * HEAD_DIM * itemsize


def _decode(**kw) -> Callable:
    from pallas_flash.decode import decode_attention

    def f(q, k, v, lengths, kp, vp, tables):
        if "paged" in kw:
            kw2 = dict(kw)
            del kw2["paged"]
            return decode_attention(q, kp, vp, lengths, block_tables=tables, **kw2)
        return decode_attention(q, k, v, lengths, **kw)

    return f


def _cudnn() -> Callable:
    import jax

    def f(q, k, v, lengths, kp, vp, tables):  # GQA natively (K/V heads divide the query heads)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")

    return f


def _training_kernel() -> Callable:
    import pallas_flash

    def f(q, k, v, lengths, kp, vp, tables):
        return pallas_flash.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="pallas")

    return f


def _variant(block_k, warps, stages, pps, merge) -> Callable:
    from pallas_flash.backends.triton import decode as triton_decode
    from pallas_flash.decode import decode_spec

    config = triton_decode.DecodeConfig(block_k=block_k, num_warps=warps, num_stages=stages, programs_per_sm=pps)

    def f(q, k, v, lengths, kp, vp, tables):
        spec = decode_spec(q, k, v, lengths, None, scale=None, logits_soft_cap=None, local_window_size=None)
        return triton_decode.decode(spec, q, k, v, lengths, None, num_splits=None, interpret=False, config=config,
                                    merge=merge)

    return f


IMPLS: dict[str, tuple[Callable[[], Callable], str]] = {
    "pallas_flash": (lambda: _decode(), "pallas_flash.decode_attention, contiguous cache [B, S, K, D]"),
    "pallas_flash_paged": (lambda: _decode(paged=True), "pallas_flash.decode_attention, paged cache (shuffled pages)"),
    "cudnn": (_cudnn, "jax.nn.dot_product_attention(implementation='cudnn', key_value_seq_lengths=...), GQA native"),
    "xla": (lambda: _decode(implementation="xla"), "pallas_flash.decode_attention(implementation='xla')"),
    "pallas_flash_train": (_training_kernel, "pallas_flash.dot_product_attention (the training kernel)"),
}


def variant_name(v) -> str:
    block_k, warps, stages, pps, merge = v
    return f"bk{block_k} w{warps} s{stages} pps{pps}" + ("" if merge == "pallas" else f" merge-{merge}")


def make_sets(batch: int, tokens: int, page_size: int, n_sets: int, seed: int, paged: bool):
    """``n_sets`` input tuples ``(q, k, v, lengths, k_pages, v_pages, tables)``: the paged pool holds the same K/V."""
    import jax
    import jax.numpy as jnp

    sets = []
    for i in range(n_sets):
        kq, kk, kv, kp = jax.random.split(jax.random.key(seed * 1000 + i), 4)
        q = jax.random.normal(kq, (batch, 1, HEADS, HEAD_DIM), DTYPE)
        k = jax.random.normal(kk, (batch, tokens, KV_HEADS, HEAD_DIM), DTYPE)
        v = jax.random.normal(kv, (batch, tokens, KV_HEADS, HEAD_DIM), DTYPE)
        lengths = jnp.full((batch,), tokens, jnp.int32)
        k_pages = v_pages = tables = None
        if paged:
            pages = batch * tokens // page_size
            perm = jax.random.permutation(kp, pages).astype(jnp.int32)  # logical page j lives at perm[j]
            inverse = jnp.argsort(perm)
            k_pages = k.reshape(pages, page_size, KV_HEADS, HEAD_DIM)[inverse]
            v_pages = v.reshape(pages, page_size, KV_HEADS, HEAD_DIM)[inverse]
            tables = perm.reshape(batch, tokens // page_size)
        sets.append((q, k, v, lengths, k_pages, v_pages, tables))
    return sets


def bench_point(batch: int, tokens: int, impls: dict[str, Callable], opts, on_record) -> None:
    import jax

    from pallas_flash.testing.errors import rel_err
    from pallas_flash.tuning.timer import num_input_sets, time_fn

    kv_bytes, io_bytes = point_bytes(batch, tokens)
    n_sets = num_input_sets(kv_bytes, max_sets=opts.max_sets)
    layers = 1
    if opts.layers > 1:  # one set per layer, within LAYER_BYTES of caches (at least 2 layers)
        layers = n_sets = max(2, min(opts.layers, LAYER_BYTES // max(kv_bytes, 1)))
    base = dict(kind="decode", batch=batch, tokens=tokens, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                dtype="bf16", page_size=opts.page_size, kv_bytes=kv_bytes, bytes=io_bytes, input_sets=n_sets,
                layers=layers)
    try:
        sets = make_sets(batch, tokens, opts.page_size, n_sets, opts.seed, paged=any("paged" in n for n in impls))
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: every cell of the point says so
        for name in impls:
            on_record(dict(base, impl=name, status=common.classify_exception(e), message=common.short_message(e)))
        return
    fns = {name: jax.jit(build) for name, build in impls.items()}
    ref, ref_name = None, None
    for name in ("xla", "cudnn"):  # the reference: the first that runs
        try:
            fn = fns.get(name) or jax.jit(IMPLS[name][0]())
            ref, ref_name = jax.block_until_ready(fn(*sets[0])), name
            break
        except Exception:  # noqa: BLE001 - next reference
            continue
    for name, fn in fns.items():
        rec = dict(base, impl=name)
        try:
            out = jax.block_until_ready(fn(*sets[0]))  # compiles
            if name == ref_name:  # its own output is the reference: not a check
                err = None
                rec.update(err=None, ref=None, reference=True)
            else:
                err = rel_err(out, ref) if ref is not None else None
                rec.update(err=err, ref=ref_name if ref is not None else None)
            if err is not None and not err < TOLERANCE:
                on_record(dict(rec, status="FAIL"))
                continue
            del out
            if layers > 1:  # every layer's attention in one executable; the time per layer
                step = jax.jit(lambda all_sets, f=impls[name]: [f(*one) for one in all_sets])
                t = time_fn(step, [(sets,)], min_time=opts.min_time)
                per_layer = t.median_s / layers
            else:
                t = time_fn(fn, sets, min_time=opts.min_time)
                per_layer = t.median_s
            rec.update(status="ok", time_s=per_layer, iqr_rel=t.iqr_rel, kv_tbps=kv_bytes / per_layer / 1e12,
                       tbps=io_bytes / per_layer / 1e12)
        except Exception as e:  # noqa: BLE001 - recorded as a status
            rec.update(status=common.classify_exception(e), message=common.short_message(e))
        on_record(rec)
    del sets, ref
    gc.collect()


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def table(records: Sequence[dict], impls: Sequence[str]):
    """One row per (B, tokens): ms and TB/s per implementation (``*``: not checked against a reference), and
    cuDNN's time over each one's."""
    import pandas as pd

    rows = {}
    for r in records:
        row = rows.setdefault((r["batch"], r["tokens"]), {"B": r["batch"], "tokens": _tokens(r["tokens"])})
        ok = r["status"] == "ok"
        row[f"{r['impl']} ms"] = f"{r['time_s'] * 1e3:.4g}" if ok else r["status"]
        tbps = r.get("tbps", r.get("kv_tbps"))  # records before ``tbps``: K/V bytes alone
        row[f"{r['impl']} TB/s"] = f"{tbps:.2f}" + ("*" if r.get("err") is None else "") if ok else r["status"]
        row[f"_{r['impl']}"] = r["time_s"] if ok else np.nan
    frame = pd.DataFrame([rows[k] for k in sorted(rows)])
    columns = ["B", "tokens"] + [f"{i} {c}" for i in impls for c in ("ms", "TB/s") if f"{i} ms" in frame]
    out = frame.reindex(columns=columns).fillna("—")
    if f"_{BASELINE}" in frame:
        for i in (i for i in impls if i != BASELINE and f"_{i}" in frame):
            out[f"{i} vs cuDNN"] = (frame[f"_{BASELINE}"] / frame[f"_{i}"]).map(lambda x: "—" if np.isnan(x) else f"{x:.2f}x")
    return out


def write_report(records, meta, stem, impls) -> str:
    notes = "\n".join(f"- `{i}`: {IMPLS[i][1] if i in IMPLS else 'split kernel variant ' + i}" for i in impls)
    problems = [f"- {r['impl']} B={r['batch']} tokens={r['tokens']}: {r['status']} {r.get('message', '')} "
                f"(err {r.get('err')})" for r in records if r["status"] != "ok"]
    problems += [f"- B={b} tokens={_tokens(t)}: not run, the time budget of {meta['time_budget']:g} s was reached"
                 for b, t in meta.get("skipped", ())]
    text = (f"# Decode attention, {meta['device']}\n\n{meta['date']}; `{meta['command']}`; commit {meta['commit']}; "
            f"jax {meta['jax_version']}; {meta.get('status', 'complete')}.\n\n"
            f"Tq = 1 new token per sequence, {HEADS} query heads over {KV_HEADS} KV heads, D = {HEAD_DIM}, bf16, every "
            f"sequence holding `tokens` cached tokens (kv_lengths = tokens); paged: page_size {meta['page_size']}, "
            "pages shuffled. Each cell checked against the 'xla' path's output (cuDNN's where that fails; relative "
            f"error below {TOLERANCE:g}), then timed (`pallas_flash.tuning.timer.time_fn`, median, inputs rotated so "
            "K/V are not L2-resident). TB/s = bytes moved (K and V read, 2·B·tokens·K·D·2, plus q read and the "
            "output written, 2·B·N·D·2) / time; `*`: not checked (the reference itself, or no reference ran); "
            "`vs cuDNN` = cuDNN's time / this one's (above 1: faster than cuDNN)."
            + (f" Timed as one decode step of up to {meta['layers']} layers (distinct caches) in one jitted call, per "
               "layer (column `layers` of the .jsonl: fewer where the caches would pass 32 GiB)." if meta.get("layers", 1) > 1 else "")
            + "\n\n" + notes + "\n\n"
            + table(records, impls).to_markdown(index=False, tablefmt="pipe", disable_numparse=True) + "\n")
    if problems:
        text += "\nNot ok:\n\n" + "\n".join(problems) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0],
                                formatter_class=common.DefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B 1,8 x tokens 8k,32k, 0.15 s of samples per cell")
    p.add_argument("--sweep", action="store_true", help="the split kernel's launch variants and cuDNN at its own "
                   "points (B 1,8 x 128k tokens): not with --batches, --tokens, --impls, --page-size")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--tokens", help="comma-separated cached tokens per sequence, e.g. 1k,8k (default 1k,8k,32k,128k)")
    p.add_argument("--impls", help=f"comma-separated from {','.join(IMPLS)} (default {','.join(DEFAULT_IMPLS)})")
    p.add_argument("--page-size", type=int, help="tokens per page of the paged cache, a multiple of 16 (default 64)")
    p.add_argument("--min-time", type=float, help="seconds of timed samples per cell (default 0.3, --quick 0.15)")
    p.add_argument("--max-sets", type=int, default=24, help="most input sets rotated over (small caches)")
    p.add_argument("--layers", type=int, default=1,
                   help="time one decode step of this many layers (distinct caches) in one jitted call; per-layer time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="start no new point after this many seconds (the points not run "
                   "are listed in the .md and the .jsonl's last meta line)")
    p.add_argument("--out", help="output directory (default benchmarks/results/<device>)")
    p.add_argument("--tag", help="file name suffix: <date>-decode-<tag>")
    a = p.parse_args(list(argv))
    if a.sweep:  # its points and impls are its own: a flag choosing others would be ignored
        given = [f for f in ("batches", "tokens", "impls", "page_size") if getattr(a, f) is not None]
        if given:
            p.error(f"--sweep times its own points and implementations; drop "
                    f"{', '.join('--' + f.replace('_', '-') for f in given)} (or run without --sweep)")
    d = QUICK if a.quick else FULL
    try:
        tok = lambda t: int(t[:-1]) * 1024 if t.lower().endswith("k") else int(t)
        a.batches = tuple(int(b) for b in a.batches.split(",")) if a.batches else d["batches"]
        a.tokens = tuple(tok(t) for t in a.tokens.split(",")) if a.tokens else d["tokens"]
    except ValueError:
        p.error("--batches and --tokens take comma-separated integers (tokens may end in k)")
    if min(a.batches) < 1 or min(a.tokens) < 1:
        p.error(f"--batches and --tokens must be positive, got {a.batches} and {a.tokens}")
    a.impls = tuple(a.impls.split(",")) if a.impls else DEFAULT_IMPLS
    for i in a.impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown {i!r}; choose from {', '.join(IMPLS)}")
    a.page_size = a.page_size if a.page_size is not None else 64
    if a.page_size < 16 or a.page_size % 16 or any(t % a.page_size for t in a.tokens):
        p.error(f"--page-size must be a positive multiple of 16 dividing every --tokens value, got {a.page_size}")
    if a.time_budget is not None and not a.time_budget > 0:
        p.error(f"--time-budget must be positive, got {a.time_budget:g}")
    a.min_time = a.min_time if a.min_time is not None else d["min_time"]
    a.argv = tuple(argv)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    import pathlib

    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    import jax

    if jax.default_backend() != "gpu":
        print("benchmarks.decode needs an NVIDIA GPU", file=sys.stderr)
        return 2
    if opts.sweep:
        impls = {BASELINE: IMPLS[BASELINE][0]()} | {variant_name(v): _variant(*v) for v in SWEEP_VARIANTS}
        points = SWEEP_POINTS
    else:
        impls = {i: IMPLS[i][0]() for i in opts.impls}
        points = [(b, t) for b in opts.batches for t in opts.tokens]
    dev = common.device_info()
    out_dir = pathlib.Path(opts.out) if opts.out else common.RESULTS_DIR / dev["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "decode" + ("-sweep" if opts.sweep else "") + (f"-{opts.layers}layers" if opts.layers > 1 else "") + (f"-{opts.tag}" if opts.tag else "")
    stem = common.unique_stem(out_dir, f"{datetime.date.today().isoformat()}-{tag}")
    meta = dict(kind="meta", **dev, date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                command="PYTHONPATH=. python3 -m benchmarks.decode " + shlex.join(opts.argv), commit=common.git_commit(),
                page_size=opts.page_size, layers=opts.layers, time_budget=opts.time_budget, status="running")
    common.append_jsonl(stem.with_suffix(".jsonl"), meta)
    records: list[dict] = []

    def on_record(rec):
        records.append(rec)
        common.append_jsonl(stem.with_suffix(".jsonl"), rec)
        tbps = rec.get("tbps", rec.get("kv_tbps"))
        ms = f"{rec['time_s'] * 1e3:.4g} ms {tbps:.2f} TB/s" if rec["status"] == "ok" else rec["status"]
        print(f"B={rec['batch']:>3} tokens={rec['tokens']:>6} {rec['impl']:<28} {ms} err={rec.get('err')}", flush=True)

    skipped = []
    for batch, tokens in points:
        if opts.time_budget is not None and time.monotonic() - start > opts.time_budget:
            print(f"time budget reached; skipping B={batch} tokens={tokens}")
            skipped.append((batch, tokens))
            continue
        bench_point(batch, tokens, impls, opts, on_record)
        jax.clear_caches()
    status = (f"partial: time budget of {opts.time_budget:g} s reached, {len(skipped)} of {len(points)} points not run"
              if skipped else "complete")
    meta = dict(meta, status=status, skipped=skipped)  # the last meta line: how the run ended
    common.append_jsonl(stem.with_suffix(".jsonl"), meta)
    print("\n" + write_report(records, meta, stem, list(impls)))
    print(f"{time.monotonic() - start:.0f} s; wrote {stem}.md, .jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
