"""Attention dropout's keep-mask: a counter-based hash, written once.

The kernels never store a dropout mask: each one regenerates the keep bit of
element ``(batch, head, row, col)`` from the call's 64-bit seed, in the
forward and again in both backward kernels, with ``keep_mask`` below. Tests
and the reference call the same function on whole coordinate grids.

The hash is Chris Wellons' ``lowbias32`` integer finaliser, chained over the
coordinates in ``uint32`` arithmetic (wrapping multiply, logical shift, xor;
all plain integer ops in Triton and XLA):

    head_key = mix(mix(seed0 ^ (batch * N + head) * GOLDEN) + seed1)
    row_key  = mix(head_key ^ row * C_ROW)
    bits     = mix(row_key + col * C_COL)
    keep     = bits >= threshold,   threshold = round(rate * 2**32)

so an element is kept with probability ``1 - rate`` (to within 2**-32). The
per-head and per-row keys are computed once per tile row; each element costs
one ``mix`` (two multiplies, three shifts, three xors) and a compare.

``batch``, ``head`` and ``N`` are global: a kernel running on one shard of a
batch- or head-sharded call (``pallas_flash.sharding.partition``) gets the
seed extended by ``shard_seed`` with its first batch row, first head and the
global head count, and adds them to its own program ids, so the same key
gives the same mask sharded or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["seed_from_key", "keep_mask", "keep_threshold", "full_keep_mask", "shard_seed"]

# Words of a seed: the key's two, then (only on a shard of a partitioned call)
# the shard's first batch row, first query head and the global number of heads.
SEED_WORDS = 2
SHARD_SEED_WORDS = 5

_U32 = np.uint32
GOLDEN = 0x9E3779B9
C_ROW = 0x85EBCA6B
C_COL = 0xC2B2AE35
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _u32(x):
    # numpy scalars stay literals inside a kernel (no captured array constants).
    return np.uint32(x) if isinstance(x, int) else jnp.asarray(x).astype(jnp.uint32)


def _mix(x):
    """lowbias32: a bijective uint32 -> uint32 finaliser with good avalanche."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(_M1)
    x = x ^ (x >> _U32(15))
    x = x * _U32(_M2)
    x = x ^ (x >> _U32(16))
    return x


def keep_threshold(rate: float) -> int:
    """``bits >= threshold`` keeps an element with probability ``1 - rate``."""
    return min(int(round(rate * 2.0**32)), 2**32 - 1)


def head_key(seed0, seed1, batch, head, num_heads: int):
    """The per-(batch, head) key; ``batch``/``head`` may be int32 scalars or arrays."""
    bh = _u32(batch) * _u32(num_heads) + _u32(head)
    return _mix(_mix(_u32(seed0) ^ (bh * _U32(GOLDEN))) + _u32(seed1))


def seed_head_key(seed, batch, head, num_heads: int):
    """``head_key`` from a seed of ``SEED_WORDS`` or ``SHARD_SEED_WORDS`` words (a kernel's seed ref, or an array).

    A shard's seed carries its global offsets: ``batch``/``head`` are then the
    shard's own indices and become global here, and ``num_heads`` (the shard's
    count) gives way to the global one.
    """
    if seed.shape[0] == SHARD_SEED_WORDS:
        batch = _u32(batch) + seed[2]
        head = _u32(head) + seed[3]
        num_heads = seed[4]
    return head_key(seed[0], seed[1], batch, head, num_heads)


def shard_seed(seed, offsets) -> jax.Array:
    """The seed of one shard: ``seed`` (uint32 [2]) and ``offsets`` = uint32 ``[first batch row, first head, heads in all]``."""
    return jnp.concatenate([jnp.asarray(seed, jnp.uint32), jnp.asarray(offsets, jnp.uint32)])


def keep_mask(key, rows, cols, *, rate: float):
    """Keep bits for broadcastable absolute ``rows`` (query positions) and ``cols`` (key positions).

    ``key`` is ``head_key(...)`` (scalar in a kernel, any broadcastable shape
    elsewhere). Returns a boolean array of the broadcast shape.
    """
    row_key = _mix(key ^ (_u32(rows) * _U32(C_ROW)))
    bits = _mix(row_key + _u32(cols) * _U32(C_COL))
    return bits >= _U32(keep_threshold(rate))


def seed_from_key(dropout_rng) -> jax.Array:
    """The two ``uint32`` seed words the kernels hash with, drawn from a JAX PRNG key."""
    return jax.random.bits(dropout_rng, (2,), jnp.uint32)


def full_keep_mask(seed, batch: int, num_heads: int, seq_q: int, seq_k: int, *, rate: float) -> jax.Array:
    """The whole boolean ``[B, N, Tq, Tk]`` keep-mask, for tests and the reference only."""
    seed = jnp.asarray(seed, jnp.uint32)
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None]
    rows = jnp.arange(seq_q, dtype=jnp.int32)[:, None]
    cols = jnp.arange(seq_k, dtype=jnp.int32)[None, :]
    key = head_key(seed[0], seed[1], b, h, num_heads)
    return keep_mask(key, rows, cols, rate=rate)
