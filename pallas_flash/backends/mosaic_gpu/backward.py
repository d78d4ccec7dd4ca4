"""FlashAttention backward for Hopper (sm_90): Pallas kernels on the Mosaic GPU backend.

The gradients are recomputed from the forward's residuals ``(q, k, v, out,
lse2)``: ``P = exp2(s * scale * log2(e) - lse2)`` (one multiply-add and an
``exp2`` per logit; ``lse2`` is the log2-domain log-sum-exp the forward saves),
``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dlse`` (XLA, one pass
over ``out`` and ``dO``), ``dV = P^T dO``, ``dK = scale * dS^T Q``,
``dQ = scale * dS K``.

dK/dV kernel (``backward_dkdv.py``): one CTA per (batch, KV head, 128 keys), three warpgroups.

- the memory warpgroup streams, for every query head of the KV head's GQA
  group and every query block that sees the CTA's keys, the ``Q`` and ``dO``
  blocks (TMA, swizzled shared memory) and their ``lse2`` and ``delta`` rows
  into a ring of ``num_stages`` slots (``q_ready``/``do_ready``; both compute
  warpgroups release a slot through ``q_consumed``/``do_consumed``);
- two compute warpgroups each own 64 keys (their K and V tiles stay in shared
  memory) and their ``dK``/``dV`` accumulators in registers, so GQA is summed
  on chip. Per block, transposed so that the keys are the wgmma M dimension:
  ``S^T = K Q^T`` and ``dP^T = V dO^T`` are issued together, ``P^T`` is formed
  as soon as ``S^T`` lands (``dP^T`` still in flight), ``dV += P^T dO`` runs
  while ``dS^T`` is formed, then ``dK += dS^T Q`` (P and dS as register
  operands).
- ``dQ`` (``deterministic=False``): each warpgroup writes its ``dS^T`` tile to
  shared memory (``ds_ready``), and warpgroup ``w`` computes half ``w`` of the
  head dim of ``dS K`` over all 128 keys (``dS`` read transposed from shared
  memory), which it adds to a float32 ``dQ`` accumulator in global memory with
  a TMA reduction (``cp.reduce.async.bulk``, ``add``). The dQ product of a
  block runs one step late, in the next block's step: a warpgroup then needs
  the partner's ``dS^T`` of a block the partner finished a step ago, instead
  of meeting it every block. Two ``dS^T`` buffers alternate (``ds_consumed``:
  both warpgroups' dQ has read one). The first step has no block before it:
  where it fits, a third buffer, never written, feeds it a product whose result
  is dropped (the schedule measured since 2026-12-01); where it does not (128-row
  steps at D=64, +11-14% bwd alone at N=1k-16k non-causal, ``benchmarks/NOTES.md``
  58), that step's product sits under a condition instead. On an H200
  (bf16, bwd alone, 2026-12-01) that schedule took D=128 N=16k from 470 to
  500 TFLOP/s and D=64 from 395 to 412; issuing dQ ahead of dK, rotating
  each CTA's first query block, and starting one warpgroup half a step late
  were no better (``benchmarks/NOTES.md``). The order of the additions between
  CTAs is not fixed, so the float32 sums, hence ``dQ``, may differ in the last
  bits from run to run.
- ``dQ`` (``deterministic=True``, the default): the dQ kernel of
  ``backward_dq.py``, laid out like the forward, recomputes ``S`` and ``dP``
  and accumulates ``dQ += dS K`` in registers. Nothing is summed across CTAs,
  so every output is bit-identical run to run. It does 7 matrix products per
  block pair instead of 5; on an H200 (bf16, fwd+bwd, 2026-12-01, after the
  one-step-late dQ above) it was 0.93-0.95x the fused mode's TFLOP/s at
  N=16k, 0.98-1.02x at 4k and 1.02-1.08x at 1k. The fused kernel is bound by
  shared-memory bandwidth as much as by the tensor cores: per 64-row step a
  CTA moves ~370 KB through shared memory (wgmma operands of N=64 products,
  the Q/dO loads, dS^T, the float32 dQ halves and their reduction) against
  ~10 MFLOP of products (``benchmarks/NOTES.md``).

Causal attention and local windows are a loop split in both kernels: blocks
no row sees are never loaded, blocks every row sees entirely run with no mask,
only blocks across the diagonal (``row >= col``, queries and keys counted from
0, as the forward) or the window's edges are masked: the dK/dV kernel streams
the query blocks whose windows reach its keys, the dQ kernel the key blocks
from its rows' first. Lengths need not be block multiples: the launcher pads the
sequences to whole 128-row tiles (zeros; ``lse2`` of padded rows ``+inf`` so
their ``P`` is exactly 0) and slices the outputs; keys past ``Tk`` are masked
where they could reach ``dQ``. Per-batch lengths (``inputs``): keys at or past
a batch row's key length are masked like those past ``Tk`` (a dK/dV tile of
such keys only writes zeros; the dQ kernel does not load their blocks); rows
past a query length have ``lse2 = -inf`` (so ``P`` is 0) and ``delta = 0``
(the launcher); query blocks wholly past it are not streamed, dQ tiles
wholly past it load no key block. Whatever the rows past a length hold (padding
garbage, NaN) must not reach a product, where ``0 * NaN`` would spread it: the
128-row blocks straddling the lengths come from small copies zeroed past them
(``common.straddling_operands``, ``copy_block``), built by XLA in a few rows
per batch row, instead of zeroing all of ``Q``, ``K``, ``V`` and ``dO``.

Interpret mode (``interpret=True``: ``plgpu.InterpretGPUParams`` on the CPU)
runs both kernels with the same pipelines, barriers, masks and arithmetic,
with two substitutions, both because the primitive has no interpreter rule in
jax 0.11.2: a wgmma whose left operand is in registers (``P^T``, ``dS^T``,
``dS``; the interpreter reads both operands as shared-memory allocations) is
fed from a shared-memory copy of that operand; and the TMA reduction of the
non-deterministic ``dQ`` ("NotImplementedError: reduction_op not supported")
becomes a plain TMA store of each CTA's partial ``dQ`` into its own slice of a
``[B, key tiles, Tq, N, D]`` buffer that XLA sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_flash.backends.base import Gradients, softmax_delta
from pallas_flash.backends.mosaic_gpu.backward_dkdv import launch_dkdv
from pallas_flash.backends.mosaic_gpu.backward_dq import launch_dq
from pallas_flash.backends.mosaic_gpu.backward_wide import launch_wide
from pallas_flash.backends.mosaic_gpu.common import clipped_lengths, straddling_operands
from pallas_flash.backends.mosaic_gpu.config import TILE, WIDE_HEAD_DIMS, MosaicBackwardConfig
from pallas_flash.spec import AttentionInputs, AttentionSpec

__all__ = ["mosaic_backward"]


def _pad_rows(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def mosaic_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse2: jax.Array,
    do: jax.Array,
    dlse: jax.Array | None,
    *,
    spec: AttentionSpec,
    config: MosaicBackwardConfig,
    inputs: AttentionInputs | None = None,
    interpret: bool = False,
) -> Gradients:
    """``Gradients(dq, dk, dv)`` of plain, causal or windowed attention (GQA allowed) from the forward's residuals, with
    per-batch sequence lengths (``inputs.q_lengths``/``kv_lengths``) and segment ids.

    The caller (``MosaicBackend``) has checked the call: no dense masks, bias,
    ALiBi, soft-cap, dropout or offsets; bf16/fp16;
    head dim 64 or 128 (the kernels above), or 256 (``backward_wide.py``).
    """
    seq_q, head_dim = q.shape[1], q.shape[-1]
    seq_k = k.shape[1]
    config.check_fits(head_dim, q.dtype)
    inputs = AttentionInputs() if inputs is None else inputs
    delta = softmax_delta(out, do, dlse)
    kv_lengths = q_lengths = None
    if spec.has_kv_lengths:  # clipped to the array: a length past the end means every key
        kv_lengths = clipped_lengths(inputs.kv_lengths, seq_k)
    if spec.has_q_lengths:
        # Rows past a batch row's query length see no key: their P and dS are 0 (lse2 = -inf -> +inf below).
        # The kernels skip the query blocks wholly past a length.
        q_lengths = clipped_lengths(inputs.q_lengths, seq_q)
        live = jnp.arange(seq_q)[None, :] < q_lengths[:, None]
        delta = jnp.where(live[:, None, :], delta, 0.0)
    tq_pad, tk_pad = pl.cdiv(seq_q, TILE) * TILE, pl.cdiv(seq_k, TILE) * TILE
    # Padded query rows: zero Q and dO, lse2 = +inf (P = 0 exactly), delta = 0. A row that saw no
    # key (lse2 = -inf: lengths) gets +inf too: its P is 0.
    lse2 = _pad_rows(jnp.where(jnp.isneginf(lse2), jnp.inf, lse2), tq_pad, 2, jnp.inf)
    delta = _pad_rows(delta, tq_pad, 2)
    q_p, do_p = _pad_rows(q, tq_pad, 1), _pad_rows(do, tq_pad, 1)
    k_p, v_p = _pad_rows(k, tk_pad, 1), _pad_rows(v, tk_pad, 1)
    # A block straddling a length is loaded whole: its rows past the length (whatever they hold, NaN included)
    # would reach dP = dO V^T, dQ = dS K, dK = dS^T Q and dV = P^T dO through 0 * NaN. The kernels load the
    # 128-row blocks straddling the lengths from these copies, zeroed past them, instead.
    tails = straddling_operands(q_p, k_p, v_p, do_p, q_lengths, kv_lengths, TILE)
    common = dict(spec=spec, config=config, interpret=interpret, tails=tails)
    segments = None
    if spec.has_segments:  # padded by repeating the last id, so that the padding widens no block's id range
        segments = (jnp.pad(inputs.q_segment_ids.astype(jnp.int32), ((0, 0), (0, tq_pad - seq_q)), mode="edge"),
                    jnp.pad(inputs.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, tk_pad - seq_k)), mode="edge"))
    if head_dim in WIDE_HEAD_DIMS:  # the role split of ``backward_wide.py``
        dq, dk, dv = launch_wide(q_p, k_p, v_p, do_p, lse2, delta, kv_lengths, q_lengths, segments, seq_q=seq_q,
                                 seq_k=seq_k, **common)
        return Gradients(dq[:, :seq_q], dk[:, :seq_k], dv[:, :seq_k])
    dq, dk, dv = launch_dkdv(q_p, k_p, v_p, do_p, lse2, delta, kv_lengths, q_lengths, segments, seq_q=seq_q,
                              seq_k=seq_k, **common)
    if dq is None:
        dq = launch_dq(q_p, k_p, v_p, do_p, lse2, delta, kv_lengths, q_lengths, segments, seq_k=seq_k, **common)
    return Gradients(dq[:, :seq_q], dk[:, :seq_k], dv[:, :seq_k])
