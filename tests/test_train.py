"""python -m train: a tiny run end to end, resuming, data parallelism, metering. What a careless user (or a
scheduler's SIGTERM) does to a run: test_train_safety.py. The data, the sampler and the metrics log alone:
test_train_data.py."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ON_GPU
from train.config import TrainConfig, build_parser, make_config, peak_flops, resolve_attention, validate_config
from train.loop import main

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small enough that each run is a few seconds on a CPU (most of it compiling).
TINY_ARGS = [
    "--config", "tiny", "--attention", "xla", "--steps", "20", "--batch-size", "4",
    "--seq-len", "32", "--warmup", "2", "--log-every", "2", "--eval-every", "10",
    "--eval-batches", "2", "--checkpoint-every", "10", "--sample-tokens", "0",
]


def _records(out):
    lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _train_losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    summary = main(TINY_ARGS + ["--out", str(out), "--sample-tokens", "12"])
    return out, summary


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--attention", "--seq-len", "--batch-size", "--grad-accum", "--steps",
                 "--lr", "--warmup", "--data", "--out", "--resume", "--eval-every", "--seed",
                 "--checkpoint-every", "--context-parallel", "--multihost"):
        assert flag in text


def test_defaults_follow_the_platform():
    cpu = make_config({}, has_gpu=False)
    assert (cpu.config, cpu.seq_len, cpu.out) == ("tiny", 128, "out/tiny")
    gpu = make_config({}, has_gpu=True)
    assert (gpu.config, gpu.seq_len, gpu.batch_size) == ("gpt2", 1024, 16)
    assert make_config({"steps": 30}, has_gpu=False).warmup == 3  # warm-up shrinks with short runs
    with pytest.raises(ValueError, match="--warmup"):
        make_config({"steps": 30, "warmup": 30}, has_gpu=False)
    assert resolve_attention("auto", "cpu")[0] == "xla"
    assert resolve_attention("auto", "gpu")[0] == "pallas"
    assert resolve_attention("cudnn", "cpu")[0] == "cudnn"


def test_peak_flops_table():
    class Dev:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind

    assert peak_flops(Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(Dev("gpu", "NVIDIA H200")) == 989e12
    assert peak_flops(Dev("gpu", "NVIDIA H100 PCIe")) == 756e12  # not the SXM part's 989
    assert peak_flops(Dev("gpu", "NVIDIA H100 NVL")) == 835e12
    assert peak_flops(Dev("gpu", "NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops(Dev("cpu", "cpu")) is None
    assert peak_flops(Dev("gpu", "Tesla T4")) is None


def test_seed_must_fit_32_bits_and_flags_are_never_abbreviated(capsys):
    """jax.random.key(2**32) is key(0) (another run's seed, silently), 2**64 fails after config.json is written;
    and an abbreviation (--resume --step 70) must not pass for --steps."""
    assert build_parser().parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    for value in (str(2**32), str(2**64), "-1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--seed", value])
        assert f"argument --seed: must be a non-negative integer below 2**32, got {value}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--seed must be a non-negative integer below 2\*\*32, got 4294967296"):
        validate_config(TrainConfig(seed=2**32))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--resume", "--step", "70"])
    assert "unrecognized arguments: --step 70" in capsys.readouterr().err
    assert build_parser().parse_args(["--steps=70"]).steps == 70


def test_weight_decay_takes_matrices_and_embeddings_only():
    """AdamW decays kernels and embeddings, never biases or norms: the attention's q/k/v biases are 2-D
    ([heads, head_dim]), so a rule by rank decayed them. One step on zero gradients: what moves is decay."""
    import jax
    import jax.numpy as jnp

    from models import gpt2
    from train.step import init_train_state, make_optimizer

    tx, _ = make_optimizer(TrainConfig(lr=1.0, warmup=0, steps=10, weight_decay=0.5))
    mcfg = gpt2.GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=32, dtype="float32")
    params, _ = init_train_state(mcfg, tx, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases start at zero: make their decay visible
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    decayed = sorted(jax.tree_util.keystr(p) for p, u in leaves if bool(jnp.any(u != 0)))
    names = sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    assert decayed == [n for n in names if n.endswith("['kernel']") or n.endswith("['embedding']")]
    assert any("['attn']['query']['bias']" in n for n in names)  # a 2-D bias exists, and is not decayed


def test_tiny_run_learns_and_logs(tiny_run):
    out, summary = tiny_run
    assert summary["attention"] == "xla" and summary["step"] == 20
    records = _records(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(2, 21, 2))
    assert [r["step"] for r in evals] == [10, 20]
    for r in train:
        assert set(r) >= {"step", "loss", "lr", "tokens_per_s", "mfu"}
        if ON_GPU:
            assert 0 < r["mfu"] < 1
        else:
            assert r["mfu"] is None  # no peak FLOP/s to divide by
        assert 0 < r["lr"] <= 2e-3
    assert all(r["tokens_per_s"] > 0 for r in train[1:])
    losses = [r["loss"] for r in train]
    assert losses[0] > 5.0  # ~ln(256) at the start
    assert np.mean(losses[-3:]) < losses[0] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 0.5
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4


def test_checkpoints_between_evaluations_keep_tokens_per_s_sound(tmp_path):
    """A checkpoint at a logged step, with no evaluation there, stops the clock:
    that step's record must be written first, from its own interval."""
    out = tmp_path / "ckpt"
    args = list(TINY_ARGS)
    args[args.index("--eval-every") + 1] = "0"  # evaluate only at the end
    args[args.index("--checkpoint-every") + 1] = "4"
    main(args + ["--steps", "12", "--out", str(out)])
    train = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(2, 13, 2))
    assert all(r["tokens_per_s"] > 0 for r in train[1:]), [r["tokens_per_s"] for r in train]


def test_resume_after_a_kill_is_exact(tiny_run, tmp_path, capsys):
    original, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    # Simulate a run killed after step 20 was logged but before its checkpoint
    # was written: only the step-10 checkpoint survives.
    shutil.rmtree(out / "checkpoints" / "20")
    summary = main(["--resume", "--out", str(out), "--sample-tokens", "0"])
    assert summary["resumed_from"] == 10
    want, got = _train_losses(_records(original)), _train_losses(_records(out))
    assert sorted(got) == sorted(want)  # the re-run steps replaced, not duplicated
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")

    said = capsys.readouterr().out
    assert "learning-rate schedule" not in said  # same --steps: the same schedule, no word
    assert "validation:" not in said  # and the same validation tokens
    # Train longer: continues at step 20 and appends; the stretched schedule's jump is said.
    summary = main(["--resume", "--out", str(out), "--steps", "24", "--sample-tokens", "0"])
    said = capsys.readouterr().out
    assert re.search(r"--steps 20 -> 24: the learning-rate schedule now decays to step 24; at step 20 the learning "
                     r"rate moves from [0-9.e-]+ to [0-9.e-]+", said), said
    assert summary["resumed_from"] == 20 and summary["step"] == 24
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == list(range(2, 25, 2))


def test_refuses_to_mix_runs(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(ValueError, match="--resume"):
        main(TINY_ARGS + ["--out", str(out)])
    with pytest.raises(ValueError, match="--lr"):
        main(["--resume", "--out", str(out), "--lr", "0.1"])
    with pytest.raises(ValueError, match="no checkpoint"):
        main(["--resume", "--out", str(tmp_path / "empty")])
    # A run killed before its first checkpoint left records: a fresh run would append to them.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"step": 2, "loss": 5.5}\n')
    with pytest.raises(ValueError, match="metrics.jsonl holds 1 records of an earlier run"):
        main(TINY_ARGS + ["--out", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == '{"step": 2, "loss": 5.5}\n'


def test_data_parallel_on_two_cpu_devices(tiny_run, tmp_path):
    """Same run sharded over 2 fake CPU devices: same losses; a bad batch fails clearly."""
    original, _ = tiny_run
    out = tmp_path / "dp"
    script = textwrap.dedent(f"""
        import jax
        from train.loop import main
        assert jax.device_count() == 2, jax.devices()
        try:
            main({TINY_ARGS!r} + ["--batch-size", "3", "--out", {str(tmp_path / "bad")!r}])
        except ValueError as e:
            print("BAD-BATCH:", e)
        else:
            raise SystemExit("a batch of 3 on 2 devices should have failed")
        main({TINY_ARGS!r} + ["--out", {str(out)!r}])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BAD-BATCH: --batch-size 3 must be divisible by the number of devices (2)" in proc.stdout
    assert "on 2 cpu device(s)" in proc.stdout
    want, got = _train_losses(_records(original)), _train_losses(_records(out))
    assert sorted(got) == sorted(want)
    for step in (2, 4, 6):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-4)
    np.testing.assert_allclose(got[20], want[20], rtol=2e-2)


def test_train_on_a_text_file(tmp_path):
    text = tmp_path / "input.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    summary = main(TINY_ARGS + ["--data", str(text), "--steps", "4", "--out", str(tmp_path / "o"),
                                "--grad-accum", "2", "--eval-every", "0", "--checkpoint-every", "0"])
    assert summary["step"] == 4 and np.isfinite(summary["loss"])


def test_grad_accumulation_matches_one_big_batch():
    import jax
    import optax
    from flax import nnx

    from models import gpt2
    from train.step import make_train_step

    cfg = gpt2.get_config("tiny", attention="xla", dtype="float32", n_layer=1)
    model = gpt2.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(0.1)
    x = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    key = jax.random.key(0)
    one, _ = make_train_step(graphdef, tx, 1)
    two, _ = make_train_step(graphdef, tx, 2)
    p1, _, m1 = jax.jit(one)(params, tx.init(params), x[None], y[None], 0, key)
    p2, _, m2 = jax.jit(two)(params, tx.init(params), x.reshape(2, 2, 16), y.reshape(2, 2, 16), 0, key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Micro-batches that do not match grad_accum: an error naming both shapes, not three of four dropped.
    with pytest.raises(ValueError, match=r"grad_accum=1.*got x \(2, 2, 16\) and y \(2, 2, 16\)"):
        jax.jit(one)(params, tx.init(params), x.reshape(2, 2, 16), y.reshape(2, 2, 16), 0, key)
    with pytest.raises(ValueError, match=r"grad_accum=2.*got x \(2, 2, 16\) and y \(2, 4, 8\)"):
        jax.jit(two)(params, tx.init(params), x.reshape(2, 2, 16), y.reshape(2, 4, 8), 0, key)
