"""How a run spreads over devices: the mesh, the batch layout, context parallelism.

Every run has a 2-D mesh ``("data", "seq")`` of shape ``(devices // N, N)``,
``N = --context-parallel`` (default 1):

* the batch is sharded over ``data`` (data parallelism: each device trains on
  its own rows; the attention kernels partition over the batch under ``jit``,
  so nothing is gathered; XLA all-reduces the gradients);
* with ``N > 1`` the sequence is sharded over ``seq`` (context parallelism):
  every attention layer runs ring attention over the ``N`` devices of ``seq``
  (:class:`pallas_flash.nnx.ContextParallel`), in the zigzag layout that
  balances causal work. The host puts each batch's columns in zigzag order
  before it reaches the devices (inputs and targets alike, so the mean loss is
  unchanged), and the model embeds the permuted positions;
* parameters and optimizer state are replicated.

Several processes (``jax.distributed``): ``jax.devices()`` lists every
process's devices in process order, so with ``N`` dividing the devices of one
process each process holds whole rows of the batch. :meth:`Parallel.rows` is
the rows this process's devices hold (read from the sharding, whatever the
mesh), the only ones it loads; :meth:`Parallel.put` builds the global array
from them (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash.nnx import ContextParallel

__all__ = ["Parallel", "eval_length"]


@dataclasses.dataclass(frozen=True)
class Parallel:
    """The mesh of a run and where its arrays live on it."""

    mesh: Mesh

    @classmethod
    def over_devices(cls, context_parallel: int = 1, devices: list[jax.Device] | None = None) -> Parallel:
        """``(len(devices) // context_parallel) x context_parallel`` devices named ``("data", "seq")``."""
        devices = jax.devices() if devices is None else devices
        n = context_parallel
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--context-parallel must be a positive integer, got {n!r}")
        if len(devices) % n:
            raise ValueError(
                f"--context-parallel {n} must divide the number of devices ({len(devices)}): the mesh is "
                f"(devices // {n} data) x ({n} seq)")
        mesh = jax.make_mesh((len(devices) // n, n), ("data", "seq"), axis_types=(AxisType.Auto,) * 2,
                             devices=devices)
        return cls(mesh)

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"]

    @property
    def seq_size(self) -> int:
        return self.mesh.shape["seq"]

    @property
    def context_parallel(self) -> ContextParallel | None:
        """The models' ring-attention setting, or None without context parallelism."""
        if self.seq_size == 1:
            return None
        return ContextParallel(self.mesh, seq_axis="seq", batch_axis="data", layout="zigzag")

    def check(self, *, batch_size: int, seq_len: int) -> None:
        """What the batch shape needs of the mesh (``ValueError`` naming the flag)."""
        if batch_size % self.data_size:
            what = "the number of devices" if self.seq_size == 1 else "the data-parallel size (devices // N)"
            raise ValueError(
                f"--batch-size {batch_size} must be divisible by {what} ({self.data_size}) for data-parallel "
                f"training")
        if self.seq_size > 1 and seq_len % (2 * self.seq_size):
            raise ValueError(
                f"--seq-len {seq_len} must be divisible by 2 x --context-parallel = {2 * self.seq_size}: the "
                f"zigzag layout cuts each sequence into that many equal chunks")

    def eval_len(self, seq_len: int, val_tokens: int) -> int:
        """The validation sequence length: ``seq_len``, or what the validation split holds, cut to the layout."""
        return eval_length(seq_len, val_tokens, self.seq_size)

    def positions(self, seq_len: int) -> np.ndarray:
        """int32 ``[seq_len]``: the original position of each column of a batch as the devices hold it."""
        cp = self.context_parallel
        return np.arange(seq_len, dtype=np.int32) if cp is None else cp.order(seq_len)

    def batch_sharding(self, rank: int) -> NamedSharding:
        """``[..., B, T]`` token arrays (rank 2: ``[B, T]``, rank 3: ``[A, B, T]``): rows over data, columns over seq."""
        return NamedSharding(self.mesh, P(*(None,) * (rank - 2), "data", "seq"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def replicate(self, value) -> jax.Array:
        """A host value (the same on every process) as a global array on every device."""
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(value))

    def rows(self, batch_size: int) -> slice:
        """The rows of a ``[batch_size, T]`` batch that this process's devices hold (a contiguous block)."""
        index = self.batch_sharding(2).addressable_devices_indices_map((batch_size, 2 * self.seq_size))
        held = sorted({(s[0].indices(batch_size)[:2]) for s in index.values()})
        lo, hi = held[0][0], max(stop for _, stop in held)
        if sum(stop - start for start, stop in held) != hi - lo:
            raise ValueError(
                f"this process's devices hold rows {held} of the batch, not one contiguous block; build the mesh "
                f"from devices in process order")
        return slice(lo, hi)

    def put(self, rows: np.ndarray, batch_size: int) -> jax.Array:
        """The global ``[..., batch_size, T]`` array from this process's ``rows`` (:meth:`rows`), in device order.

        The columns are put in the layout's order here (:meth:`positions`);
        each device then takes its own rows and columns.
        """
        rows = np.asarray(rows)
        rows = rows[..., self.positions(rows.shape[-1])] if self.seq_size > 1 else rows
        global_shape = rows.shape[:-2] + (batch_size, rows.shape[-1])
        return jax.make_array_from_process_local_data(self.batch_sharding(rows.ndim), rows, global_shape)


def eval_length(seq_len: int, val_tokens: int, seq_size: int) -> int:
    """The validation sequence length on ``seq_size`` sequence shards: ``seq_len``, or what the validation split
    holds, cut to a multiple of the zigzag layout's ``2 x seq_size``."""
    length = min(seq_len, val_tokens - 1)
    if seq_size > 1:
        length -= length % (2 * seq_size)
        if length == 0:
            raise ValueError(
                f"the validation split ({val_tokens} tokens) is shorter than one zigzag layout of "
                f"2 x --context-parallel = {2 * seq_size} tokens (+1 target)")
    return length
