"""Masked-attention benchmark: packed documents, sliding windows, soft-cap.

Run from the repository root on a GPU machine (about 5 minutes on an H100)::

    PYTHONPATH=. python3 -m benchmarks.masks --out /tmp/masks

Problems (bf16, B·T = 16k tokens, 16 heads, D = 128, all causal):

* ``packed_docs_16k``: documents of random lengths 1k-4k packed into one 16k
  sequence (``q_segment_ids``/``kv_segment_ids``, causal within documents);
* ``window256_16k`` / ``window4k_16k``: causal with a left window of 256 / 4096
  keys (``local_window_size=(w, 0)``);
* ``causal_16k``: plain causal at 16k, the baseline of the window speed-up;
* ``softcap50_4k`` and ``causal_4k``: B = 4, T = 4k, ``logits_soft_cap=50``
  and the same call without it.

Implementations: ``pallas_flash`` (``pallas_flash.dot_product_attention``,
implementation ``"pallas"``) and ``jax.nn.dot_product_attention`` with
``implementation="xla"`` and ``"cudnn"`` given the equivalent arguments where
jax.nn has them: segment ids become a dense ``[B, 1, T, T]`` boolean mask
(built once, outside the timed function, as a user of jax.nn would), windows
are ``local_window_size``; jax.nn has no soft-cap (n/a). For packed documents
only, ``cudnn_packed`` is cuDNN's own packed layout (per-document sequence
lengths and offsets, causal within each), which jax.nn does not expose: it is
called through JAX's internal ``jax._src.cudnn.fused_attention_stablehlo``
(a private API: ERR if it changed). Out-of-memory shows as OOM, unsupported
as n/a.

Every output is first checked against a float32 reference
(``pallas_flash.reference.attention_reference``, one head at a time) and must
be within 2e-2 relative error, else the cell is FAIL and not timed. Timing is
``benchmarks.timing.time_fn`` (median of back-to-back jitted calls, input sets
rotated past the L2). TFLOP/s count only unmasked work: 4·B·N·D per visible
(query, key) pair forward, 3.5× that forward+backward, with the visible pairs
counted exactly from the problem's masks.

The markdown table is printed at the end and written with the raw records
(``masks.md``, ``masks.jsonl``) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import sys
import time
import zlib
from typing import Callable, Sequence

import numpy as np

from benchmarks.report import md_table

IMPLS = ("pallas_flash", "cudnn", "xla", "cudnn_packed")
PASSES = ("fwd", "fwd_bwd")
TOL = 2e-2  # bf16


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    window: int | None = None  # left window (causal)
    doc_lens: tuple[int, ...] | None = None  # packed documents (causal within each)
    soft_cap: float | None = None

    def visible_pairs(self) -> int:
        """Exact count of visible (query, key) pairs per (batch, head)."""
        t = self.seq
        if self.doc_lens is not None:
            return sum(n * (n + 1) // 2 for n in self.doc_lens)
        i = np.arange(t, dtype=np.int64)
        seen = i + 1
        if self.window is not None:
            seen = np.minimum(seen, self.window + 1)
        return int(seen.sum())

    def flops(self, pass_: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.visible_pairs() * self.head_dim
        return fwd if pass_ == "fwd" else 3.5 * fwd

    @property
    def dense_fraction(self) -> float:
        return self.visible_pairs() / (self.seq * self.seq)

    def describe(self) -> str:
        parts = [f"B={self.batch}", f"T={self.seq}", "causal"]
        if self.window is not None:
            parts.append(f"window ({self.window}, 0)")
        if self.doc_lens is not None:
            parts.append(f"{len(self.doc_lens)} docs {min(self.doc_lens)}-{max(self.doc_lens)}")
        if self.soft_cap is not None:
            parts.append(f"soft-cap {self.soft_cap:g}")
        return ", ".join(parts)


def packed_doc_lengths(total: int, lo: int, hi: int, seed: int = 0) -> tuple[int, ...]:
    """Random document lengths in [lo, hi] filling ``total`` exactly (the last one truncated, kept >= lo)."""
    rng = np.random.default_rng(seed)
    lens = []
    left = total
    while left > 0:
        n = int(rng.integers(lo, hi + 1))
        if left - n < lo:  # the remainder would be a too-short document: take it all
            n = left
        lens.append(min(n, left))
        left -= lens[-1]
    return tuple(lens)


def problems(smoke: bool = False) -> list[Problem]:
    if smoke:  # tiny sizes for a CPU smoke run (interpret mode)
        t, n, d = 256, 2, 32
        return [
            Problem("causal", 1, t, n, d),
            Problem("window16", 1, t, n, d, window=16),
            Problem("window64", 1, t, n, d, window=64),
            Problem("softcap50", 1, t, n, d, soft_cap=50.0),
            Problem("packed_docs", 1, t, n, d, doc_lens=packed_doc_lengths(t, 16, 64)),
        ]
    t = 16384
    return [
        Problem("causal_16k", 1, t, 16, 128),
        Problem("window256_16k", 1, t, 16, 128, window=256),
        Problem("window4k_16k", 1, t, 16, 128, window=4096),
        Problem("softcap50_4k", 4, 4096, 16, 128, soft_cap=50.0),
        Problem("causal_4k", 4, 4096, 16, 128),
        # Last: its cudnn_packed row goes through a private JAX API.
        Problem("packed_docs_16k", 1, t, 16, 128, doc_lens=packed_doc_lengths(t, 1024, 4096)),
    ]


# --- implementations --------------------------------------------------------


def segment_ids(p: Problem):
    ids = np.repeat(np.arange(len(p.doc_lens), dtype=np.int32), p.doc_lens)
    return np.broadcast_to(ids, (p.batch, p.seq))


def extra_args(p: Problem, impl: str) -> dict:
    """Array arguments (passed to the jitted function, not closed over) for one implementation."""
    import jax.numpy as jnp

    if p.doc_lens is None:
        return {}
    if impl == "cudnn_packed":
        seqlen, offsets = packed_lengths_offsets(p)
        return {"seqlen": seqlen, "offsets": offsets}
    ids = jnp.asarray(segment_ids(p))
    if impl == "pallas_flash":
        return {"q_segment_ids": ids, "kv_segment_ids": ids}
    return {"mask": ids[:, None, :, None] == ids[:, None, None, :]}  # jax.nn has no segment ids


def packed_lengths_offsets(p: Problem):
    """cuDNN's packed layout: per-document lengths ``[B, M]`` and offsets ``[B, M + 1]`` (int32)."""
    import jax.numpy as jnp

    lens = np.asarray(p.doc_lens, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return (
        jnp.asarray(np.broadcast_to(lens, (p.batch, lens.size))),
        jnp.asarray(np.broadcast_to(offsets, (p.batch, offsets.size))),
    )


def _build_cudnn_packed(p: Problem) -> Callable:
    import jax

    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")
    if p.doc_lens is None or p.soft_cap is not None or p.window is not None:
        raise NotImplementedError("cudnn_packed is run for packed documents only")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    scale = 1.0 / float(np.sqrt(p.head_dim))

    def f(q, k, v, extras):
        seqlen, offsets = extras["seqlen"], extras["offsets"]
        return cudnn_fa.dot_product_attention(
            q,
            k,
            v,
            q_seqlen=seqlen,
            kv_seqlen=seqlen,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=scale,
            mask_type=cudnn_fa.MaskType.PADDING_CAUSAL,
        )

    return f


def build(p: Problem, impl: str, interpret: bool | None) -> Callable:
    """``f(q, k, v, extras) -> out`` for one implementation; NotImplementedError where it has no equivalent."""
    import jax

    import pallas_flash

    window = None if p.window is None else (p.window, 0)
    if impl == "cudnn_packed":
        return _build_cudnn_packed(p)
    if impl == "pallas_flash":

        def f(q, k, v, extras):
            return pallas_flash.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                local_window_size=window,
                logits_soft_cap=p.soft_cap,
                implementation="pallas",
                interpret=interpret,
                **extras,
            )

        return f
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")
    if p.soft_cap is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no logits soft-cap")

    def g(q, k, v, extras):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, implementation=impl, **extras
        )

    return g


def reference(p: Problem, q, k, v):
    """float32 output of ``pallas_flash.reference.attention_reference``, one head at a time."""
    import jax
    import jax.numpy as jnp

    from pallas_flash.reference import attention_reference

    seg = None if p.doc_lens is None else jnp.asarray(segment_ids(p))

    @jax.jit
    def one_head(q, k, v):
        with jax.default_matmul_precision("highest"):
            return attention_reference(
                q.astype(jnp.float32),
                k.astype(jnp.float32),
                v.astype(jnp.float32),
                is_causal=True,
                local_window_size=None if p.window is None else (p.window, 0),
                q_segment_ids=seg,
                kv_segment_ids=seg,
                logits_soft_cap=p.soft_cap,
            )

    outs = [one_head(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1]) for h in range(p.heads)]
    return jnp.concatenate(outs, axis=2)


def rel_err(x, ref) -> float:
    import jax.numpy as jnp

    x = x.astype(jnp.float32)
    err = float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))
    return err if np.isfinite(err) else float("nan")


# --- running ----------------------------------------------------------------


def make_inputs(p: Problem, key, dtype):
    import jax

    shape = (p.batch, p.seq, p.heads, p.head_dim)
    return tuple(jax.random.normal(kk, shape, dtype) for kk in jax.random.split(key, 4))


def run_problem(p: Problem, impls: Sequence[str], opts, on_record: Callable[[dict], None]) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import classify_exception, free, num_input_sets, short_message, time_fn, tree_nbytes

    dtype = jnp.bfloat16
    key = jax.random.key(zlib.crc32(p.name.encode()))
    inputs = make_inputs(p, key, dtype)
    n_sets = num_input_sets(tree_nbytes(inputs))
    sets = [inputs] + [make_inputs(p, kk, dtype) for kk in jax.random.split(jax.random.fold_in(key, 1), n_sets - 1)]
    ref = reference(p, *inputs[:3])
    jax.block_until_ready(ref)

    for impl in impls:
        base = dict(problem=p.name, impl=impl, describe=p.describe(), dense_fraction=p.dense_fraction)
        try:
            f = build(p, impl, opts.interpret)
            extras = extra_args(p, impl)
        except Exception as e:  # noqa: BLE001 - every failure is a table cell
            if impl == "cudnn_packed" and p.doc_lens is None:
                continue  # only meant for packed documents: no row elsewhere
            for pass_ in opts.passes:
                on_record(dict(base, **{"pass": pass_}, status=classify_exception(e), message=short_message(e)))
            continue
        fwd = jax.jit(f)

        @jax.jit
        def fwd_bwd(q, k, v, g, extras, f=f):
            out, pullback = jax.vjp(lambda q, k, v: f(q, k, v, extras), q, k, v)
            return out, pullback(g)

        for pass_ in opts.passes:
            rec = dict(base, **{"pass": pass_}, flops=p.flops(pass_))
            fn = first = None
            try:
                t0 = time.perf_counter()
                if pass_ == "fwd":
                    fn, args = fwd, [(*s[:3], extras) for s in sets]
                    first = fn(*args[0])
                    out = first
                else:
                    fn, args = fwd_bwd, [(*s, extras) for s in sets]
                    first = fn(*args[0])
                    out = first[0]
                jax.block_until_ready(first)
                rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                err = rel_err(out, ref)
                rec["err"] = err
                if pass_ == "fwd_bwd":
                    grads_finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in first[1])
                    rec["grads_finite"] = grads_finite
                else:
                    grads_finite = True
                out = first = None
                if not (err < TOL) or not grads_finite:
                    rec["status"] = "FAIL"
                    on_record(rec)
                    continue
                t = time_fn(fn, args, min_time=opts.min_time, **opts.timing)
                rec.update(status="ok", time_s=t.median_s, tflops=rec["flops"] / t.median_s / 1e12, timing=t.as_dict())
            except Exception as e:  # noqa: BLE001
                rec.update(status=classify_exception(e), message=short_message(e))
            finally:
                fn = first = out = None
            on_record(rec)
        del fwd, fwd_bwd, extras
        gc.collect()
    free(sets)
    del sets, inputs, ref
    gc.collect()


def table(records: list[dict], probs: Sequence[Problem], impls: Sequence[str]) -> str:
    by = {(r["problem"], r["impl"], r["pass"]): r for r in records}

    def cell(r, what):
        if r is None:
            return "—"
        if r["status"] != "ok":
            return r["status"]
        if what == "ms":
            return f"{r['time_s'] * 1e3:.2f}"
        return f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3g}"

    rows = []
    for p in probs:
        for impl in impls:
            f, fb = by.get((p.name, impl, "fwd")), by.get((p.name, impl, "fwd_bwd"))
            if f is None and fb is None:
                continue
            err = next((r.get("err") for r in (f, fb) if r is not None and r.get("err") is not None), None)
            rows.append(
                [
                    p.name,
                    p.describe(),
                    f"{100 * p.dense_fraction:.2f}%",
                    impl,
                    cell(f, "ms"),
                    cell(f, "tf"),
                    cell(fb, "ms"),
                    cell(fb, "tf"),
                    "—" if err is None else f"{err:.1e}",
                ]
            )
    headers = ["problem", "setup", "visible", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "err"]
    return md_table(headers, rows, align="lllrrrrrr")


def speedup_line(records: list[dict], window: str, causal: str) -> str | None:
    by = {(r["problem"], r["impl"], r["pass"]): r for r in records}
    w, c = by.get((window, "pallas_flash", "fwd_bwd")), by.get((causal, "pallas_flash", "fwd_bwd"))
    if not (w and c and w["status"] == c["status"] == "ok"):
        return None
    ratio = c["time_s"] / w["time_s"]
    return (
        f"pallas_flash forward+backward, {window} vs {causal}: {w['time_s'] * 1e3:.2f} ms vs "
        f"{c['time_s'] * 1e3:.2f} ms = **{ratio:.1f}x faster** (target >= 8x)"
    )


def report_text(records, probs, impls, dev, opts, skipped, *, done: bool) -> str:
    lines = [
        f"# Masked attention: {dev.name}",
        "",
        f"jax {dev.jax_version}; bf16; "
        + ("tiny smoke shapes, interpret mode" if opts.smoke else "heads 16, D 128")
        + ("" if done else " (partial: run in progress)"),
        "",
        "TFLOP/s count only visible (unmasked) (query, key) pairs: 4·B·N·D per pair forward, "
        "3.5x forward+backward. err: output vs a float32 reference (FAIL above 2e-2; "
        "gradients must be finite). OOM / n/a / ERR: out of memory / no equivalent argument / other error.",
        "",
        table(records, probs, impls),
    ]
    names = [p.name for p in probs]
    for w, c in (("window256_16k", "causal_16k"), ("window16", "causal")):
        if w in names and c in names:
            line = speedup_line(records, w, c)
            if line:
                lines += ["", line]
    if skipped:
        lines += ["", f"Skipped (time budget {opts.time_budget:.0f} s): {', '.join(skipped)}"]
    notes = {}
    for r in records:  # one line per (problem, impl, message)
        if r["status"] != "ok" and r.get("message"):
            notes.setdefault((r["problem"], r["impl"], r["message"]), []).append(r["pass"])
    if notes:
        lines += ["", "Not run / failed:", ""]
        lines += [f"- {prob} {impl} ({', '.join(passes)}): {msg}" for (prob, impl, msg), passes in notes.items()]
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path | None, text: str, records: list[dict]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "masks.md").write_text(text)
    with open(out / "masks.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r, default=str) + "\n")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=None, help="directory for masks.md and masks.jsonl")
    ap.add_argument("--problems", default=None, help="comma-separated problem names, run in that order (default: all)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timing samples per function")
    ap.add_argument("--time-budget", type=float, default=420.0, help="skip the remaining problems after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny problems in interpret mode (a CPU check of this script)")
    opts = ap.parse_args(argv)
    opts.passes = PASSES
    opts.interpret = True if opts.smoke else None
    opts.timing = dict(warmup=0, min_samples=1, max_samples=2, max_inner=1) if opts.smoke else {}
    if opts.smoke:
        opts.min_time = 0.0
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax

    from benchmarks.timing import device_info

    if jax.default_backend() != "gpu" and not opts.smoke:
        print("benchmarks.masks needs a GPU (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    impls = [i.strip() for i in opts.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {IMPLS}")
    probs = problems(opts.smoke)
    if opts.problems:
        wanted = [w.strip() for w in opts.problems.split(",")]
        unknown = set(wanted) - {p.name for p in probs}
        if unknown:
            raise SystemExit(f"unknown problems {sorted(unknown)}; choose from {[p.name for p in probs]}")
        by_name = {p.name: p for p in probs}
        probs = [by_name[w] for w in dict.fromkeys(wanted)]  # in the order asked for

    dev = device_info()
    print(f"device: {dev.name} x{dev.count}, jax {dev.jax_version}", flush=True)
    records: list[dict] = []

    def on_record(rec):
        records.append(rec)
        shown = {k: rec.get(k) for k in ("problem", "impl", "pass", "status", "err", "time_s", "tflops", "message") if k in rec}
        print(json.dumps(shown), flush=True)

    start = time.perf_counter()
    skipped = []
    text = ""
    for p in probs:
        if time.perf_counter() - start > opts.time_budget:
            skipped.append(p.name)
            continue
        print(f"== {p.name}: {p.describe()}, visible {100 * p.dense_fraction:.2f}% of T^2", flush=True)
        run_problem(p, impls, opts, on_record)
        text = report_text(records, probs, impls, dev, opts, skipped, done=False)
        write(opts.out, text, records)  # a partial report survives a crash in a later problem
    text = report_text(records, probs, impls, dev, opts, skipped, done=True)
    write(opts.out, text, records)
    print()
    print(text)
    if opts.out is not None:
        print(f"wrote {opts.out / 'masks.md'} and {opts.out / 'masks.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
