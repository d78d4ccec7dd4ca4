"""The zigzag sequence layout for causal context parallelism.

Causal attention over a sequence split contiguously across ``n`` devices gives
device ``n - 1`` the most work (its queries see every key) and device 0 the
least. The zigzag layout cuts the sequence into ``2n`` equal chunks and gives
device ``i`` chunks ``i`` and ``2n - 1 - i``: one light and one heavy, the same
work on every device. ``zigzag`` reorders a sequence axis so that sharding it
contiguously over ``n`` devices gives each device its two chunks;
``unzigzag`` is its inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["zigzag", "unzigzag", "zigzag_chunks"]


def zigzag_chunks(n: int) -> list[int]:
    """The chunk order of the zigzag layout: ``[0, 2n-1, 1, 2n-2, ...]`` (device i holds positions 2i, 2i+1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of devices) must be a positive int, got {n!r}")
    order = []
    for i in range(n):
        order += [i, 2 * n - 1 - i]
    return order


def _check(x, n: int, axis: int) -> int:
    zigzag_chunks(n)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {tuple(x.shape)}")
    axis %= x.ndim
    if x.shape[axis] % (2 * n):
        raise ValueError(
            f"the zigzag layout cuts axis {axis} into 2n = {2 * n} equal chunks, but its length is "
            f"{x.shape[axis]} (shape {tuple(x.shape)})"
        )
    return axis


def _reorder(x, order: list[int], axis: int):
    chunks = jnp.split(x, len(order), axis=axis)
    return jnp.concatenate([chunks[c] for c in order], axis=axis)


def zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """``x`` with its ``axis`` (default 1, the sequence of ``[B, T, ...]``) in zigzag order for ``n`` devices."""
    axis = _check(x, n, axis)
    return _reorder(x, zigzag_chunks(n), axis)


def unzigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The inverse of ``zigzag``: back to sequence order."""
    axis = _check(x, n, axis)
    order = zigzag_chunks(n)
    inverse = [order.index(c) for c in range(len(order))]
    return _reorder(x, inverse, axis)
