"""FlashAttention forward for Hopper (sm_90): a Pallas kernel on the Mosaic GPU backend.

A CTA computes query tiles of ``compute_wgs * block_q`` rows of one (batch, head)
with ``compute_wgs`` compute warpgroups (two, or three: ``MosaicForwardConfig``)
and one memory warpgroup (FlashAttention-3's layout):

- the memory warpgroup streams the K and V blocks of the tile's KV head with
  TMA into a ring of ``num_stages`` swizzled shared-memory slots. ``k_ready`` /
  ``v_ready`` say a slot has landed; ``k_consumed`` / ``v_consumed`` (one
  arrival per compute warpgroup) say every compute warpgroup is done with it;
- the compute warpgroups each own ``block_q`` rows (a TMA-loaded Q tile in
  shared memory) and loop over the key blocks: ``S = Q K^T`` by wgmma into
  registers, the online softmax in the log2 domain (``exp2`` with the scale and
  log2(e) folded into one multiply-add), then ``O += P V`` by wgmma with P
  from registers. The warpgroups take turns on the tensor cores, so that one
  warpgroup's softmax overlaps the others' matrix products, in one of the two
  schedules of ``forward_schedules.py`` (``MosaicForwardConfig.overlap``:
  FlashAttention-3's intra-warpgroup overlap, or not; three warpgroups take
  the overlapped one).

Persistent (``MosaicForwardConfig.persistent``): one CTA per SM walks its share
of the tiles (heads outermost, query tiles innermost, so that the CTAs at work
at once share K/V in L2; under causal by length, the longest first). The K/V ring
runs on across tiles, so the memory warpgroup loads the next tile's first
blocks while the compute warpgroups finish this one; each compute warpgroup
loads its next Q into a second buffer once its current tile's first S has
landed, and stages its O through the current Q's buffer. Otherwise one CTA
per tile.

Causal attention and local windows are a loop split: key blocks every row of
the warpgroup sees entirely run with no mask; the blocks across the diagonal
(the window's right edge) or its left edge are masked; blocks no row sees are
never loaded, so the memory warpgroup starts at the CTA's first visible block.
A warpgroup that needs fewer key blocks than its partner (the first of the two
under causal; the second, before its window starts) still takes their turns
and releases their slots, so the two stay in step. GQA: query head ``h`` reads KV
head ``h // (N / K)``; K/V are never repeated.

Lengths: the sequence lengths need not be block multiples. TMA reads past the
end of an array give zeros and its writes there are dropped; logits of keys
``>= Tk`` are masked in the last key block. (Lengths that are not multiples of
8, and arrays shorter than one block, are zero-padded by the launcher: the
tiled TMA copies need whole 8-row tiles.) Per-batch key lengths: the V block
straddling a batch row's length comes from a copy zeroed past it
(``common.straddling_blocks``), so that whatever the padded rows hold cannot
give ``P V = 0 * NaN``.

Outputs: ``out [B, Tq, N, H]`` and ``lse2 [B, N, Tq]`` float32, the log-sum-exp
in the log2 domain (``m + log2(l)`` with ``m`` the running max of the scaled
log2 logits), exactly what the backward kernels (Mosaic and Triton) read.

Interpret mode (``interpret=True``: Mosaic GPU's ``InterpretGPUParams`` on the
CPU) runs this kernel with its warpgroups as threads: TMA copies (out-of-bounds
rows read as zeros, writes dropped), mbarriers (arrive/wait, transaction
counts; the interpreter also checks that each waiting warpgroup observes every
phase), wgmma from shared-memory operands into ``plgpu.ACC`` scratch,
``commit_smem``, smem-to-gmem copies and ``set_max_registers`` (a no-op);
its race detector (``detect_races=True``) finds no race in either schedule,
persistent or not. A persistent kernel runs there as three CTAs, so each walks
several tiles. What fails there in jax 0.11.2 is replaced in interpret mode
alone (``forward_schedules.py``): P goes through shared memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu import occupancy
from pallas_flash.backends.mosaic_gpu.common import (
    REGISTERS_BY_COMPUTE_WGS,
    ROW,
    WGMMA,
    bcast,
    clipped_lengths,
    drain_kv_slots,
    i32,
    launch_params,
    segment_block_ranges,
    straddling_blocks,
    stream_kv_blocks,
    tiled_smem,
)
from pallas_flash.backends.mosaic_gpu.config import MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.forward_schedules import ForwardTile, overlapped, turn_taking
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec

__all__ = ["mosaic_forward"]

_RCP_LN2 = 1.0 / math.log(2.0)
# CTAs of a persistent kernel in interpret mode: few, so that each walks several tiles.
_INTERPRET_PROGRAMS = 3


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    *refs,
    qo_smem,
    k_smem,
    v_smem,
    lse_smem,
    q_ready,
    k_ready,
    v_ready,
    k_consumed,
    v_consumed,
    wg_turn=None,
    wg_token=None,
    p_smem=None,
    qseg_smem=None,
    kvseg_smem=None,
    seq_q: int,
    seq_k: int,
    group: int,
    num_heads: int,
    num_q_tiles: int,
    num_tiles: int,
    num_programs: int,
    head_group: int | None,
    snake: bool,
    block_q: int,
    block_kv: int,
    num_stages: int,
    compute_wgs: int,
    causal: bool,
    left: int | None,
    right: int | None,
    scale_log2: float,
    overlap: bool,
    has_q_lengths: bool,
    has_kv_lengths: bool,
    has_segments: bool,
    interpret: bool,
):
    refs = list(refs)
    q_len_ref = refs.pop(0) if has_q_lengths else None
    kv_len_ref = refs.pop(0) if has_kv_lengths else None
    v_tail_ref = refs.pop(0) if has_kv_lengths else None  # the key block straddling each key length, zeroed past it
    # Segment ids: the query rows' and keys' ids, and per 64-row query tile the key blocks that hold one of its ids.
    q_seg_ref, kv_seg_ref, seg_range_ref = (refs.pop(0) for _ in range(3)) if has_segments else (None,) * 3
    out_ref, lse_ref = refs
    program = lax.axis_index("program")
    wg = lax.axis_index("wg")
    rows_per_cta = compute_wgs * block_q
    compute_registers, memory_registers = REGISTERS_BY_COMPUTE_WGS[compute_wgs]
    num_kv_blocks = pl.cdiv(seq_k, block_kv)  # static
    num_whole_kv_blocks = seq_k // block_kv  # static: blocks with no key past Tk
    num_q_buffers = qo_smem.shape[0]  # 2: the next tile's Q loads during this one
    persistent = num_programs < num_tiles  # CTAs walk several tiles each
    if snake:  # odd rounds in reverse CTA order (``occupancy.PERSISTENT_FORWARD_SNAKE``)
        full_rounds, last_round_tiles = divmod(num_tiles, num_programs)  # static
        lane_in_last = program if full_rounds % 2 == 0 else num_programs - 1 - program
        my_tiles = full_rounds + (lane_in_last < last_round_tiles).astype(jnp.int32)
    else:
        my_tiles = lax.div(jnp.int32(num_tiles - 1) - program, jnp.int32(num_programs)) + 1
    batch_heads = num_tiles // num_q_tiles

    def tile_coords(i):
        """``(batch, head, first row)`` of this CTA's ``i``-th tile.

        Heads outermost, query tiles innermost (the longest first under causal), so that the CTAs at work at
        once read the same K/V (L2); the GPU hands tiles to SMs as they free up. A persistent CTA's tiles
        under causal go by length instead, the longest of every head first, so that the CTAs take tiles of
        equal length at a time and finish together: striding over the first order, a CTA would keep the
        long tiles of each head whenever the stride is near a multiple of their number (0.75x cuDNN at
        D=128, N=16k on an H200). One CTA per tile keeps the first order: by length, 5-16% slower there.
        With ``head_group`` (causal; ``occupancy.FORWARD_HEAD_GROUP`` or ``persistent_forward_group``): by
        length within groups of that many pairs, group after group, so that a head's tiles run close together
        in time and its K/V stays in L2 between them. With ``snake``, odd rounds go to the CTAs in reverse.
        """
        lane = jnp.where(lax.rem(i, jnp.int32(2)) == 1, num_programs - 1 - program, program) if snake else program
        t = lane + i * num_programs
        if head_group is not None:  # by length within groups of head_group pairs
            group_tiles = jnp.int32(head_group * num_q_tiles)
            in_group = lax.rem(t, group_tiles)
            bh = lax.div(t, group_tiles) * head_group + lax.rem(in_group, jnp.int32(head_group))
            q_tile = lax.div(in_group, jnp.int32(head_group))
        elif causal and persistent:
            bh = lax.rem(t, jnp.int32(batch_heads))
            q_tile = lax.div(t, jnp.int32(batch_heads))
        else:
            bh = lax.div(t, jnp.int32(num_q_tiles))
            q_tile = lax.rem(t, jnp.int32(num_q_tiles))
        if causal:  # the longest (the last rows') first
            q_tile = num_q_tiles - 1 - q_tile
        return lax.div(bh, jnp.int32(num_heads)), lax.rem(bh, jnp.int32(num_heads)), q_tile * rows_per_cta

    def lengths(batch):
        """``(q_len, kv_len)`` of a batch row (each None without its lengths array)."""
        q_len = None if q_len_ref is None else q_len_ref[batch]
        kv_len = None if kv_len_ref is None else kv_len_ref[batch]
        return q_len, kv_len

    # Static: a row may see no key (lengths, a window); it still gets one fully masked block (O = 0, lse2 = -inf),
    # so that both warpgroups' pipelines and turns run as for any tile.
    may_see_nothing = (has_q_lengths or has_kv_lengths or has_segments or left is not None
                       or (right is not None and right < 0))

    def kv_block_range(q_start, rows, q_len, kv_len, batch=None):
        """``(first, end)``: the key blocks that rows ``q_start .. q_start + rows - 1`` see (at least one where
        ``may_see_nothing``); ``rows`` is static (a CTA's or a warpgroup's, from a tile boundary). Python ints where
        static: a jnp constant inside the tile loop does not lower."""
        q_end = q_start + rows
        end = num_kv_blocks
        if right == 0:  # causal: the last row's last key is q_end - 1
            end = jnp.minimum(pl.cdiv(q_end, jnp.int32(block_kv)), end)
        elif right is not None:  # the last row's last key is q_end - 1 + right
            end = jnp.minimum(pl.cdiv(jnp.maximum(q_end + right, 0), jnp.int32(block_kv)), end)
        if kv_len is not None:
            end = jnp.minimum(pl.cdiv(kv_len, jnp.int32(block_kv)), end)
        if q_len is not None:
            end = jnp.where(q_start >= q_len, 0, end)
        first = 0
        if left is not None:  # the first row's first key is q_start - left
            first = jnp.minimum(lax.div(jnp.maximum(q_start - left, 0), jnp.int32(block_kv)), num_kv_blocks - 1)
        if has_segments:  # the blocks holding an id of these rows: the union over their query tiles
            t0, t1 = lax.div(q_start, jnp.int32(block_q)), lax.div(q_end - 1, jnp.int32(block_q))
            tiles = [t0, t1] + [t0 + i for i in range(1, rows // block_q - 1)]  # a three-warpgroup CTA's middle too
            first = jnp.maximum(functools.reduce(jnp.minimum, (seg_range_ref[batch, t, 0] for t in tiles)), first)
            end = jnp.minimum(functools.reduce(jnp.maximum, (seg_range_ref[batch, t, 1] for t in tiles)), end)
            first = jnp.minimum(first, num_kv_blocks - 1)
        if may_see_nothing:
            if kv_len is not None:  # rows whose keys all lie past the key length: their block inside it (a block
                # wholly past it is loaded raw, and its padding would reach O as 0 * NaN; this one is clean or zeroed)
                first = jnp.minimum(first, jnp.maximum(pl.cdiv(kv_len, jnp.int32(block_kv)) - 1, 0))
            end = jnp.maximum(end, first + 1)
        return first, end

    def tile_ranges(cta_q0, q_base, q_len, kv_len, batch):
        """``(cta_first, cta_end, first, lo, unmasked, end)``: the CTA's key blocks, then this warpgroup's (inside
        the CTA's), of which ``lo .. unmasked - 1`` need no mask."""
        cta_first, cta_end = kv_block_range(cta_q0, rows_per_cta, q_len, kv_len, batch)
        first, end = kv_block_range(q_base, block_q, q_len, kv_len, batch)
        if may_see_nothing:  # its one masked block inside the CTA's
            first = jnp.minimum(first, cta_end - 1)
            end = jnp.clip(end, first + 1, cta_end)
        unmasked = num_whole_kv_blocks  # blocks below it need no mask (a Python int where static)
        if right is not None:  # every key <= every row + right: (kb + 1) * block_kv - 1 <= q_base + right
            if right == 0:
                unmasked = jnp.minimum(lax.div(q_base, jnp.int32(block_kv)), unmasked)
            else:
                unmasked = jnp.minimum(lax.div(jnp.maximum(q_base + right + 1, 0), jnp.int32(block_kv)), unmasked)
        if kv_len is not None:  # every key < the row's key length
            unmasked = jnp.minimum(lax.div(kv_len, jnp.int32(block_kv)), unmasked)
        if q_len is not None:  # every row < the row's query length
            unmasked = jnp.where(q_base + block_q > q_len, 0, unmasked)
        lo = first
        if left is not None:  # every key >= every row - left: kb * block_kv >= q_base + block_q - 1 - left
            lo = jnp.clip(pl.cdiv(jnp.maximum(q_base + block_q - 1 - left, 0), jnp.int32(block_kv)), first, end)
            unmasked = jnp.clip(unmasked, lo, end)
        if has_segments:  # blocks outside the run whose keys all have the tile's one id are masked by id
            tile = lax.div(q_base, jnp.int32(block_q))
            lo = jnp.clip(jnp.maximum(lo, seg_range_ref[batch, tile, 2]), first, end)
            unmasked = jnp.clip(jnp.minimum(unmasked, seg_range_ref[batch, tile, 3]), lo, end)
        if seq_q % rows_per_cta:  # static: the last tile has rows past Tq
            # A warpgroup whose rows all lie past Tq (two of three at N = 2**k) is padding that is never stored:
            # one key block keeps its pipeline and turns as for any tile; the partner's others it only releases.
            end = jnp.where(q_base >= seq_q, first + 1, end)
            lo = jnp.minimum(lo, end)
            unmasked = jnp.clip(unmasked, lo, end)
        return cta_first, cta_end, first, lo, unmasked, end

    @pl.when(wg < compute_wgs)
    def _compute_warpgroup():
        plgpu.set_max_registers(compute_registers, action="increase")

        def load_q(i, buf):
            batch, head, cta_q0 = tile_coords(i)
            rows = pl.ds(cta_q0 + wg * block_q, block_q)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], qo_smem.at[buf, wg],
                                    q_ready.at[buf * compute_wgs + wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], qseg_smem.at[buf, wg],
                                        q_ready.at[buf * compute_wgs + wg])

        load_q(i32(0), i32(0))

        def tile_step(i, step):
            batch, head, cta_q0 = tile_coords(i)
            buf = lax.rem(i, jnp.int32(num_q_buffers))
            q_smem = qo_smem.at[buf, wg]
            q_base = cta_q0 + wg * block_q
            q_len, kv_len = lengths(batch)
            cta_first, cta_end, first, lo, unmasked, end = tile_ranges(cta_q0, q_base, q_len, kv_len, batch)

            def load_next_q():
                if num_q_buffers == 1:
                    return

                @pl.when(i + 1 < my_tiles)
                def _():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's O has left that buffer
                    load_q(i + 1, 1 - buf)

            tile = ForwardTile(
                q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready,
                k_consumed=k_consumed, v_consumed=v_consumed, wg_turn=wg_turn, wg_token=wg_token, p_smem=p_smem,
                seq_k=seq_k, block_q=block_q, block_kv=block_kv, num_stages=num_stages, left=left, right=right,
                scale_log2=scale_log2, interpret=interpret, wg=wg, compute_wgs=compute_wgs, q_base=q_base, kv_start=first, kv_lo=lo,
                kv_unmasked=unmasked, kv_end=end, cta_kv_start=cta_first, cta_kv_end=cta_end, step=step,
                after_first_s=load_next_q, kv_len=kv_len, q_len=q_len, kvseg_smem=kvseg_smem)
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), ROW)
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), ROW)
            acc = plgpu.layout_cast(jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32), WGMMA)
            plgpu.barrier_wait(q_ready.at[buf * compute_wgs + wg])
            if has_segments:
                tile = dataclasses.replace(tile, q_seg=plgpu.load(qseg_smem.at[buf, wg], layout=ROW))
            acc, m, l = (overlapped if overlap else turn_taking)(tile, (acc, m, l))

            # Without lengths every row sees key 0, so l >= 1; with them a row that sees no key has l = 0 and
            # gets O = 0, lse2 = -inf. O goes out through this tile's Q buffer.
            inv_l = 1.0 / l
            if tile.has_lengths:
                inv_l = jnp.where(l == 0.0, 0.0, inv_l)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's lse row has left lse_smem
            q_smem[...] = (acc * bcast(inv_l, acc.shape, 0)).astype(q_smem.dtype)
            lse_smem[wg] = m + jnp.log(l) * _RCP_LN2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q_base, block_q), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_base, block_q)])
            return step + (tile.cta_kv_end - tile.cta_kv_start)

        # The overlapped schedule's token passes round the compute warpgroups across tiles: warpgroup 0 issues
        # first, and observes the last warpgroup's last hand-over once all tiles are done. (Handed over again at
        # every tile, the last warpgroup could pass the token for the next tile before warpgroup 0 had observed
        # its last hand-over of this one: a barrier of one arrival then completes twice unobserved, and a parity
        # wait misses a phase, a hang on the GPU. Mosaic GPU's interpreter caught it: "awaiting phase 6, but
        # barrier is already at phase 7".)
        if overlap:
            pl.when(wg == compute_wgs - 1)(lambda: plgpu.barrier_arrive(wg_token.at[0]))
        lax.fori_loop(i32(0), my_tiles, tile_step, i32(0))
        if overlap:
            pl.when(wg == 0)(lambda: plgpu.barrier_wait(wg_token.at[0]))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)  # the memory warpgroup, after the compute ones
    def _memory_warpgroup():
        plgpu.set_max_registers(memory_registers, action="decrease")

        def tile_step(i, step):
            batch, head, cta_q0 = tile_coords(i)
            q_len, kv_len = lengths(batch)
            cta_first, cta_end = kv_block_range(cta_q0, rows_per_cta, q_len, kv_len, batch)
            return stream_kv_blocks(
                k_ref, v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready,
                k_consumed=k_consumed, v_consumed=v_consumed, batch=batch, kv_head=lax.div(head, jnp.int32(group)),
                num_blocks=cta_end - cta_first, block_kv=block_kv, num_stages=num_stages,
                first_step=step, drain=False, first_block=cta_first,
                kseg=None if kv_seg_ref is None else (kv_seg_ref.at[batch], kvseg_smem),
                v_tail=None if v_tail_ref is None else (v_tail_ref, kv_len_ref))

        steps = lax.fori_loop(i32(0), my_tiles, tile_step, i32(0))
        drain_kv_slots(k_consumed, v_consumed, steps, num_stages)


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _padded_length(n: int, block: int) -> int:
    """``n`` rounded up to whole 8-row tiles, and to at least one block."""
    return max(-(-n // 8) * 8, block)


def mosaic_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: MosaicForwardConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Tq, N, H], lse2 [B, N, Tq] float32)`` of plain, causal or windowed attention, GQA allowed, with
    per-batch sequence lengths (``inputs.q_lengths``/``kv_lengths``) and segment ids (``inputs.q_segment_ids``/
    ``kv_segment_ids``); rows that see no key: O = 0, lse2 = -inf.

    The caller (``MosaicBackend.supports``) has checked the call: no dense masks,
    bias, ALiBi, soft-cap, dropout or offsets; bf16/fp16; head dim 64, 128 or 256.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    config.check_fits(head_dim, q.dtype)
    block_q, block_kv, compute_wgs = config.block_q, config.block_kv, config.compute_wgs
    rows_per_cta = compute_wgs * block_q

    # Clipped to the arrays: a length past the end means the whole row.
    q_lengths = clipped_lengths(inputs.q_lengths, seq_q) if spec.has_q_lengths else None
    kv_lengths = clipped_lengths(inputs.kv_lengths, seq_k) if spec.has_kv_lengths else None
    q_pad = _pad_seq(q, _padded_length(seq_q, rows_per_cta))
    k_pad = _pad_seq(k, _padded_length(seq_k, block_kv))
    v_pad = _pad_seq(v, _padded_length(seq_k, block_kv))
    num_q_tiles = pl.cdiv(seq_q, rows_per_cta)
    lse_len = num_q_tiles * rows_per_cta  # whole tiles: the lse rows are written by 1-D TMA copies
    num_tiles = batch * num_heads * num_q_tiles
    if config.persistent:
        num_programs = min(num_tiles, _INTERPRET_PROGRAMS if interpret else occupancy.sm_count())
    else:
        num_programs = num_tiles

    # Causal: by length within groups of (batch row, head) pairs, one knob per kind of grid (None: no groups)
    head_group, snake = None, False
    if spec.causal and config.persistent:
        if num_programs < num_tiles:  # else one CTA per tile after all: heads outermost, as ever
            kv_bytes = 2 * batch * num_kv_heads * seq_k * head_dim * k.dtype.itemsize
            head_group = occupancy.persistent_forward_group(batch * num_heads, num_q_tiles, kv_bytes, num_programs)
            snake = occupancy.PERSISTENT_FORWARD_SNAKE
    elif spec.causal:
        head_group = occupancy.head_group(batch * num_heads, occupancy.FORWARD_HEAD_GROUP)
    kernel = functools.partial(
        _forward_kernel,
        seq_q=seq_q,
        seq_k=seq_k,
        group=num_heads // num_kv_heads,
        num_heads=num_heads,
        num_q_tiles=num_q_tiles,
        num_tiles=num_tiles,
        num_programs=num_programs,
        head_group=head_group,
        snake=snake,
        block_q=block_q,
        block_kv=block_kv,
        num_stages=config.num_stages,
        compute_wgs=compute_wgs,
        causal=spec.causal,
        left=spec.within(seq_q, seq_k).left,
        right=spec.within(seq_q, seq_k).right,
        scale_log2=float(spec.scale) * LOG2E,
        overlap=config.overlap,
        has_q_lengths=spec.has_q_lengths,
        has_kv_lengths=spec.has_kv_lengths,
        has_segments=spec.has_segments,
        interpret=interpret,
    )
    length_operands = [x for x in (q_lengths, kv_lengths) if x is not None]
    if kv_lengths is not None:  # a straddling block's V rows past the length would give P V = 0 * garbage
        length_operands.append(straddling_blocks(v_pad, kv_lengths, block_kv))
    if spec.has_segments:
        q_seg = inputs.q_segment_ids.astype(jnp.int32)
        kv_seg = inputs.kv_segment_ids.astype(jnp.int32)
        length_operands += [
            jnp.pad(q_seg, ((0, 0), (0, lse_len - seq_q))),
            jnp.pad(kv_seg, ((0, 0), (0, k_pad.shape[1] - seq_k))),
            segment_block_ranges(q_seg, kv_seg, block_q, block_kv, lse_len // block_q),
        ]
    dtype = q.dtype
    scratch = dict(
        qo_smem=tiled_smem((config.q_buffers, compute_wgs, block_q, head_dim), dtype),
        k_smem=tiled_smem((config.num_stages, block_kv, head_dim), dtype),
        v_smem=tiled_smem((config.num_stages, block_kv, head_dim), dtype),
        lse_smem=plgpu.SMEM((compute_wgs, block_q), jnp.float32),
        q_ready=plgpu.Barrier(num_arrivals=2 if spec.has_segments else 1, num_barriers=config.q_buffers * compute_wgs),
        k_ready=plgpu.Barrier(num_arrivals=2 if spec.has_segments else 1, num_barriers=config.num_stages),
        v_ready=plgpu.Barrier(num_barriers=config.num_stages),
        k_consumed=plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=config.num_stages),
        v_consumed=plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=config.num_stages),
    )
    if config.overlap:  # each warpgroup's token for issuing wgmmas
        scratch["wg_token"] = plgpu.Barrier(num_arrivals=1, num_barriers=compute_wgs)
    else:  # the rendezvous both warpgroups arrive at to hand the turn over
        scratch["wg_turn"] = plgpu.Barrier(num_arrivals=compute_wgs)
    if spec.has_segments:  # the ids of each warpgroup's rows, of each K/V slot's keys
        scratch["qseg_smem"] = plgpu.SMEM((config.q_buffers, compute_wgs, block_q), jnp.int32)
        scratch["kvseg_smem"] = plgpu.SMEM((config.num_stages, block_kv), jnp.int32)
    if interpret:  # P staged through shared memory (see the module docstring)
        scratch["p_smem"] = tiled_smem((compute_wgs, block_q, block_kv), dtype)
    out_shape = (
        jax.ShapeDtypeStruct(q_pad.shape, dtype),
        jax.ShapeDtypeStruct((batch, num_heads, lse_len), jnp.float32),
    )
    out, lse2 = plgpu.kernel(
        kernel,
        out_type=out_shape,
        scratch_types=scratch,
        grid=(num_programs,),
        grid_names=("program",),
        **launch_params(interpret, "pallas_flash_mosaic_fwd", compute_wgs),
    )(q_pad, k_pad, v_pad, *length_operands)
    return out[:, :seq_q], lse2[:, :, :seq_q]
