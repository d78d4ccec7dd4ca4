"""Data- and context-parallel training (``train.parallel``, ``python -m train --context-parallel N``).

On a CPU with four host devices (conftest), the tiny GPT in float32, the
Pallas kernels in interpret mode:

* one step's loss and gradients with the sequence sharded over 2 devices
  (zigzag, ring attention), alone and as 2 data x 2 seq, equal the
  single-device ones (XLA attention, unsharded, natural token order) on the
  same batch;
* the real ``train`` entry trains with ``--context-parallel 2`` (loss falls),
  and its checkpoint resumes exactly, and onto another mesh;
* the compiled data-parallel train step gathers nothing: its only
  collective is the gradient all-reduce (the kernels run on each device's
  rows); the context-parallel one moves K/V around the ring and gathers nothing;
* a bad ``N`` (or batch, length, backend) is a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks.sharding import count_collectives
from models import gpt2
from pallas_flash.sharding.layout import zigzag
from tests.conftest import TOLERANCE, rel_err
from train import loop
from train.config import TrainConfig
from train.loop import cli, main
from train.parallel import Parallel
from train.step import make_train_step

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (conftest gives 4 host devices)")

B, T = 4, 16  # batch, sequence: T divides into 2 x 2 zigzag chunks


def _config(attention: str) -> gpt2.GPTConfig:
    return gpt2.get_config("tiny", attention=attention, dtype="float32", n_layer=2, block_size=T)


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, 256, (B, T + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grad(parallel: Parallel | None, params, x, y, *, natural_positions: bool = False):
    """Mean loss and its gradient (compiled), with the HLO; ``parallel`` None: one device, XLA attention."""
    cp = None if parallel is None else parallel.context_parallel
    cfg = _config("xla" if parallel is None else "pallas")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(cfg, context_parallel=cp, rngs=nnx.Rngs(0))))
    loss_fn = make_train_step(graphdef, optax.sgd(0.1), 1)[1]
    if parallel is None:
        positions, args = np.arange(T, dtype=np.int32), (x, y)
    else:
        positions = np.arange(T, dtype=np.int32) if natural_positions else parallel.positions(T)
        args = (parallel.put(x, B), parallel.put(y, B))  # columns in zigzag order, sharded (data, seq)
    fn = jax.jit(jax.value_and_grad(loss_fn))
    compiled = fn.lower(params, *args, None, positions).compile()
    loss, grads = compiled(params, *args, None, positions)
    return float(loss), grads, compiled.as_text()


@pytest.mark.parametrize("data, seq", [(1, 2), (2, 2)], ids=["seq2", "data2_x_seq2"])
def test_one_step_equals_the_single_device_step(seed, data, seq):
    """Loss within 1e-5 and every gradient within the float32 tolerance (1e-4 relative) of one device's."""
    params = nnx.to_pure_dict(nnx.state(gpt2.GPT(_config("xla"), rngs=nnx.Rngs(seed)), nnx.Param))
    x, y = _batch(seed)
    want_loss, want_grads, _ = _loss_and_grad(None, params, x, y)

    parallel = Parallel.over_devices(seq, jax.devices()[: data * seq])
    assert (parallel.data_size, parallel.seq_size) == (data, seq)
    loss, grads, hlo = _loss_and_grad(parallel, params, x, y)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (loss, want_loss)
    flat, want_flat = jax.tree.leaves_with_path(grads), [np.asarray(w) for w in jax.tree.leaves(want_grads)]
    total = np.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for w in want_flat))
    tol = TOLERANCE[np.dtype(np.float32)]
    for (path, g), w in zip(flat, want_flat, strict=True):
        # Relative to the leaf, or to a thousandth of the whole gradient for a leaf whose exact gradient is
        # zero (the key bias: softmax ignores a logit shift shared by all keys), where only rounding is left.
        err = np.linalg.norm(np.asarray(g, np.float64) - w) / max(np.linalg.norm(w), 1e-3 * total)
        assert np.isfinite(err) and err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err}"
    assert rel_err(np.concatenate([np.ravel(g) for _, g in flat]), np.concatenate([np.ravel(w) for w in want_flat])) <= tol

    collectives = count_collectives(hlo)
    assert collectives.get("collective-permute", 0) > 0, collectives  # K/V (and dK/dV) around the ring
    assert "all-gather" not in collectives and "all-to-all" not in collectives, collectives

    # The positions matter: embedding the natural order under the zigzag layout is a different model.
    # At initialisation the position table is small, so the loss moves little (0.04% once); the gradients
    # (the position table's rows land on other positions) miss the tolerance by far.
    wrong, wrong_grads, _ = _loss_and_grad(parallel, params, x, y, natural_positions=True)
    assert wrong != loss, (wrong, loss)
    wrong_flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(wrong_grads)])
    assert rel_err(wrong_flat, np.concatenate([np.ravel(w) for w in want_flat])) > 10 * tol


def test_data_parallel_train_step_gathers_nothing():
    """4-way data parallel with the Pallas kernels: the gradient all-reduce is the only collective."""
    parallel = Parallel.over_devices(1)
    assert (parallel.data_size, parallel.seq_size, parallel.context_parallel) == (4, 1, None)
    cfg = _config("pallas")
    model = gpt2.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-3)
    step, _ = make_train_step(graphdef, tx, 1)
    x, y = (parallel.put(a[None], B) for a in _batch(0))  # [1, B, T], one row per device
    hlo = jax.jit(step).lower(params, tx.init(params), x, y, np.int32(0), jax.random.key(0)).compile().as_text()
    collectives = count_collectives(hlo)
    assert set(collectives) == {"all-reduce"}, collectives
    # The attention kernels see one device's rows: q/k/v [1, T, heads, head_dim], never the whole batch.
    shard, whole = f"f32[1,{T},{cfg.n_head},{cfg.head_dim}]", f"f32[{B},{T},{cfg.n_head},{cfg.head_dim}]"
    assert shard in hlo and whole not in hlo


TRAIN_ARGS = [
    "--config", "tiny", "--attention", "pallas", "--steps", "8", "--batch-size", "4", "--seq-len", "32",
    "--lr", "1e-2", "--warmup", "1", "--log-every", "2", "--eval-every", "0", "--eval-batches", "1",
    "--checkpoint-every", "4", "--sample-tokens", "0",
]


def _train_losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    """Eight steps of ``python -m train --context-parallel 2`` on the 4 devices (2 data x 2 seq)."""
    out = tmp_path_factory.mktemp("cp") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = main(TRAIN_ARGS + ["--context-parallel", "2", "--out", str(out)])
    return out, summary, printed.getvalue()


def test_context_parallel_training_runs_and_resumes(cp_run, tmp_path):
    """The loss falls; the step-4 checkpoint resumes to the same losses, and onto a 1 data x 4 seq mesh
    to nearly the same ones (the same math summed in another order)."""
    out, summary, printed = cp_run
    assert "on 4 cpu device(s) (2 data x 2 seq, ring attention)" in printed
    assert summary["attention"] == "pallas" and summary["step"] == 8 and np.isfinite(summary["val_loss"])
    assert json.loads((out / "config.json").read_text())["context_parallel"] == 2
    losses = _train_losses(out)
    assert sorted(losses) == [2, 4, 6, 8]
    assert losses[2] > 5.0 and losses[8] < losses[2] - 0.5, losses  # from ~ln(256)

    for n, rtol in ((2, 1e-5), (4, 1e-4)):  # the same mesh: exact; another: the same math, other sums
        again = tmp_path / f"resumed{n}"
        shutil.copytree(out, again)
        shutil.rmtree(again / "checkpoints" / "8")  # killed before its last checkpoint
        summary = main(["--resume", "--out", str(again), "--context-parallel", str(n)])
        assert summary["resumed_from"] == 4
        assert json.loads((again / "config.json").read_text())["context_parallel"] == n
        got = _train_losses(again)
        for step in (6, 8):
            np.testing.assert_allclose(got[step], losses[step], rtol=rtol, err_msg=f"N={n}, step {step}")


def test_a_resume_that_validates_on_other_tokens_says_so():
    """Where the validation split is shorter than --seq-len, its length is cut to the zigzag layout, so a resume
    with another --context-parallel (or another --eval-batches) validates on other tokens: said, with the step."""
    saved = dataclasses.asdict(TrainConfig(seq_len=64, context_parallel=1, eval_batches=2))
    said = []
    for cp, val_tokens, batches, expected in (
        (4, 50, 2, "validation: 2 batches of 48 tokens, was 2 of 49: val_loss after step 7 is measured on other"),
        (4, 1000, 2, None),  # both 64 tokens: the same set
        (1, 50, 3, "validation: 3 batches of 49 tokens, was 2 of 49"),
    ):
        said.clear()
        cfg = TrainConfig(seq_len=64, context_parallel=cp, eval_batches=batches)
        loop._say_validation_change(saved, cfg, val_tokens, 7, said.append)
        assert (said == []) if expected is None else (len(said) == 1 and said[0].startswith(expected)), said


# One process of a two-process run on the CPU: 2 host devices each, gloo for the cross-process collectives.
_PROCESS = """
import jax, sys
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from train.loop import main
summary = main(sys.argv[1:])
print("DEVICES", jax.process_index(), jax.process_count(), jax.device_count(), summary["loss"])
"""


def test_two_processes_train_like_one(cp_run, tmp_path):
    """``--multihost`` (jax.distributed): two processes of 2 devices each, the same 2 data x 2 seq mesh and
    the same run as one process of 4 devices: the same losses."""
    want = _train_losses(cp_run[0])
    out = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(repo), JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
    argv = TRAIN_ARGS + ["--context-parallel", "2", "--out", str(out), "--multihost"]
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, *argv], cwd=repo, text=True,
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    for i, (stdout, _) in enumerate(outputs):
        assert f"DEVICES {i} 2 4 " in stdout
    got = _train_losses(out)  # written by process 0 only
    assert sorted(got) == sorted(want)
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


def _cli_error(capsys, argv) -> str:
    assert cli(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_context_parallel_settings_are_clear_errors(tmp_path, capsys):
    base = TRAIN_ARGS + ["--out", str(tmp_path / "o")]
    cases = [
        (["--context-parallel", "3"], "--context-parallel 3 must divide the number of devices (4)"),
        (["--context-parallel", "8"], "--context-parallel 8 must divide the number of devices (4)"),
        (["--context-parallel", "2", "--batch-size", "3"],
         "--batch-size 3 must be divisible by the data-parallel size (devices // N) (2)"),
        (["--context-parallel", "2", "--seq-len", "30"],
         "--seq-len 30 must be divisible by 2 x --context-parallel = 4"),
        (["--context-parallel", "4", "--seq-len", "36"],
         "--seq-len 36 must be divisible by 2 x --context-parallel = 8"),
        (["--context-parallel", "2", "--attention", "xla"],
         "--context-parallel 2 runs ring attention on the Pallas kernels; --attention xla cannot"),
        (["--batch-size", "6"], "--batch-size 6 must be divisible by the number of devices (4)"),
    ]
    for extra, message in cases:
        assert message in _cli_error(capsys, base + extra), extra
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # argparse: not a positive integer
        main(base + ["--context-parallel", "0"])
    with pytest.raises(ValueError, match="--context-parallel must be a positive integer"):
        Parallel.over_devices(0)


def test_rows_and_put_lay_out_a_batch():
    """One process holds every row; ``put`` shards rows over data and zigzag columns over seq."""
    parallel = Parallel.over_devices(2)
    assert parallel.rows(B) == slice(0, B)
    x = np.arange(B * T, dtype=np.int32).reshape(B, T)
    arr = parallel.put(x, B)
    order = parallel.positions(T)
    np.testing.assert_array_equal(np.asarray(arr), x[:, order])
    np.testing.assert_array_equal(np.asarray(zigzag(x, 2, axis=1)), x[:, order])
    for shard in arr.addressable_shards:
        rows, cols = shard.index
        np.testing.assert_array_equal(np.asarray(shard.data), x[:, order][rows, cols])
        assert shard.data.shape == (B // 2, T // 2)



def test_a_validation_split_too_short_for_the_layout_is_refused_before_anything_is_written(tmp_path, capsys):
    """The zigzag layout needs 2N validation tokens (+1 target): a shorter val.bin is a user error found with the
    other checks, before the run folder (config.json) is written, fresh or resumed."""
    data = tmp_path / "tokens"
    data.mkdir()
    np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16).tofile(data / "train.bin")
    np.arange(3, dtype=np.uint16).tofile(data / "val.bin")
    out = tmp_path / "o"
    argv = TRAIN_ARGS + ["--data", str(data), "--vocab-size", "256", "--context-parallel", "2", "--out", str(out)]
    error = _cli_error(capsys, argv)
    assert "the validation split (3 tokens) is shorter than one zigzag layout of 2 x --context-parallel = 4" in error
    assert not out.exists()
    # A run without context parallelism trains on it; resuming it with --context-parallel 2 changes nothing there.
    assert cli(argv[:-4] + ["--attention", "xla", "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()  # its progress bar
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    error = _cli_error(capsys, ["--resume", "--out", str(out), "--context-parallel", "2", "--attention", "pallas",
                                  "--steps", "4"])
    assert "is shorter than one zigzag layout" in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
