"""train's data: the default corpus, the files it reads, the batch sampler, the run folder's metrics log and
the paths the CLI refuses."""

import json

import numpy as np
import pytest

from train import data as data_lib
from train.config import build_parser


def test_default_data_is_the_stdlib():
    data = data_lib.load_data(max_stdlib_bytes=300_000)
    assert data.kind == "bytes" and data.vocab_size == 256
    n = len(data.train) + len(data.val)
    assert 100_000 < n <= 300_000
    assert len(data.val) == int(n * 0.05)
    assert b"import" in bytes(data.train[:200_000])
    again = data_lib.load_data(max_stdlib_bytes=300_000)
    np.testing.assert_array_equal(again.train, data.train)


def test_sampler_is_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(seq_len=16, batch_size=4, grad_accum=2)
    a = data_lib.BatchSampler(tokens, seed=1, **kw)
    first = [next(a) for _ in range(5)]
    x, y = first[0]
    assert x.shape == y.shape == (2, 4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # targets are shifted inputs
    np.testing.assert_array_equal(y, x + 1)
    # A fresh sampler resumed at position 3 continues with the same batches.
    b = data_lib.BatchSampler(tokens, seed=1, position=3, **kw)
    for want in first[3:]:
        got = next(b)
        np.testing.assert_array_equal(got[0], want[0])
    assert b.position == 5
    # The seed changes the order; rows select a host's share of the same batch.
    c = data_lib.BatchSampler(tokens, seed=2, **kw)
    assert not np.array_equal(c.batch(0)[0], first[0][0])
    np.testing.assert_array_equal(a.batch(0, slice(2, 4))[0], first[0][0][:, 2:4])


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        data_lib.BatchSampler(np.zeros(100, np.uint8), seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="shorter than seq_len"):
        data_lib.BatchSampler(np.zeros(10, np.uint8), seq_len=16, batch_size=1)


def test_sampler_refuses_a_seed_past_32_bits_and_a_negative_step():
    """(seed, step) goes to numpy's SeedSequence as 32-bit words: a seed of 2**32 is the words [0, 1], so its
    batch 0 was seed 0's batch 1. Such a seed (a bool, a negative step or position) is refused, naming it."""
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(seq_len=8, batch_size=4)
    for seed in (2**32, 2**32 + 1, -1, True, 1.0):
        with pytest.raises(ValueError, match="seed must be an int in"):
            data_lib.BatchSampler(tokens, seed=seed, **kw)
    for position in (-1, True, 1.5):
        with pytest.raises(ValueError, match="position must be a non-negative int"):
            data_lib.BatchSampler(tokens, position=position, **kw)
    sampler = data_lib.BatchSampler(tokens, seed=2**32 - 1, **kw)
    for step in (-1, False, 2.0):
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            sampler.batch(step)
    sampler.position = -2  # the loop sets it from a checkpoint
    with pytest.raises(ValueError, match="step must be a non-negative int, got -2"):
        next(sampler)


def test_data_formats(tmp_path):
    text = tmp_path / "input.txt"
    text.write_bytes(b"hello world\n" * 1000)
    d = data_lib.load_data(text)
    assert d.kind == "bytes" and isinstance(d.train, np.memmap)
    assert d.decode(d.train[:5]) == "hello"
    assert len(d.train) + len(d.val) == 12_000

    folder = tmp_path / "owt"
    folder.mkdir()
    np.arange(5000, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(folder / "val.bin")
    d = data_lib.load_data(folder)
    assert d.kind == "tokens" and d.vocab_size == 50304
    assert len(d.train) == 5000 and len(d.val) == 300 and int(d.train[4999]) == 4999
    assert data_lib.load_data(folder, vocab_size=5000).vocab_size == 5000  # ids 0..4999 fit
    assert d.description == f"{folder}/train.bin (5,000 uint16 tokens), val.bin (300)"
    d = data_lib.load_data(folder / "train.bin")
    assert len(d.train) == 4750 and len(d.val) == 250
    (folder / "val.bin").unlink()  # the last 5% of train.bin is the validation split; the file holds 5,000
    d = data_lib.load_data(folder)
    assert (len(d.train), len(d.val)) == (4750, 250) and d.description == f"{folder}/train.bin (5,000 uint16 tokens)"

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "b.txt").write_bytes(b"B" * 100)
    (texts / "a.txt").write_bytes(b"A" * 100)
    d = data_lib.load_data(texts)
    assert d.decode(d.train[:3]) == "AAA" and len(d.train) == 190
    for source in (text, texts):  # bytes have 256: a vocabulary given for them would be ignored
        with pytest.raises(ValueError, match=f"--vocab-size 10 applies to .bin token data; the byte data of {source}"):
            data_lib.load_data(source, vocab_size=10)
        assert data_lib.load_data(source, vocab_size=256).vocab_size == 256

    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_lib.load_data(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        data_lib.load_data(tmp_path / "empty.txt")

    # A token folder without a readable train.bin is an error, not a folder of bytes to train on.
    no_train = tmp_path / "no_train"
    no_train.mkdir()
    np.arange(300, dtype=np.uint16).tofile(no_train / "val.bin")
    with pytest.raises(ValueError, match=r"holds token files \(val.bin\) but no readable train.bin"):
        data_lib.load_data(no_train)
    (no_train / "train.bin").symlink_to(tmp_path / "gone.bin")  # a broken link
    with pytest.raises(ValueError, match=r"\(train.bin, val.bin\) but no readable train.bin"):
        data_lib.load_data(no_train)


def test_empty_paths_are_refused(capsys):
    """An unset shell variable gives ``--out ""`` (the default run folder would be used) or ``--data ""`` (the
    working directory's bytes would be trained on): argparse refuses both, naming the flag."""
    for flag in ("--out", "--data"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([flag, ""])
        assert f"argument {flag}: must be a non-empty path" in capsys.readouterr().err


def test_metrics_log_appends_after_a_last_line_without_newline(tmp_path):
    """A hand-repaired metrics.jsonl may end without a newline: the next record goes on a line of its own."""
    from train.run_folder import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.5}')
    log = MetricsLog(path, enabled=True)
    log.write({"step": 22, "loss": 2.4})
    log.write({"step": 24, "loss": 2.3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20, 22, 24]
    assert [s for s, _ in MetricsLog(path, enabled=True).lines] == [10, 20, 22, 24]
