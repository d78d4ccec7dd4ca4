"""What every Triton kernel program computes first, and the logits and visibility of its tiles.

Conventions inside the kernels:
- logits live in the log2 domain: ``s = (q . k) * scale * log2(e)``, so the
  softmax uses ``exp2``;
- the backward kernels read ``lse2``: the log-sum-exp in the log2 domain with
  ``+inf`` for rows that see no key, so that ``exp2(s - lse2)`` is exactly 0
  there without any per-element mask;
- positions ``q_pos``/``k_pos`` are rows of the arrays as passed; the spec's
  position offsets are folded into its ``left``/``right`` (masks) and added
  back only where a global position is read (ALiBi's ``j - i``, dropout's hash).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_flash import dropout
from pallas_flash.backends.triton import blocks, tiles
from pallas_flash.backends.triton.side_inputs import SideInputs, alibi_slope, row_lengths
from pallas_flash.spec import LOG2E, AttentionSpec


@dataclasses.dataclass(frozen=True)
class Program:
    """One program's block of its own sequence (query rows, or key rows for dK/dV) and its batch row.

    ``enter`` reads the program ids and the side inputs every kernel needs
    before its first tile load, in one fixed order.
    """

    spec: AttentionSpec
    side: SideInputs
    block: object  # index of the program's block (heaviest first for causal query blocks)
    b: object
    head: object  # query head (forward, dQ) or KV head (dK/dV)
    start: object  # first row of the block
    head_dim_padded: int
    dim_mask: object  # [1, head_dim_padded] real head-dim columns, or None
    q_tail: int | None  # Tq when it is not a block multiple (rows past it are masked), else None
    k_tail: int | None
    q_len: object  # this batch row's query / key length, or None
    kv_len: object
    seg_range: tuple | None  # (lo, hi, full_lo, full_hi) of the other sequence's blocks
    own_seg: object  # [block, 1] segment ids of the program's own rows, or None

    @property
    def q_load_limit(self):
        """The exclusive bound of the query rows that are real: the batch row's query length (clipped to Tq),
        the ragged tail, or None. Rows past it load as zeros."""
        return _real_rows(self.q_len, self.q_tail)

    @property
    def kv_load_limit(self):
        """The same for the keys: the batch row's key length (clipped to Tk), the ragged tail, or None."""
        return _real_rows(self.kv_len, self.k_tail)

    @classmethod
    def enter(cls, ref, side: SideInputs, *, spec, block_rows: int, block_q: int, block_k: int, seq_q: int,
              seq_k: int, head_dim: int, reverse_blocks: int | None = None, rows: str) -> "Program":
        """``rows="q"`` for a query-block program, ``"k"`` for a key-block program; ``ref`` gives the padded head dim."""
        block = pl.program_id(0)
        if reverse_blocks is not None:  # heaviest causal query blocks first: better tail balance
            block = reverse_blocks - 1 - block
        b = pl.program_id(1)
        head = pl.program_id(2)
        start = block * block_rows
        head_dim_padded = ref.shape[-1]
        dim_mask = tiles.col_mask(head_dim, head_dim_padded)
        q_tail = seq_q if seq_q % block_q else None
        k_tail = seq_k if seq_k % block_k else None
        q_len, kv_len = row_lengths(side, b)
        seg_range = own_seg = None
        if side.segments is not None:
            seg_range = side.segments.ranges(block)
            ids, tail = (side.segments.q_ids, q_tail) if rows == "q" else (side.segments.kv_ids, k_tail)
            own_seg = tiles.load_ids(ids, start, block_rows, limit=tail)[:, None]
        return cls(spec, side, block, b, head, start, head_dim_padded, dim_mask, q_tail, k_tail, q_len, kv_len,
                   seg_range, own_seg)


def key_minus_query(q_pos, k_pos, spec: AttentionSpec):
    """``j - i`` in global positions (the arrays' rows shifted by the spec's offsets)."""
    shift = spec.k_offset - spec.q_offset
    rel = k_pos - q_pos
    return rel if shift == 0 else rel + shift


def log2_logits(s, *, spec: AttentionSpec, q_pos, k_pos, bias=None, slope=None):
    """Log2-domain logits from the raw ``q . k`` tile ``s``, and the soft-cap's tanh (or None).

    ``logits = cap * tanh(scale * s / cap)`` (or ``scale * s``), plus the bias
    tile and ``slope * (j - i)``, all times ``log2(e)``. Positions and the bias
    tile broadcast against ``s`` in either orientation (``[bq, bk]`` or the
    transposed ``[bk, bq]``).
    """
    tanh = None
    if spec.soft_cap is not None:
        tanh = jnp.tanh(s * (spec.scale / spec.soft_cap))
        s2 = tanh * (spec.soft_cap * LOG2E)
    else:
        s2 = s * (spec.scale * LOG2E)
    if bias is not None:
        s2 = s2 + bias.astype(jnp.float32) * LOG2E
    if slope is not None:
        s2 = s2 + (slope * LOG2E) * key_minus_query(q_pos, k_pos, spec).astype(jnp.float32)
    return s2, tanh


def visible(q_pos, k_pos, *, spec: AttentionSpec, kv_limit=None, q_seg=None, k_seg=None):
    """Element mask from broadcastable query and key positions (and segment ids), or None."""
    mask = None

    def _and(m, x):
        return x if m is None else (m & x)

    if kv_limit is not None:
        mask = _and(mask, k_pos < kv_limit)
    if spec.left is not None:
        mask = _and(mask, k_pos >= q_pos - spec.left)
    if spec.right is not None:
        mask = _and(mask, k_pos <= q_pos + spec.right)
    if q_seg is not None:
        mask = _and(mask, q_seg == k_seg)
    return mask


def dropout_key(side: SideInputs, b, head, num_heads: int):
    """The per-(batch, head) dropout hash key, or None without dropout.

    On a shard of a partitioned call the seed also carries the shard's global
    batch and head offsets and head count (``dropout.seed_head_key``).
    """
    if side.seed is None:
        return None
    return dropout.seed_head_key(side.seed, b, head, num_heads)


def dropout_keep(key, q_pos, k_pos, *, spec: AttentionSpec):
    """The keep bits of a tile, hashed from global positions."""
    if spec.q_offset:
        q_pos = q_pos + spec.q_offset
    if spec.k_offset:
        k_pos = k_pos + spec.k_offset
    return dropout.keep_mask(key, q_pos, k_pos, rate=spec.dropout_rate)


def _real_rows(length, tail: int | None):
    """``length`` (a batch row's, or None) clipped to the sequence, whose length ``tail`` is when it is ragged."""
    if length is None:
        return tail
    return length if tail is None else jnp.minimum(length, tail)


@dataclasses.dataclass(frozen=True)
class QueryBlock:
    """A query-block program (forward, dQ): its ``Program``, ALiBi slope and dropout key.

    After loading its query rows, the kernel calls ``with_positions`` once and
    then ``logits``/``visible`` for each key block its loops visit.
    """

    program: Program
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    slope: object = None
    drop_key: object = None
    q_pos: object = None  # [block_q, 1] int32, set by with_positions
    kv_limit: object = None

    @classmethod
    def enter(cls, q_ref, side: SideInputs, *, spec: AttentionSpec, block_q: int, block_k: int, seq_q: int,
              seq_k: int, head_dim: int, num_heads: int, num_q_blocks: int) -> "QueryBlock":
        program = Program.enter(
            q_ref, side, spec=spec, block_rows=block_q, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
            head_dim=head_dim, reverse_blocks=num_q_blocks if spec.causal else None, rows="q",
        )
        slope = alibi_slope(side, program.b, program.head)
        drop_key = dropout_key(side, program.b, program.head, num_heads)
        return cls(program, block_q, block_k, seq_q, seq_k, slope, drop_key)

    def with_positions(self, q_pos) -> "QueryBlock":
        kv_limit = self.program.kv_load_limit
        return dataclasses.replace(self, q_pos=q_pos, kv_limit=kv_limit)

    def kv_range(self):
        """``(lo, full_lo, full_hi, hi)`` of the key blocks this query block sees."""
        p = self.program
        return blocks.kv_block_range(
            p.start, spec=p.spec, block_q=self.block_q, block_k=self.block_k, seq_k=self.seq_k, kv_len=p.kv_len,
            q_len=p.q_len, seg_range=p.seg_range, seq_q=self.seq_q,
        )

    def logits(self, s, k0, k_pos, k_limit):
        """``log2_logits`` of the raw tile ``s`` at key block ``k0``, with its bias tile (rows past the query
        length read as 0: the dQ kernel computes a straddling block whole, and a NaN or +inf there would give
        ``exp2(NaN - lse2)`` in a row whose P must be 0)."""
        p = self.program
        bias = None
        if p.side.bias is not None:
            bias = tiles.load_qk_tile(
                p.side.bias, p.start, k0, self.block_q, self.block_k, q_limit=p.q_load_limit, k_limit=k_limit,
                other=0.0,
            )
        return log2_logits(s, spec=p.spec, q_pos=self.q_pos, k_pos=k_pos, bias=bias, slope=self.slope)

    def visible(self, k0, k_pos, *, masked: bool, k_limit):
        """The tile's element mask (structural masks in masked blocks, a dense mask anywhere), or None."""
        p = self.program
        vis = None
        if masked:
            k_seg = None
            if p.own_seg is not None:
                k_seg = tiles.load_ids(p.side.segments.kv_ids, k0, self.block_k, limit=p.k_tail)[None, :]
            vis = visible(self.q_pos, k_pos, spec=p.spec, kv_limit=self.kv_limit, q_seg=p.own_seg, k_seg=k_seg)
        if p.side.mask is not None:
            tile = tiles.load_qk_tile(
                p.side.mask, p.start, k0, self.block_q, self.block_k, q_limit=p.q_tail, k_limit=k_limit, other=False
            )
            vis = tile if vis is None else (vis & tile)
        return vis
