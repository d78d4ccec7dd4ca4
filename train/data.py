"""Token streams and a deterministic, resumable batch sampler.

Sources (:func:`load_data`):

* ``None`` (default): the Python standard library's own ``*.py`` files, which
  exist on every machine that runs this code and need no network. Files under
  ``sysconfig.get_paths()["stdlib"]`` are taken in sorted path order (test
  suites, ``site-packages`` and caches skipped) until about 4 MiB, as bytes
  (vocabulary 256). The same Python version gives the same bytes everywhere.
* a text file: its bytes, memory-mapped (vocabulary 256).
* a folder with ``train.bin`` (and optionally ``val.bin``): nanoGPT-style
  ``uint16`` token files, memory-mapped (vocabulary 50304 unless given).
* a ``.bin`` file: ``uint16`` tokens, memory-mapped.
* any other folder: all its files' bytes, in sorted path order.

A run folder (``--out``) inside a byte folder is refused (:func:`check_out_outside`): the run would train on
its own checkpoints. :attr:`TokenData.fingerprint` (kind, split lengths, a hash of the tokens) goes into every
checkpoint; :func:`check_fingerprint` refuses to resume on other data.

Unless the source has its own ``val.bin``, the last 5% of the stream is the
validation split. Token files are checked when loaded: a whole number of
``uint16`` values, every id below the vocabulary (an id past it would turn
the loss into NaN); :func:`check_length` checks that a source holds a sequence.

:class:`BatchSampler` draws random windows, but the windows of step ``s``
depend only on ``(seed, s)``: the sampler's whole state is the step counter,
so resuming a run reproduces exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
from typing import Any

import numpy as np

from pallas_flash.validate import is_int

__all__ = [
    "BYTE_VOCAB",
    "BatchSampler",
    "GPT2_VOCAB",
    "TokenData",
    "check_fingerprint",
    "check_length",
    "check_out_outside",
    "eval_batches",
    "load_data",
    "stdlib_bytes",
]

BYTE_VOCAB = 256
GPT2_VOCAB = 50304  # GPT-2's 50257 BPE tokens padded to a multiple of 64
DEFAULT_STDLIB_BYTES = 4 * 2**20
VAL_FRACTION = 0.05
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_VAL_SEED = 0x5EED  # validation windows do not depend on the training seed
SEED_LIMIT = 2**32  # a sampler's seed is one 32-bit word (BatchSampler.batch)


@dataclasses.dataclass(frozen=True)
class TokenData:
    """A train and a validation token stream (1-D integer arrays or memmaps)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    kind: str  # "bytes" or "tokens"
    description: str
    source: str = "the Python stdlib sources"  # what --data named, for messages

    def decode(self, tokens) -> str:
        """Text for byte tokens; the ids themselves for other tokenisations."""
        tokens = np.asarray(tokens)
        if self.kind == "bytes":
            return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        return " ".join(str(int(t)) for t in tokens)

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of its data: kind, vocabulary, split lengths, a hash of every token."""
        digest, chunk = hashlib.blake2b(digest_size=16), 1 << 24
        for tokens in (self.train, self.val):
            for begin in range(0, len(tokens), chunk):
                digest.update(np.ascontiguousarray(tokens[begin:begin + chunk]))
        return {"kind": self.kind, "vocab_size": self.vocab_size, "train_tokens": len(self.train),
                "val_tokens": len(self.val), "blake2b": digest.hexdigest()}


def check_fingerprint(saved: dict[str, Any] | None, data: TokenData, checkpoint: str) -> None:
    """``data`` is what ``checkpoint`` was trained on (``saved``, its fingerprint; None: older, not recorded)."""
    if saved is None:
        return
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in data.fingerprint.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"--data {data.source} is not the data {checkpoint} was trained on ({'; '.join(changed)}); "
                         f"resume on that data, or start a new run in another --out")


def check_out_outside(source: str | pathlib.Path | None, out: str | pathlib.Path) -> None:
    """A byte folder is read whole: a run folder inside it would train on its own checkpoints and metrics."""
    path = pathlib.Path(source) if source is not None else None
    if path is None or not path.is_dir() or (path / "train.bin").is_file():
        return
    if pathlib.Path(out).resolve().is_relative_to(path.resolve()):
        raise ValueError(f"--out {out} is inside the --data folder {path}, all of whose files are training data: "
                         f"the run would train on its own checkpoints; choose an --out outside it")


def stdlib_bytes(max_bytes: int = DEFAULT_STDLIB_BYTES) -> tuple[bytes, int]:
    """The standard library's ``*.py`` sources, sorted by path, up to ``max_bytes``.

    Whole files are taken until the next one would pass the cap. Returns the
    bytes and the number of files.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {root} does not exist")
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts) and p.is_file()
    )
    chunks, total = [], 0
    for p in files:
        data = p.read_bytes()
        if chunks and total + len(data) > max_bytes:
            break
        chunks.append(data)
        total += len(data)
    if not chunks:
        raise FileNotFoundError(f"no *.py files found under {root}")
    return b"".join(chunks), len(chunks)


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(int(len(tokens) * val_fraction), 1)
    return tokens[:-n_val], tokens[-n_val:]


def _tokens_memmap(path: pathlib.Path, vocab_size: int) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"--data file {path} is empty")
    if size % 2:
        raise ValueError(
            f"--data file {path} is {size:,} bytes, not a whole number of uint16 tokens "
            f"(2 bytes each): a .bin file holds uint16 token ids"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    _check_token_ids(tokens, vocab_size, path)
    return tokens


def _check_token_ids(tokens: np.ndarray, vocab_size: int, path: pathlib.Path,
                     chunk: int = 1 << 26) -> None:
    """Every id below ``vocab_size`` (one pass, ``chunk`` tokens at a time)."""
    if vocab_size > np.iinfo(tokens.dtype).max:
        return
    for begin in range(0, len(tokens), chunk):
        part = np.asarray(tokens[begin:begin + chunk])
        if part.max() >= vocab_size:
            i = int(np.argmax(part >= vocab_size))
            raise ValueError(
                f"--data file {path} holds token id {int(part[i])} (at token {begin + i:,}), "
                f"not below the vocabulary size {vocab_size} (--vocab-size, default {GPT2_VOCAB})"
            )


def load_data(
    path: str | pathlib.Path | None = None,
    *,
    vocab_size: int | None = None,
    val_fraction: float = VAL_FRACTION,
    max_stdlib_bytes: int = DEFAULT_STDLIB_BYTES,
) -> TokenData:
    """Load a token source (see the module docstring for the formats).

    Args:
      path: ``None`` for the standard-library default, else a file or folder.
      vocab_size: vocabulary of ``.bin`` token files (default 50304); byte
        sources always have 256 (another one is refused with ``ValueError``).
      val_fraction: share of the stream held out when there is no ``val.bin``.
      max_stdlib_bytes: cap for the default source.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    source = None if path is None else pathlib.Path(path)
    is_tokens = source is not None and (source.suffix == ".bin" or source.is_dir() and any(source.glob("*.bin")))
    # Byte data has 256 ids: a vocabulary given for it would be ignored.
    if vocab_size not in (None, BYTE_VOCAB) and not is_tokens and (source is None or source.exists()):
        raise ValueError(f"--vocab-size {vocab_size} applies to .bin token data; the byte data of "
                         f"{'the default source' if path is None else path} has a vocabulary of {BYTE_VOCAB}")
    if path is None:
        data, n_files = stdlib_bytes(max_stdlib_bytes)
        train, val = _split(np.frombuffer(data, dtype=np.uint8), val_fraction)
        return TokenData(
            train, val, BYTE_VOCAB, "bytes",
            f"Python stdlib sources ({n_files} files, {len(data) / 2**20:.1f} MiB, bytes)",
        )

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")

    vocab = vocab_size or GPT2_VOCAB
    token_files = sorted(f.name for f in path.glob("*.bin")) if path.is_dir() else []
    if token_files and not (path / "train.bin").is_file():  # else it would train on these files' bytes
        raise ValueError(
            f"--data folder {path} holds token files ({', '.join(token_files)}) but no readable train.bin: a token "
            "folder needs train.bin (uint16 ids; val.bin is optional)")
    if path.is_dir() and (path / "train.bin").is_file():
        train = _tokens_memmap(path / "train.bin", vocab)
        desc = f"{path}/train.bin ({len(train):,} uint16 tokens)"  # the file's, before any split
        if (path / "val.bin").is_file():
            val = _tokens_memmap(path / "val.bin", vocab)
            desc += f", val.bin ({len(val):,})"
        else:
            train, val = _split(train, val_fraction)
        return TokenData(train, val, vocab, "tokens", desc, str(path))
    if path.is_file() and path.suffix == ".bin":
        train, val = _split(_tokens_memmap(path, vocab), val_fraction)
        return TokenData(
            train, val, vocab, "tokens", f"{path} ({len(train) + len(val):,} uint16 tokens)", str(path),
        )
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"--data file {path} is empty")
        tokens = np.memmap(path, dtype=np.uint8, mode="r")
        desc = f"{path} ({len(tokens) / 2**20:.1f} MiB, bytes)"
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        data = b"".join(p.read_bytes() for p in files)
        if not data:
            raise ValueError(f"--data folder {path} has no non-empty files")
        tokens = np.frombuffer(data, dtype=np.uint8)
        desc = f"{path} ({len(files)} files, {len(data) / 2**20:.1f} MiB, bytes)"
    train, val = _split(tokens, val_fraction)
    return TokenData(train, val, BYTE_VOCAB, "bytes", desc, str(path))


def check_length(data: TokenData, seq_len: int) -> None:
    """The training split holds a sequence of ``seq_len`` (+1 target), the validation split 2 tokens."""
    if len(data.train) < seq_len + 1:
        raise ValueError(
            f"--data {data.source}: the training split has {len(data.train):,} tokens, fewer than "
            f"--seq-len + 1 ({seq_len + 1}); use a smaller --seq-len or more data"
        )
    if len(data.val) < 2:
        raise ValueError(
            f"--data {data.source}: the validation split has {len(data.val)} token(s); it needs at "
            f"least 2 (more data, or a longer val.bin)"
        )


class BatchSampler:
    """Random windows ``(x, y = x shifted by one)`` that depend only on (seed, step).

    ``batch(step)`` returns int32 arrays ``[grad_accum, batch_size, seq_len]``.
    Iterating yields ``batch(position)`` and advances ``position``; saving
    ``position`` (the number of batches consumed) is all it takes to resume.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        position: int = 0,
    ):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not is_int(seed) or not 0 <= seed < SEED_LIMIT:  # one 32-bit word: see batch()
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        _check_step("position", position)
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the token stream ({len(tokens)} tokens) is shorter than seq_len + 1 "
                f"({seq_len + 1}); use a smaller --seq-len or more data"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.position = position

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """The batch of ``step``; ``rows`` selects part of the batch axis (one host's share).

        ``(seed, step)`` reach ``SeedSequence`` as 32-bit words (an int past 2**32 takes two), so the seed
        must be one word: a seed of 2**32, the words [0, 1], would give seed 0's batch 1 at its step 0.
        """
        _check_step("step", step)
        rng = np.random.default_rng([self.seed, step])
        n = self.grad_accum * self.batch_size
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=n)
        starts = starts.reshape(self.grad_accum, self.batch_size)[:, rows]
        window = starts[..., None] + np.arange(self.seq_len + 1)  # [A, b, T + 1]
        chunk = np.asarray(self.tokens[window], dtype=np.int32)
        return chunk[..., :-1], chunk[..., 1:]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        out = self.batch(self.position)
        self.position += 1
        return out


def _check_step(name: str, value) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int, rows: slice = slice(None)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of validation batches ``[batch_size, seq_len]`` (seed-independent).

    ``rows`` selects this host's share of each batch, as in :meth:`BatchSampler.batch`.
    """
    sampler = BatchSampler(tokens, seq_len=seq_len, batch_size=batch_size, seed=_VAL_SEED)
    out = []
    for i in range(n_batches):
        x, y = sampler.batch(i, rows)
        out.append((x[0], y[0]))
    return out
