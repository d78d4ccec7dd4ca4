"""The scaling benchmark's plan and table (its runs need GPUs: ``python -m benchmarks.scaling``)."""

from __future__ import annotations

from benchmarks import scaling


def _args(argv):
    a = scaling.build_parser().parse_args(argv)
    a.only = tuple(a.only.split(","))
    for k, v in dict(config="gpt2", steps=150, log_every=25, dp_seq_len=1024, dp_batch=16, cp_seq_len=65536,
                     cp_steps=20, cp_log_every=5).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def test_plan_keeps_rows_per_gpu_and_shards_the_sequence():
    runs = scaling.plan(_args([]), 4)
    dp = [r for r in runs if r.kind == "dp"]
    cp = [r for r in runs if r.kind == "cp"]
    assert [(r.devices, r.batch_size, r.context_parallel) for r in dp] == [(1, 16, 1), (4, 64, 1)]
    assert [(r.devices, r.batch_size, r.context_parallel, r.seq_len) for r in cp] == [(1, 1, 1, 65536), (4, 1, 4, 65536)]
    argv = cp[1].args()
    assert argv[argv.index("--context-parallel") + 1] == "4" and "--sample-tokens" in argv


def test_table_ratios_and_failures():
    base = dict(seq_len=1024, steps=10, log_every=5, config="gpt2", attention="pallas", compile_s=20.0)
    recs = [
        dict(base, kind="dp", devices=1, batch_size=16, context_parallel=1, status="ok", tokens_per_s=600e3,
             mfu=0.4, loss_first=3.5, loss_last=3.0),
        dict(base, kind="dp", devices=2, batch_size=32, context_parallel=1, status="ok", tokens_per_s=1140e3,
             mfu=0.38, loss_first=3.5, loss_last=3.0),
        dict(base, kind="cp", devices=1, batch_size=1, context_parallel=1, status="out of memory", compile_s=None),
        dict(base, kind="cp", devices=2, batch_size=1, context_parallel=2, status="ok", tokens_per_s=50e3,
             mfu=0.5, loss_first=9.0, loss_last=4.0),
    ]
    meta = dict(device="GPU", devices=2, date="2026-12-01", jax="0.11.2", commit="abc", command="x")
    text = scaling.report(recs, meta)
    header, _, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("|")]
    rows = [dict(zip(header, r)) for r in rows]
    assert rows[1]["vs 1 GPU"] == "1.90x" and rows[1]["MFU"] == "38.0%"
    assert rows[2]["status"] == "out of memory" and rows[2]["tokens/s"] == "-"
    # no 1-GPU number to divide by: no ratio, but the run's own numbers stand
    assert rows[3]["vs 1 GPU"] == "-" and rows[3]["loss first -> last"] == "9.000 -> 4.000"
    assert rows[3]["mesh (data x seq)"] == "1 x 2"
