"""``python -m benchmarks.sharding``: attention sharded over batch or heads on every local GPU, against one GPU's share.

Run from the repository root on a machine with one or more GPUs::

    PYTHONPATH=. python3 -m benchmarks.sharding          # B=8, T=4k, 16 heads, D=128, causal, bf16 (issue #13)
    PYTHONPATH=. python3 -m benchmarks.sharding --devices 2 --impls pallas_flash --only fwd_bwd
    PYTHONPATH=. python3 -m benchmarks.sharding --allow-cpu   # smoke run: 4 host devices, tiny shape, interpret mode

For each implementation (``pallas_flash``: the Pallas kernels; ``cudnn``:
``jax.nn.dot_product_attention(implementation="cudnn")``), each split
(``batch``, ``heads``) and each pass (``fwd``, ``fwd_bwd``):

- **sharded**: ``jax.jit`` of the call with q, k, v and the output cotangent
  sharded on the split's dim over a 1-D mesh of the ``n`` devices; the
  collectives in its compiled HLO are counted (all-gather, all-reduce,
  all-to-all, collective-permute, reduce-scatter);
- **alone**: the same call on one device with that device's share alone
  (batch ``B/n``, or ``N/n`` query and ``K/n`` KV heads);
- **ratio** = sharded / alone: 1.0 is perfect scaling (the issue asks <= 1.05
  with no collectives).

Before timing, the sharded result's first shard is compared with the alone
result on the same slice (relative error, output and gradients). Timing is
``pallas_flash.tuning.timer.time_fn`` (median of back-to-back samples, inputs
rotated to defeat L2). Results go to
``benchmarks/results/<device>/<date>-sharding{-n}dev.{md,jsonl}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import shlex
import sys
import time
import warnings
from typing import Sequence

from benchmarks import common

IMPLS = ("pallas_flash", "cudnn")
SPLITS = ("batch", "heads")
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 5e-3}  # sharded vs alone: the same kernels, so far below these
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
CPU_DEVICES = 4
SMOKE_TIMING = dict(min_samples=2, max_samples=3, max_inner=1)


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in compiled HLO text, by kind (an async pair counts once, at its ``-start``)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _COLLECTIVE_RE.finditer(hlo):
        counts[m.group(1)] += 1
    return {k: v for k, v in counts.items() if v}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", default="4k", help="T (queries and keys), e.g. 4096 or 4k")
    p.add_argument("--heads", type=int, default=16, help="query heads N")
    p.add_argument("--kv-heads", type=int, help="key/value heads K (default N: no GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", choices=("yes", "no"), default="yes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--devices", type=int, help="how many local devices to shard over (default all)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {','.join(IMPLS)}")
    p.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated from {','.join(SPLITS)}")
    p.add_argument("--only", default=",".join(PASSES), help=f"passes, comma-separated from {','.join(PASSES)}")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed samples per function")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-cpu", action="store_true",
                   help=f"run without a GPU on {CPU_DEVICES} host devices (tiny default shape, interpret mode)")
    p.add_argument("--out", metavar="DIR", help="output directory ('{device}' is replaced by the device slug)")
    p.add_argument("--tag", help="appended to the file names (default sharding-<n>dev)")
    return p


def _choices(text: str, choices: Sequence[str], flag: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise ValueError(f"{flag}: {bad or 'empty'} not in {', '.join(choices)}")
    return items


def parse_args(argv: Sequence[str], on_cpu: bool) -> argparse.Namespace:
    parser = build_parser()
    a = parser.parse_args(list(argv))
    smoke = on_cpu and a.allow_cpu
    given = set(argv)
    try:
        if smoke:  # tiny shape unless given: interpret mode runs every kernel program on the host
            a.batch = a.batch if "--batch" in given else 4
            a.seq_len = a.seq_len if "--seq-len" in given else "40"
            a.heads = a.heads if "--heads" in given else 4
            a.head_dim = a.head_dim if "--head-dim" in given else 32
            a.min_time = a.min_time if "--min-time" in given else 0.0
        seq = a.seq_len.strip().lower()
        a.seq_len = int(seq[:-1]) * 1024 if seq.endswith("k") else int(seq)
        a.kv_heads = a.heads if a.kv_heads is None else a.kv_heads
        a.impls, a.splits, a.passes = (_choices(a.impls, IMPLS, "--impls"), _choices(a.splits, SPLITS, "--splits"),
                                       _choices(a.only, PASSES, "--only"))
        if min(a.batch, a.seq_len, a.heads, a.kv_heads, a.head_dim) < 1 or a.heads % a.kv_heads:
            raise ValueError("--batch, --seq-len, --heads, --kv-heads, --head-dim must be positive, heads % kv-heads == 0")
        if a.devices is not None and a.devices < 1:
            raise ValueError("--devices must be positive")
        if a.min_time < 0 or a.warmup < 0:
            raise ValueError("--min-time and --warmup must be non-negative")
    except ValueError as e:
        parser.error(str(e))
    a.smoke, a.argv = smoke, tuple(argv)
    a.timing = SMOKE_TIMING if smoke else {}
    return a


def _flops(opts, batch: int, heads: int, pass_: str) -> float:
    fwd = 4.0 * batch * heads * opts.seq_len * opts.seq_len * opts.head_dim * (0.5 if opts.causal == "yes" else 1.0)
    return fwd * (3.5 if pass_ == "fwd_bwd" else 1.0)


def _attention(impl: str, causal: bool):
    import jax

    import pallas_flash

    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return lambda q, k, v: pallas_flash.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas")


def _pass_fn(attn, pass_: str):
    import jax

    if pass_ == "fwd":
        return jax.jit(lambda q, k, v, g: attn(q, k, v))

    def fwd_bwd(q, k, v, g):
        out, pullback = jax.vjp(attn, q, k, v)
        return out, pullback(g)

    return jax.jit(fwd_bwd)


def _input_sets(opts, n_sets: int, key):
    """``n_sets`` host-side (numpy) sets of q, k, v and the output cotangent g."""
    import jax
    import numpy as np

    dtype = DTYPES[opts.dtype]
    q_shape = (opts.batch, opts.seq_len, opts.heads, opts.head_dim)
    kv_shape = (opts.batch, opts.seq_len, opts.kv_heads, opts.head_dim)
    sets = []
    for i in range(n_sets):
        keys = jax.random.split(jax.random.fold_in(key, i), 4)
        shapes = (q_shape, kv_shape, kv_shape, q_shape)
        sets.append(tuple(np.asarray(jax.random.normal(kx, s, dtype)) for kx, s in zip(keys, shapes)))
    return sets


def _share(x, split: str, n: int):
    """The first device's share of a ``[B, T, heads, D]`` array."""
    return x[: x.shape[0] // n] if split == "batch" else x[:, :, : x.shape[2] // n]


def bench_one(opts, impl: str, split: str, pass_: str, mesh, host_sets) -> dict:
    """One (implementation, split, pass): check the sharded call against one device's share, time both."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_flash.testing.errors import rel_err
    from pallas_flash.tuning.timer import time_fn

    n = mesh.devices.size
    rec = dict(kind="sharding", impl=impl, split=split, **{"pass": pass_}, devices=n, batch=opts.batch,
               seq_len=opts.seq_len, heads=opts.heads, kv_heads=opts.kv_heads, head_dim=opts.head_dim,
               causal=opts.causal == "yes", dtype=opts.dtype, tol=TOLERANCE[opts.dtype])
    dims = {"batch": (opts.batch,), "heads": (opts.heads, opts.kv_heads)}[split]
    if any(d % n for d in dims):
        return dict(rec, status="n/a", message=f"{split} {dims} not divisible by {n} devices")
    try:
        fn = _pass_fn(_attention(impl, opts.causal == "yes"), pass_)
        spec = P("x") if split == "batch" else P(None, None, "x")
        sharding, one = NamedSharding(mesh, spec), mesh.devices.flat[0]
        sharded_sets = [tuple(jax.device_put(x, sharding) for x in s) for s in host_sets]
        alone_sets = [tuple(jax.device_put(_share(x, split, n), one) for x in s) for s in host_sets]
        compiled = fn.lower(*sharded_sets[0]).compile()
        rec["collectives"] = count_collectives(compiled.as_text())
        got = jax.tree.leaves(compiled(*sharded_sets[0]))
        want = jax.tree.leaves(fn(*alone_sets[0]))
        host = lambda x: np.asarray(x, np.float32)  # noqa: E731 - both on the host: they live on different devices
        errs = {name: rel_err(host(_share(g, split, n)), host(w)) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
        rec.update(errs=errs, err=max(errs.values()))
        got = want = None
        if not rec["err"] < rec["tol"]:
            return dict(rec, status="FAIL", message=f"sharded != alone on the first shard: {errs}")
        timing = dict(min_time=opts.min_time, warmup=opts.warmup, **opts.timing)
        t_sharded = time_fn(compiled, sharded_sets, **timing)
        t_alone = time_fn(fn, alone_sets, **timing)
        share_batch = opts.batch // n if split == "batch" else opts.batch
        share_heads = opts.heads // n if split == "heads" else opts.heads
        flops = _flops(opts, share_batch, share_heads, pass_)
        rec.update(status="ok", sharded_s=t_sharded.median_s, alone_s=t_alone.median_s,
                   ratio=t_sharded.median_s / t_alone.median_s, tflops_per_device=flops / t_sharded.median_s / 1e12,
                   alone_tflops=flops / t_alone.median_s / 1e12, timing_sharded=t_sharded.as_dict(),
                   timing_alone=t_alone.as_dict())
    except Exception as e:  # noqa: BLE001 - every failure becomes a table row
        rec.update(status=common.classify_exception(e), message=common.short_message(e))
    return rec


def _cell_ms(x) -> str:
    return "—" if x is None else f"{x * 1e3:.3g}"


def markdown(records: Sequence[dict], meta: dict) -> str:
    head = [
        f"# Sharded attention: {meta['devices']} x {meta['device']}",
        "",
        f"- **Date**: {meta['date']}; commit {meta['commit']}; jax {meta['jax_version']}",
        f"- **Command**: `{meta['command']}`",
        f"- **Problem**: B={meta['batch']}, T={meta['seq_len']}, N={meta['heads']} (K={meta['kv_heads']}), "
        f"D={meta['head_dim']}, causal={meta['causal']}, {meta['dtype']}",
        "- **Method**: sharded = `jax.jit` with q, k, v, dO sharded on the split's dim over a 1-D mesh of all the "
        "devices (one compiled program, timed as a whole); alone = one device computing its share (B/n, or N/n and "
        "K/n heads); ratio = sharded / alone. Both timed with `pallas_flash.tuning.timer.time_fn` (median of "
        "back-to-back samples). The sharded result's first shard is checked against the alone result first. "
        "Collectives: instructions counted in the compiled HLO.",
        "",
        "| impl | split | pass | sharded ms | alone ms | ratio | TFLOP/s per device | collectives | err | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in records:
        coll = r.get("collectives")
        coll_text = "—" if coll is None else (", ".join(f"{k} {v}" for k, v in coll.items()) or "none")
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "—"
        tflops = f"{r['tflops_per_device']:.3g}" if r.get("tflops_per_device") is not None else "—"
        err = f"{r['err']:.1e}" if r.get("err") is not None else "—"
        status = r["status"] + (f": {r['message']}" if r.get("message") and r["status"] != "ok" else "")
        rows.append(f"| {r['impl']} | {r['split']} | {r['pass']} | {_cell_ms(r.get('sharded_s'))} | "
                    f"{_cell_ms(r.get('alone_s'))} | {ratio} | {tflops} | {coll_text} | {err} | {status} |")
    return "\n".join(head + rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--allow-cpu" in argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()
    import jax
    from jax.sharding import AxisType

    on_cpu = jax.default_backend() != "gpu"
    opts = parse_args(argv, on_cpu)
    if on_cpu and not opts.allow_cpu:
        print(f"benchmarks.sharding needs GPUs, but JAX's default backend is {jax.default_backend()!r}. Run it on the "
              "GPU machine, or pass --allow-cpu for a smoke run on host devices.", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=r".*Pallas Triton backend is deprecated.*", category=DeprecationWarning)
    devices = jax.devices()
    n = len(devices) if opts.devices is None else opts.devices
    if n > len(devices):
        print(f"--devices {n}: only {len(devices)} devices here", file=sys.stderr)
        return 2
    mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,), devices=devices[:n])

    from pallas_flash.tuning.timer import num_input_sets

    dev = common.device_info()
    itemsize = jax.numpy.dtype(DTYPES[opts.dtype]).itemsize
    set_bytes = 2 * (opts.batch * opts.seq_len * (opts.heads + opts.kv_heads) * opts.head_dim) * itemsize // n
    host_sets = _input_sets(opts, num_input_sets(set_bytes), jax.random.key(opts.seed))
    meta = dict(kind="meta", **dev, devices=n,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="PYTHONPATH=. python3 -m benchmarks.sharding " + shlex.join(opts.argv), commit=common.git_commit(),
                batch=opts.batch, seq_len=opts.seq_len, heads=opts.heads, kv_heads=opts.kv_heads,
                head_dim=opts.head_dim, causal=opts.causal == "yes", dtype=opts.dtype)
    out_dir = (pathlib.Path(opts.out.replace("{device}", dev["device_slug"])) if opts.out
               else common.RESULTS_DIR / dev["device_slug"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = common.unique_stem(out_dir, datetime.date.today().isoformat() + f"-{opts.tag or f'sharding-{n}dev'}")
    jsonl = stem.with_suffix(".jsonl")
    common.append_jsonl(jsonl, meta)
    print(f"{n} x {dev['device']}: {len(opts.impls)} impls x {len(opts.splits)} splits x {len(opts.passes)} passes "
          f"-> {stem}.*", flush=True)
    start, records = time.monotonic(), []
    for impl in opts.impls:
        for split in opts.splits:
            for pass_ in opts.passes:
                rec = bench_one(opts, impl, split, pass_, mesh, host_sets)
                records.append(rec)
                common.append_jsonl(jsonl, rec)
                ratio = f"ratio {rec['ratio']:.3f}" if rec.get("ratio") else rec.get("message", "")
                print(f"  {impl} {split} {pass_}: {rec['status']} {ratio} collectives={rec.get('collectives')}",
                      flush=True)
                jax.clear_caches()
    text = markdown(records, meta)
    stem.with_suffix(".md").write_text(text)
    print("\n" + text + f"\n{time.monotonic() - start:.0f} s. Wrote {jsonl}, {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
