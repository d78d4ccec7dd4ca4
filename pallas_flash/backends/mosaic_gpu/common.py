"""What the Mosaic GPU kernels share: warpgroup roles, register split, layouts, shared-memory tiles, the loads.

Every kernel (``forward.py``'s, ``backward_dkdv.py``'s dK/dV kernel,
``backward_dq.py``'s dQ kernel, ``backward_wide.py``'s two) runs one CTA of
two compute warpgroups and one memory warpgroup. The memory warpgroup's two
loops are here: ``stream_kv_blocks`` (the forward and the dQ kernels: K/V
blocks) and ``stream_query_blocks`` (the dK/dV kernels: Q/dO blocks and their
``lse2``/``delta`` rows, over the GQA group's query heads). ``mma`` is the one
place a backward wgmma takes its left operand from registers: in interpret
mode (no interpreter rule for that in jax 0.11.2) it is fed from a
shared-memory copy instead. ``segment_block_ranges`` gives each tile the
blocks its segment ids reach. The last section holds the head-dim-256 role
split's pieces: its window/causal mask and the P tiles one warpgroup hands the
other.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu import occupancy

COMPUTE_WGS = 2
MEMORY_WG = COMPUTE_WGS
# Registers per thread after the warpgroups rebalance them (2 * 232 + 40 warps' worth <= 64K).
COMPUTE_REGISTERS = 232
MEMORY_REGISTERS = 40
# The same for the forward with three compute warpgroups (3 * 160 + 32 warps' worth = 64K; FlashAttention-3's split).
REGISTERS_BY_COMPUTE_WGS = {2: (COMPUTE_REGISTERS, MEMORY_REGISTERS), 3: (160, 32)}
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
i32 = functools.partial(jnp.asarray, dtype=jnp.int32)  # loop bounds stay int32 under jax_enable_x64


def tiled_smem(shape, dtype, swizzle: int = 128):
    """Shared memory in the wgmma/TMA operand layout: 8-row tiles one swizzle span wide."""
    cols = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(swizzle)))


@dataclasses.dataclass(frozen=True)
class CtaOrder:
    """The grid of a backward kernel with one CTA per (batch row, head, tile), and the order the GPU hands its CTAs
    out in. Pallas runs the last grid axis fastest. ``group`` None: heads outermost, the grid (batch, head, tile);
    else by length within groups of ``group`` (batch row, head) pairs, group after group: (tile, batch, head) when
    the group is every pair, else (group, tile, pair in the group)."""

    batch: int
    heads: int
    tiles: int
    group: int | None
    head_name: str
    tile_name: str

    @property
    def axes(self) -> tuple[tuple[int, str], tuple[int, str], tuple[int, str]]:
        """``(size, name)`` of each grid axis, outermost first."""
        pairs = self.batch * self.heads
        if self.group is None:
            return (self.batch, "batch"), (self.heads, self.head_name), (self.tiles, self.tile_name)
        if self.group == pairs:
            return (self.tiles, self.tile_name), (self.batch, "batch"), (self.heads, self.head_name)
        return (pairs // self.group, "head_group"), (self.tiles, self.tile_name), (self.group, "in_group")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(size for size, _ in self.axes)

    @property
    def grid_names(self) -> tuple[str, str, str]:
        return tuple(name for _, name in self.axes)

    def coords(self):
        """``(batch, head, tile)`` of this CTA (inside the kernel)."""
        if self.group is None or self.group == self.batch * self.heads:
            return lax.axis_index("batch"), lax.axis_index(self.head_name), lax.axis_index(self.tile_name)
        pair = lax.axis_index("head_group") * self.group + lax.axis_index("in_group")
        heads = jnp.int32(self.heads)
        return lax.div(pair, heads), lax.rem(pair, heads), lax.axis_index(self.tile_name)


def backward_grid(batch: int, heads: int, tiles: int, *, causal: bool, head_name: str, tile_name: str) -> CtaOrder:
    """The ``CtaOrder`` of a backward kernel: under causal by length within groups of ``occupancy.BACKWARD_HEAD_GROUP``
    (batch row, head) pairs (the largest divisor of the pairs up to it); where that is 1 (no group, or no divisor),
    by length over every pair when the grid is small (``occupancy.backward_by_length``); else heads outermost."""
    pairs = batch * heads
    group = occupancy.head_group(pairs, occupancy.BACKWARD_HEAD_GROUP if causal else None)
    if group is None:
        group = pairs if occupancy.backward_by_length(pairs * tiles, tiles, causal=causal) else None
    return CtaOrder(batch, heads, tiles, group, head_name, tile_name)


def interpret_warpgroups() -> int:
    """How many warpgroups of one CTA Mosaic GPU's interpreter can run on this host. It runs each warpgroup as an
    XLA computation on the CPU client, dispatched from a host thread of its own; where that computation runs is
    the CPU runtime's choice: inline on the dispatching thread, or on the client's thread pool, whose size is the
    larger of the schedulable CPUs and the CPU devices. A warpgroup queued for a pool thread that the others hold,
    blocked on barriers only it would arrive at, never gets one: a hang, not an error. Which warpgroups go to the
    pool varies from run to run and kernel to kernel (jax 0.11.2, 2 CPUs, 1 device: the forward's three ran two on
    the pool and one inline, the backward dQ kernel's at times all three on the pool and hung), so only the pool's
    size is safe: the dispatching threads count for nothing."""
    return max(_host_cpus(), len(jax.devices("cpu")))


def interpret_fits(compute_wgs: int) -> bool:
    """Whether a kernel of ``compute_wgs`` compute warpgroups and the memory warpgroup runs in interpret mode here."""
    return compute_wgs + 1 <= interpret_warpgroups()


def _host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch_params(interpret, name: str, compute_wgs: int = COMPUTE_WGS) -> dict:
    """``plgpu.kernel``'s arguments shared by every kernel here: the three warpgroups, approximate math, the
    kernel's ``name`` (what profilers show; ``benchmarks.profile`` counts ``pallas_flash*`` as attention), and
    ``interpret``: False (compiled), True (default interpret mode) or an ``InterpretGPUParams`` (e.g. ``detect_races``).
    ``NotImplementedError`` where the interpreter would hang for want of host threads (``interpret_warpgroups``)."""
    if not isinstance(interpret, plgpu.InterpretGPUParams):
        interpret = plgpu.InterpretGPUParams() if interpret else None
    if interpret is not None and not interpret_fits(compute_wgs):
        raise NotImplementedError(
            f"{name} runs {compute_wgs + 1} warpgroups, and Mosaic GPU's interpret mode can run only "
            f"{interpret_warpgroups()} at once on this host (one thread each of the CPU client's pool: the larger of "
            f"its {_host_cpus()} CPUs and {len(jax.devices('cpu'))} CPU devices); more could hang. Use a "
            "config with fewer compute warpgroups, or more CPU devices (XLA_FLAGS="
            "--xla_force_host_platform_device_count=4, set before JAX starts)"
        )
    return dict(
        num_threads=compute_wgs + 1,
        thread_name="wg",
        kernel_name=name,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )


def clipped_lengths(lengths, seq_len: int):
    """Per-batch lengths as int32 in ``[0, seq_len]``: a length past the array means the whole row."""
    return jnp.clip(lengths.astype(jnp.int32), 0, seq_len)


def _straddling_rows(lengths: jax.Array, block: int) -> jax.Array:
    """``[B, block]``: the row indices of the ``block``-row block holding each batch row's length."""
    starts = (lengths // block) * block
    return starts[:, None] + jnp.arange(block, dtype=starts.dtype)


def straddling_blocks(x: jax.Array, lengths: jax.Array, block: int) -> jax.Array:
    """``[B, block, ...]``: per batch row of ``x`` (``[B, T, ...]``), the ``block``-row block holding its length
    (rows ``(length // block) * block`` on), the rows at or past the length zeroed.

    A kernel loads that block from here instead of ``x`` (``copy_block``): it is the one block it loads whole
    that reaches past the length, and its rows there (padding garbage, NaN) would give ``0 * NaN`` in the
    products that follow. A few rows per batch row in XLA, where zeroing all of ``x`` past the lengths would
    be a pass over the whole array."""
    rows = _straddling_rows(lengths, block)
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    tail = jnp.take_along_axis(x, index, axis=1, mode="clip")  # rows past the array: zeroed below
    live = (rows < lengths[:, None]).reshape(index.shape)
    return jnp.where(live, tail, jnp.zeros((), x.dtype))


def zero_straddling_rows(x: jax.Array, lengths: jax.Array, block: int) -> jax.Array:
    """``x`` (``[B, T, ...]``) with the rows at or past each batch row's length zeroed in the ``block``-row block
    holding that length (``straddling_blocks`` written back in place): for a kernel output whose blocks wholly
    past the length are already zero, the bytes of one block per batch row instead of a pass over ``x``."""
    rows = _straddling_rows(lengths, block)  # rows past T are dropped
    batch = jnp.arange(x.shape[0], dtype=rows.dtype)[:, None]
    return x.at[batch, rows].set(straddling_blocks(x, lengths, block), mode="drop")


def straddling_operands(q, k, v, do, q_lengths, kv_lengths, block: int) -> list:
    """The backward kernels' operands after the lengths: the blocks of ``block`` rows straddling the key
    lengths in ``k`` and ``v``, then those straddling the query lengths in ``q`` and ``dO`` (``pop_tails``)."""
    operands = []
    if kv_lengths is not None:
        operands += [straddling_blocks(k, kv_lengths, block), straddling_blocks(v, kv_lengths, block)]
    if q_lengths is not None:
        operands += [straddling_blocks(q, q_lengths, block), straddling_blocks(do, q_lengths, block)]
    return operands


def pop_tails(refs: list, kv_len_ref, q_len_ref):
    """``(k_tail, v_tail, q_tail, do_tail)`` for ``copy_block``, popped from a kernel's ``refs`` in the order of
    ``straddling_operands`` (each None without its lengths)."""
    k_tail = v_tail = q_tail = do_tail = None
    if kv_len_ref is not None:
        k_tail, v_tail = (refs.pop(0), kv_len_ref), (refs.pop(0), kv_len_ref)
    if q_len_ref is not None:
        q_tail, do_tail = (refs.pop(0), q_len_ref), (refs.pop(0), q_len_ref)
    return k_tail, v_tail, q_tail, do_tail


def copy_block(ref, tail, *, batch, start, block_rows: int, head, dst, barrier):
    """TMA: rows ``start .. start + block_rows - 1`` of ``ref[batch, :, head]`` into ``dst``, arriving on
    ``barrier``. ``tail``: None, or ``(tail_ref, lengths_ref)`` (``tail_ref = straddling_blocks(ref, lengths,
    tail_rows)``): rows inside the batch row's straddling block then come from ``tail_ref``, zeroed past the
    length. ``block_rows`` divides ``tail_rows`` and ``start`` is a multiple of it, so a block is in the
    straddling block or wholly outside it."""
    rows = pl.ds(start, block_rows)
    if tail is None:
        plgpu.copy_gmem_to_smem(ref.at[batch, rows, head], dst, barrier)
        return
    tail_ref, lengths_ref = tail
    tail_rows = tail_ref.shape[1]
    if tail_rows % block_rows:
        raise ValueError(f"copy_block: blocks of {block_rows} rows do not tile a straddling block of {tail_rows}")
    tail_start = lax.div(lengths_ref[batch], jnp.int32(tail_rows)) * tail_rows
    offset = start - tail_start
    in_tail = (offset >= 0) & (offset < tail_rows)

    @pl.when(in_tail)
    def _from_tail():
        plgpu.copy_gmem_to_smem(tail_ref.at[batch, pl.ds(offset, block_rows), head], dst, barrier)

    @pl.when(jnp.logical_not(in_tail))
    def _from_ref():
        plgpu.copy_gmem_to_smem(ref.at[batch, rows, head], dst, barrier)


def bcast(x, shape, dim: int):
    return lax.broadcast_in_dim(x, shape, [dim])


def mma(acc_ref, a, b_ref, stage, interpret: bool):
    """``acc += a @ b`` with ``a`` in registers (through ``stage`` in shared memory in interpret mode)."""
    if interpret:
        stage[...] = a
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, stage, b_ref)
    else:
        plgpu.wgmma(acc_ref, a, b_ref)


def stream_query_blocks(q_ref, do_ref, lse_ref, delta_ref, *, q_smem, do_smem, lse_smem, delta_smem, q_ready,
                        do_ready, q_consumed, do_consumed, batch, kv_head, group, j_lo, n_q, block_q, num_stages,
                        qseg=None, q_tail=None, do_tail=None):
    """Memory warpgroup of a dK/dV kernel: for each query head of the KV head's group, query blocks
    ``j_lo .. j_lo + n_q - 1`` (``Q`` and ``lse2`` on ``q_ready``, ``dO`` and ``delta`` on ``do_ready``) into
    a ring of ``num_stages`` slots, each refilled once both compute warpgroups have released it.
    ``q_tail``/``do_tail``: ``(tail_ref, q_lengths_ref)``, the blocks straddling the query lengths
    (``copy_block``), or None."""
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

    @pl.loop(i32(0), i32(group))
    def _head(g):
        head = kv_head * group + g

        @pl.loop(i32(0), n_q)
        def _load(jj):
            t = g * n_q + jj
            slot = lax.rem(t, jnp.int32(num_stages))
            start = (j_lo + jj) * block_q
            rows = pl.ds(start, block_q)
            refill = t >= num_stages
            pl.when(refill)(lambda: plgpu.barrier_wait(q_consumed.at[slot]))
            copy_block(q_ref, q_tail, batch=batch, start=start, block_rows=block_q, head=head, dst=q_smem.at[slot],
                       barrier=q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], q_ready.at[slot])
            if qseg is not None:  # (ids_ref [Tq], ids_smem [num_stages, block_q]): the rows' segment ids
                plgpu.copy_gmem_to_smem(qseg[0].at[rows], qseg[1].at[slot], q_ready.at[slot])
            pl.when(refill)(lambda: plgpu.barrier_wait(do_consumed.at[slot]))
            copy_block(do_ref, do_tail, batch=batch, start=start, block_rows=block_q, head=head, dst=do_smem.at[slot],
                       barrier=do_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], do_ready.at[slot])

    total = group * n_q

    @pl.loop(jnp.maximum(total - num_stages, 0), total)
    def _drain(t):  # observe the release of the last slots too
        slot = lax.rem(t, jnp.int32(num_stages))
        plgpu.barrier_wait(q_consumed.at[slot])
        plgpu.barrier_wait(do_consumed.at[slot])


def stream_kv_blocks(k_ref, v_ref, *, k_smem, v_smem, k_ready, v_ready, k_consumed, v_consumed, batch, kv_head,
                     num_blocks, block_kv, num_stages, first_step=0, drain=True, first_block=0, kseg=None,
                     k_tail=None, v_tail=None):
    """Memory warpgroup of the forward and the dQ kernels: key blocks ``first_block .. first_block + num_blocks
    - 1`` of one KV head (``K`` on ``k_ready``, ``V`` on ``v_ready``) into a ring of ``num_stages`` slots, each
    refilled once both compute warpgroups have released it; then (``drain``) the release of the last slots is
    observed too.

    ``first_step``: ring steps already taken (a persistent kernel's earlier tiles): the ``n``-th block goes to
    slot ``(first_step + n) % num_stages``. Returns the steps taken so far, ``first_step + num_blocks``.
    ``kseg``: ``(ids_ref [Tk], ids_smem [num_stages, block_kv])``, the keys' segment ids, loaded with K.
    ``k_tail``/``v_tail``: ``(tail_ref, kv_lengths_ref)``, the blocks straddling the key lengths
    (``copy_block``), or None.
    """
    num_blocks = i32(num_blocks)

    @pl.loop(i32(0), num_blocks)
    def _load(n):
        step = first_step + n
        slot = lax.rem(step, jnp.int32(num_stages))
        start = (first_block + n) * block_kv
        rows = pl.ds(start, block_kv)
        refill = step >= num_stages
        pl.when(refill)(lambda: plgpu.barrier_wait(k_consumed.at[slot]))
        copy_block(k_ref, k_tail, batch=batch, start=start, block_rows=block_kv, head=kv_head, dst=k_smem.at[slot],
                   barrier=k_ready.at[slot])
        if kseg is not None:
            plgpu.copy_gmem_to_smem(kseg[0].at[rows], kseg[1].at[slot], k_ready.at[slot])
        pl.when(refill)(lambda: plgpu.barrier_wait(v_consumed.at[slot]))
        copy_block(v_ref, v_tail, batch=batch, start=start, block_rows=block_kv, head=kv_head, dst=v_smem.at[slot],
                   barrier=v_ready.at[slot])

    steps = first_step + num_blocks
    if drain:
        drain_kv_slots(k_consumed, v_consumed, steps, num_stages)
    return steps


def drain_kv_slots(k_consumed, v_consumed, steps, num_stages):
    """Observe the release of the ring's last slots (of ``steps`` steps in all)."""

    @pl.loop(jnp.maximum(i32(steps) - num_stages, 0), i32(steps))
    def _drain(step):
        slot = lax.rem(step, jnp.int32(num_stages))
        plgpu.barrier_wait(k_consumed.at[slot])
        plgpu.barrier_wait(v_consumed.at[slot])


def segment_block_ranges(q_seg, kv_seg, block_q: int, block_kv: int, num_q_tiles: int) -> jax.Array:
    """int32 ``[B, num_q_tiles, 4]``: per ``block_q``-row query tile, ``[first, end)`` of the key blocks whose ids
    overlap the tile's id range (``[num blocks, 0)`` when none does): a superset of the blocks holding one of its
    ids, exact for sorted ids (packed documents); then ``[whole_first, whole_end)``, a run of those blocks
    whose keys all have the tile's one id (no id mask needed; empty, at ``first``, where the tile has several
    ids or such blocks are not one run)."""
    batch, seq_q = q_seg.shape
    seq_k = kv_seg.shape[1]
    num_kv_blocks = pl.cdiv(seq_k, block_kv)
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min

    def spans(ids, block, n):  # min and max id per block, padding ignored
        pad = n * block - ids.shape[1]
        lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=big).reshape(batch, n, block).min(-1)
        hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=small).reshape(batch, n, block).max(-1)
        return lo, hi

    q_lo, q_hi = spans(q_seg, block_q, num_q_tiles)
    k_lo, k_hi = spans(kv_seg, block_kv, num_kv_blocks)
    overlap = (k_lo[:, None, :] <= q_hi[:, :, None]) & (k_hi[:, None, :] >= q_lo[:, :, None])  # [B, tiles, blocks]
    blocks = jnp.arange(num_kv_blocks, dtype=jnp.int32)
    first = jnp.where(overlap, blocks, num_kv_blocks).min(-1)
    end = jnp.where(overlap, blocks + 1, 0).max(-1)
    whole = ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
             & (k_lo[:, None, :] == q_lo[:, :, None]))  # [B, tiles, blocks]: one id, the tile's
    whole_first = jnp.where(whole, blocks, num_kv_blocks).min(-1)
    whole_end = jnp.where(whole, blocks + 1, 0).max(-1)
    one_run = whole.sum(-1) == whole_end - whole_first  # (false where there is none)
    whole_first, whole_end = jnp.where(one_run, whole_first, first), jnp.where(one_run, whole_end, first)
    return jnp.stack([first, end, whole_first, whole_end], axis=-1).astype(jnp.int32)


# --- the head-dim-256 role split (``backward_wide.py``): P handed from one compute warpgroup to the other ---


def masked_logits(s, row0, col0, *, left, right, seq_k, transposed: bool):
    """``s`` with ``-inf`` where a key is outside the query's window (``key - query > right``, 0: causal; ``query -
    key > left``; None: no bound) or ``>= seq_k`` (None: no limit; an int or, with sequence lengths, the batch
    row's key length); rows/cols counted from ``row0``/``col0``."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    q0, k0 = (col0, row0) if transposed else (row0, col0)
    queries = q0 + plgpu.broadcasted_iota(jnp.int32, s.shape, q_axis, layout=WGMMA)
    keys = k0 + plgpu.broadcasted_iota(jnp.int32, s.shape, k_axis, layout=WGMMA)
    visible = None
    if right == 0:
        visible = queries >= keys
    elif right is not None:
        visible = queries >= keys - right
    if left is not None:
        visible = keys >= queries - left if visible is None else visible & (keys >= queries - left)
    if seq_k is not None:
        visible = keys < seq_k if visible is None else visible & (keys < seq_k)
    return s if visible is None else jnp.where(visible, s, -jnp.inf)


def hand_over_p(p, t, p_smem, p_ready, p_consumed):
    """P warpgroup: write ``p`` into tile ``t % 2`` once the dS warpgroup has read what was there."""
    pslot = lax.rem(t, jnp.int32(2))
    pl.when(t >= 2)(lambda: plgpu.barrier_wait(p_consumed.at[pslot]))
    p_smem.at[pslot][...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_ready.at[pslot])
    return pslot


def take_p(t, p_smem, p_ready, p_consumed):
    """dS warpgroup: tile ``t % 2`` of P, float32, and the tile released."""
    pslot = lax.rem(t, jnp.int32(2))
    plgpu.barrier_wait(p_ready.at[pslot])
    p = plgpu.load(p_smem.at[pslot], layout=WGMMA).astype(jnp.float32)
    plgpu.barrier_arrive(p_consumed.at[pslot])
    return p


def drain_p(total, p_consumed):
    """P warpgroup, at the end: observe the release of the last two tiles too."""

    @pl.loop(jnp.maximum(total - 2, 0), total)
    def _(t):
        plgpu.barrier_wait(p_consumed.at[lax.rem(t, jnp.int32(2))])


def p_handover_scratch(dtype, rows: int, cols: int):
    """The role split's P tiles (two, double-buffered) and the barriers that hand them over."""
    return dict(
        p_smem=tiled_smem((2, rows, cols), dtype),
        p_ready=plgpu.Barrier(num_barriers=2),
        p_consumed=plgpu.Barrier(num_barriers=2),
    )
