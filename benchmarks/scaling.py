"""GPT-2 training on 1 GPU against n GPUs, with the training script itself: ``python -m benchmarks.scaling``.

Two comparisons (issue #13), each a pair of ``python -m train`` runs in fresh
processes, the devices chosen with ``CUDA_VISIBLE_DEVICES``:

- **data parallel** (``dp``): GPT-2 at T=1024, ``--batch-size b`` on one GPU
  against ``n*b`` on ``n`` GPUs (the same rows per GPU). Scaling = n-GPU
  tokens/s / 1-GPU tokens/s; perfect is ``n``.
- **context parallel** (``cp``): one long sequence (``--cp-seq-len``, batch 1)
  on one GPU against ``--context-parallel n`` on ``n`` GPUs (ring attention,
  zigzag). Where one GPU runs out of memory the row says so.

tokens/s is the median of the training script's own logged windows
(``metrics.jsonl``: it times back-to-back steps between log points), leaving
out the first window (warm-up). The loss column is the first and last logged
training loss: it must fall. Compile is the script's "compiled the train step
in" (the first step, compilation included).

Writes ``benchmarks/results/<device>/scaling-<date>.{md,jsonl}``. Run from the
repository root on a machine with 2 or more GPUs::

    PYTHONPATH=. python3 -m benchmarks.scaling
    PYTHONPATH=. python3 -m benchmarks.scaling --only dp --steps 200
    PYTHONPATH=. python3 -m benchmarks.scaling --allow-cpu     # smoke run: host devices, the tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

KINDS = ("dp", "cp")
_COMPILED = re.compile(r"compiled the train step in ([0-9.]+)s")


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``python -m train`` process."""

    kind: str  # dp / cp
    devices: int
    seq_len: int
    batch_size: int
    context_parallel: int
    steps: int
    log_every: int
    config: str
    attention: str

    def args(self) -> list[str]:
        return [
            "--config", self.config, "--attention", self.attention, "--seq-len", str(self.seq_len), "--batch-size", str(self.batch_size),
            "--context-parallel", str(self.context_parallel), "--steps", str(self.steps),
            "--log-every", str(self.log_every), "--eval-every", "0", "--eval-batches", "1",
            "--checkpoint-every", "0", "--sample-tokens", "0",
        ]


def plan(a: argparse.Namespace, n: int) -> list[Run]:
    runs = []
    common_ = dict(steps=a.steps, log_every=a.log_every, config=a.config, attention=a.attention)
    if "dp" in a.only:
        runs += [Run("dp", d, a.dp_seq_len, a.dp_batch * d, 1, **common_) for d in (1, n)]
    if "cp" in a.only:
        runs += [Run("cp", d, a.cp_seq_len, 1, d, **dict(common_, steps=a.cp_steps, log_every=a.cp_log_every))
                 for d in (1, n)]
    return runs


def execute(run: Run, *, cpu: bool, timeout: float, log_dir: pathlib.Path, xla_flags: str = "") -> dict:
    """Run the training script; its record: tokens/s, MFU, losses, compile time, status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags]))
    if flags:
        env["XLA_FLAGS"] = flags
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={run.devices}"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(run.devices)))
    with tempfile.TemporaryDirectory(prefix="scaling-") as out:
        cmd = [sys.executable, "-m", "train", *run.args(), "--out", out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=timeout)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        wall = time.perf_counter() - t0
        metrics_path = pathlib.Path(out) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    log = log_dir / f"{run.kind}-{run.devices}gpu.log"
    log.write_text("\n".join(text.replace("\r", "\n").splitlines()[-60:]) + "\n")  # the tail: enough to see why
    train = [r for r in records if r.get("tokens_per_s")]
    rec = dict(dataclasses.asdict(run), wall_s=round(wall, 1), log=str(log))
    m = _COMPILED.search(text)
    rec["compile_s"] = float(m.group(1)) if m else None
    if rc == "timeout" and train:
        status = f"stopped at the {timeout:.0f} s limit after step {train[-1]['step']} (its windows are kept)"
    elif rc != 0 or not train:
        oom = any(s in text.lower() for s in common.OOM_MARKERS)
        tail = " | ".join(text.strip().splitlines()[-2:])[-240:]
        return dict(rec, status="out of memory" if oom else f"failed ({rc}): {tail}")
    else:
        status = "ok"
    windows = train[1:] or train
    tps = statistics.median(r["tokens_per_s"] for r in windows)
    mfus = [r["mfu"] for r in windows if r.get("mfu") is not None]
    return dict(rec, status=status, tokens_per_s=tps, mfu=statistics.median(mfus) if mfus else None,
                loss_first=train[0]["loss"], loss_last=train[-1]["loss"], windows=len(windows))


def report(records: list[dict], meta: dict) -> str:
    import pandas as pd

    df = pd.DataFrame(records)
    rows = []
    for _, r in df.iterrows():
        base = df[(df.kind == r.kind) & (df.devices == 1)]
        measured = lambda x: "tokens_per_s" in x and x.tokens_per_s == x.tokens_per_s  # present, not NaN
        base_tps = base.tokens_per_s.iloc[0] if len(base) and measured(base.iloc[0]) else None
        ok = measured(r)
        rows.append({
            "run": {"dp": "data parallel", "cp": "context parallel"}[r.kind],
            "GPUs": r.devices,
            "T": r.seq_len,
            "batch": r.batch_size,
            "mesh (data x seq)": f"{r.devices // r.context_parallel} x {r.context_parallel}",
            "tokens/s": f"{r.tokens_per_s:,.0f}" if ok else "-",
            "vs 1 GPU": f"{r.tokens_per_s / base_tps:.2f}x" if ok and base_tps else "-",
            "MFU": f"{100 * r.mfu:.1f}%" if ok and r.mfu is not None and r.mfu == r.mfu else "-",
            "loss first -> last": f"{r.loss_first:.3f} -> {r.loss_last:.3f}" if ok else "-",
            "compile s": f"{r.compile_s:.0f}" if r.compile_s == r.compile_s and r.compile_s is not None else "-",
            "status": r.status,
        })
    lines = [
        f"# GPT-2 training, 1 GPU against {meta['devices']}: {meta['device']}", "",
        f"{meta['date']}; jax {meta['jax']}; commit {meta['commit']}; `{meta['command']}`"
        + (f"; XLA_FLAGS `{meta['xla_flags']}`" if meta.get("xla_flags") else ""), "",
        "tokens/s: the median of `python -m train`'s logged windows after the first; data parallel keeps the rows per "
        "GPU fixed; context parallel shards one sequence over the GPUs (ring attention, zigzag).", "",
        pd.DataFrame(rows).to_markdown(index=False), "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, help="GPUs of the multi-GPU runs (default: all)")
    p.add_argument("--only", default=",".join(KINDS), help="comma-separated from dp,cp")
    p.add_argument("--config", help="model preset (default gpt2; CPU tiny)")
    p.add_argument("--steps", type=int, help="steps of the data-parallel runs (default 150; CPU 6)")
    p.add_argument("--log-every", type=int, help="steps per logged window (default 25; CPU 2)")
    p.add_argument("--dp-seq-len", type=int, help="T of the data-parallel runs (default 1024; CPU 64)")
    p.add_argument("--dp-batch", type=int, help="rows per GPU (default 16; CPU 2)")
    p.add_argument("--cp-seq-len", type=int, help="T of the context-parallel runs (default 65536; CPU 128)")
    p.add_argument("--cp-steps", type=int, help="steps of the context-parallel runs (default 20; CPU 4)")
    p.add_argument("--cp-log-every", type=int, help="(default 5; CPU 2)")
    p.add_argument("--attention", default="pallas", help="the training script's --attention (default pallas)")
    p.add_argument("--xla-flags", default="", help="added to XLA_FLAGS of every training run")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per training run")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU: host devices, the tiny model, xla")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="results root; files go to <out-dir>/<device>/")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cpu = a.allow_cpu
    defaults = dict(config="tiny", steps=6, log_every=2, dp_seq_len=64, dp_batch=2, cp_seq_len=128, cp_steps=4,
                    cp_log_every=2) if cpu else dict(config="gpt2", steps=150, log_every=25, dp_seq_len=1024,
                                                     dp_batch=16, cp_seq_len=65536, cp_steps=20, cp_log_every=5)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.only = tuple(s for s in a.only.split(",") if s)
    if bad := set(a.only) - set(KINDS):
        raise SystemExit(f"--only: unknown {sorted(bad)}; choose from {KINDS}")
    import jax

    if cpu:
        n = a.devices or 2
        device = "cpu"
    else:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if len(gpus) < 2:
            raise SystemExit("benchmarks.scaling needs 2 or more GPUs (or --allow-cpu for a smoke run)")
        n = a.devices or len(gpus)
        device = gpus[0].device_kind
    date = datetime.date.today().isoformat()
    out_dir = pathlib.Path(a.out_dir) / common.slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = common.unique_stem(out_dir, f"scaling-{date}")
    log_dir = out_dir / f"{stem.name}-logs"
    log_dir.mkdir(exist_ok=True)
    meta = dict(device=device, devices=n, date=date, jax=jax.__version__, commit=common.git_commit(), xla_flags=a.xla_flags,
                command="PYTHONPATH=. python3 -m benchmarks.scaling " + shlex.join(sys.argv[1:] if argv is None else argv))
    records = []
    for run in plan(a, n):
        rec = execute(run, cpu=cpu, timeout=a.timeout, log_dir=log_dir, xla_flags=a.xla_flags)
        records.append(rec)
        common.append_jsonl(stem.with_suffix(".jsonl"), dict(meta, **rec))
        shown = f"{rec['tokens_per_s']:,.0f} tok/s ({rec['status']})" if "tokens_per_s" in rec else rec["status"]
        print(f"  {run.kind} {run.devices} GPU(s) T={run.seq_len} B={run.batch_size}: {shown} "
              f"[compile {rec['compile_s']}s, {rec['wall_s']}s]", flush=True)
    text = report(records, meta)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md, .jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
