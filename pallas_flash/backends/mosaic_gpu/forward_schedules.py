"""The forward kernel's two schedules for a compute warpgroup's pass over one query tile's key blocks.

``forward.py`` runs one of them per query tile (``MosaicForwardConfig.overlap``):

- ``turn_taking``: per key block, ``S = Q K^T``, hand the tensor cores to the
  partner warpgroup, softmax, take them back, ``O += P V``. ``wg_turn`` is the
  rendezvous both warpgroups arrive at to hand the turn over.
- ``overlapped`` (FlashAttention-3's intra-warpgroup overlap): block ``j + 1``'s
  ``S`` is issued together with block ``j``'s ``P V``, and the softmax of ``S``
  runs while ``P V`` is still on the tensor cores (``O`` is rescaled once it has
  landed). ``wg_token[w]`` is warpgroup ``w``'s token to issue, passed to the
  next warpgroup (round the two or three of them) right after it has issued. The token passes on from tile to tile:
  ``forward.py`` gives it to warpgroup 0 before the CTA's first tile and takes
  warpgroup 1's last hand-over after its last. Masked blocks wait for ``P V`` before
  they are masked: masking while it is in flight makes ptxas serialize every
  wgmma of the kernel (its warning C7513).

Both keep the two warpgroups' turns in step when one of them sees fewer key
blocks than the other (causal, a window): the partner's extra blocks, before
or after its own, are released, and their turns taken, without computing. The K/V ring's slots continue from the
tile before (``ForwardTile.step``), as the memory warpgroup's do.

Interpret mode (no interpreter rule in jax 0.11.2 for ``pl.run_state`` with
``plgpu.ACC.init``, nor for a wgmma whose left operand is in registers): P is
staged through shared memory and ``P V`` goes into a fresh accumulator added
in registers; the order of the issues, waits and barriers is the GPU's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu.common import COL, WGMMA, bcast, i32

__all__ = ["ForwardTile", "turn_taking", "overlapped"]


@dataclasses.dataclass(frozen=True)
class ForwardTile:
    """One compute warpgroup's view of one query tile: its refs, the static parameters, the tile's bounds."""

    q_smem: Any
    k_smem: Any
    v_smem: Any
    k_ready: Any
    v_ready: Any
    k_consumed: Any
    v_consumed: Any
    wg_turn: Any
    wg_token: Any
    p_smem: Any
    seq_k: int
    block_q: int
    block_kv: int
    num_stages: int
    left: int | None  # keys j >= i - left are visible to row i (a window), or None
    right: int | None  # keys j <= i + right (0: causal), or None
    scale_log2: float
    interpret: bool
    wg: Any  # this compute warpgroup (0 .. compute_wgs - 1)
    compute_wgs: int  # the CTA's compute warpgroups (static: 2, or 3 with the overlapped schedule)
    q_base: Any  # its first query row
    kv_start: Any  # the first key block its rows see
    kv_lo: Any  # blocks kv_lo .. kv_unmasked - 1 need no mask (those before: the window's left edge, other ids)
    kv_unmasked: Any
    kv_end: Any  # one past the last key block its rows see
    cta_kv_start: Any  # the key blocks the CTA's rows see (the memory warpgroup loads these)
    cta_kv_end: Any
    step: Any  # ring steps taken before this tile
    after_first_s: Callable[[], None]  # called once this tile's first S has landed (the next Q may load)
    kv_len: Any = None  # this batch row's key length (``key_value_seq_lengths``), or None
    q_len: Any = None  # this batch row's query length (``query_seq_lengths``), or None
    kvseg_smem: Any = None  # segment ids: each K/V slot's keys' ids, or None
    q_seg: Any = None  # and this warpgroup's rows' ids (ROW layout)

    @property
    def needs_mask(self) -> bool:  # static: some key block is masked
        return self.right is not None or self.left is not None or self.seq_k % self.block_kv != 0 or self.has_lengths

    @property
    def has_lengths(self) -> bool:  # static: a row may see no key at all (its l stays 0)
        return self.kv_len is not None or self.q_len is not None or self.left is not None or (
            self.right is not None and self.right < 0) or self.kvseg_smem is not None

    def slot(self, kb):
        return lax.rem(self.step + kb - self.cta_kv_start, jnp.int32(self.num_stages))

    @property
    def masks_front(self) -> bool:  # static: blocks kv_start .. kv_lo - 1 are masked (a window's left edge, ids)
        return self.may_start_late  # the same two cases

    @property
    def may_start_late(self) -> bool:  # static: this warpgroup's first block may come after the CTA's
        return self.left is not None or self.kvseg_smem is not None

    def kv_seg(self, kb, masked: bool):
        """Block ``kb``'s keys' segment ids (COL layout), read before its K slot is released; None without ids."""
        if not masked or self.kvseg_smem is None:
            return None
        return plgpu.load(self.kvseg_smem.at[self.slot(kb)], layout=COL)

    def mask(self, s, kb, kv_seg=None):
        """Logits set to -inf where the key is past ``Tk`` (or the batch row's key length), outside the row's
        window (``right = 0``: causal), or the row is past the batch row's query length."""
        cols = kb * self.block_kv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=WGMMA)
        if self.right is not None or self.left is not None or self.q_len is not None:
            rows = self.q_base + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=WGMMA)
        conditions = []
        if self.kv_len is not None:  # kv_len <= Tk (the launcher clips it)
            conditions.append(cols < self.kv_len)
        elif self.seq_k % self.block_kv:
            conditions.append(cols < self.seq_k)
        if self.right is not None:
            conditions.append(cols <= rows + self.right)
        if self.left is not None:
            conditions.append(cols >= rows - self.left)
        if self.q_len is not None:
            conditions.append(rows < self.q_len)
        if kv_seg is not None:  # the same segment
            conditions.append(bcast(self.q_seg, s.shape, 0) == bcast(kv_seg, s.shape, 1))
        visible = functools.reduce(lambda a, b: a & b, conditions)
        return jnp.where(visible, s, -jnp.inf)

    def softmax(self, s, m):
        """Online softmax in the log2 domain: ``(p, m_new, alpha)``; ``m`` is the running max of s * scale * log2(e)."""
        c = self.scale_log2

        def finite(m_new):  # a row that has seen no key yet keeps m = -inf and subtracts 0 (p, alpha = 0, not NaN)
            return jnp.where(m_new == -jnp.inf, 0.0, m_new) if self.has_lengths else m_new

        if c > 0:  # max(s) * c == max(s * c) only for c > 0
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            m_sub = finite(m_new)
            p = jnp.exp2(s * c - bcast(m_sub, s.shape, 0))
        else:
            s = s * c
            m_new = jnp.maximum(m, s.max(axis=1))
            m_sub = finite(m_new)
            p = jnp.exp2(s - bcast(m_sub, s.shape, 0))
        return p, m_new, jnp.exp2(m - m_sub)

    def release(self, kb):
        """A block only the partner warpgroup sees: observe its arrival and release its slots."""
        slot = self.slot(kb)
        plgpu.barrier_wait(self.k_ready.at[slot])
        plgpu.barrier_wait(self.v_ready.at[slot])
        plgpu.barrier_arrive(self.k_consumed.at[slot])
        plgpu.barrier_arrive(self.v_consumed.at[slot])


def turn_taking(t: ForwardTile, carry):
    """``(acc, m, l)`` after the tile's key blocks: per block S = Q K^T, turn over, softmax, turn back, O += P V.
    Two compute warpgroups (``wg_turn`` is their rendezvous)."""
    dtype = t.q_smem.dtype
    sum_before_pv = t.q_smem.shape[-1] <= 128

    def take_turn():
        plgpu.barrier_arrive(t.wg_turn)
        plgpu.barrier_wait(t.wg_turn)

    if not t.may_start_late:
        plgpu.barrier_wait(t.k_ready.at[t.slot(t.kv_start)])
        pl.when(t.wg == 1)(take_turn)  # one turn behind: warpgroup 0 goes first
    else:
        pl.when(t.wg == 1)(take_turn)

        @pl.loop(i32(t.cta_kv_start), i32(t.kv_start))
        def _release_before(kb):  # blocks only the partner sees (its window starts earlier)
            t.release(kb)
            take_turn()
            take_turn()

        plgpu.barrier_wait(t.k_ready.at[t.slot(t.kv_start)])

    def kv_step(kb, carry, *, masked: bool):
        acc, m, l = carry
        slot = t.slot(kb)

        def qk(s_ref):
            plgpu.wgmma(s_ref, t.q_smem, t.k_smem.at[slot].T)
            take_turn()
            return s_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((t.block_q, t.block_kv), jnp.float32))
        kv_seg = t.kv_seg(kb, masked)
        plgpu.barrier_arrive(t.k_consumed.at[slot])
        pl.when(kb == t.kv_start)(t.after_first_s)
        if masked:
            s = t.mask(s, kb, kv_seg)
        p, m_new, alpha = t.softmax(s, m)
        acc = acc * bcast(alpha, acc.shape, 0)
        l = l * alpha
        p16 = p.astype(dtype)
        if sum_before_pv:  # (the order FA3-style Mosaic kernels found fastest: before the PV turn up to D=128)
            l = l + p.sum(axis=1)
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))

        plgpu.barrier_arrive(t.wg_turn)
        plgpu.barrier_wait(t.v_ready.at[slot])
        plgpu.barrier_wait(t.wg_turn)

        def wait_next_k():
            @pl.when(kb + 1 < t.kv_end)
            def _():
                plgpu.barrier_wait(t.k_ready.at[t.slot(kb + 1)])

        if t.interpret:
            p_tile = t.p_smem.at[t.wg]
            p_tile[...] = p16
            plgpu.commit_smem()

            def pv_fresh(o_ref):
                plgpu.wgmma(o_ref, p_tile, t.v_smem.at[slot])
                wait_next_k()
                return o_ref[...]

            acc = acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
            if not sum_before_pv:
                l = l + p.sum(axis=1)
        else:

            def pv(refs):
                o_ref, l_ref = refs
                plgpu.wgmma(o_ref, p16, t.v_smem.at[slot])
                if not sum_before_pv:  # while the wgmma runs
                    l_ref[...] += p.sum(axis=1)
                wait_next_k()

            acc, l = pl.run_state(pv)((plgpu.ACC.init(acc), l))
        plgpu.barrier_arrive(t.v_consumed.at[slot])
        return acc, m_new, l

    if t.masks_front:  # the window's left edge, the blocks of other ids
        carry = lax.fori_loop(i32(t.kv_start), i32(t.kv_lo), functools.partial(kv_step, masked=True), carry)
    carry = lax.fori_loop(i32(t.kv_lo), i32(t.kv_unmasked), functools.partial(kv_step, masked=False), carry)
    if t.needs_mask:
        carry = lax.fori_loop(i32(t.kv_unmasked), i32(t.kv_end), functools.partial(kv_step, masked=True), carry)

    @pl.loop(i32(t.kv_end), i32(t.cta_kv_end))
    def _release_unseen(kb):
        t.release(kb)  # and keep the turns in step
        take_turn()
        take_turn()

    pl.when(t.wg == 0)(take_turn)
    return carry


def overlapped(t: ForwardTile, carry):
    """``(acc, m, l)`` after the tile's key blocks: block ``kb``'s ``S = Q K^T`` is issued with block ``kb - 1``'s
    ``O += P V``, and the softmax of ``S`` runs while ``P V`` is on the tensor cores. Each warpgroup has
    ``cta_kv_end - cta_kv_start + 1`` turns to issue, those of blocks it does not see included, so the turns stay
    in step."""
    acc, m, l = carry
    dtype = t.q_smem.dtype
    wg = t.wg
    p_tile = t.p_smem.at[wg] if t.interpret else None

    def issue_turn(issue):
        plgpu.barrier_wait(t.wg_token.at[wg])
        issue()
        next_wg = 1 - wg if t.compute_wgs == 2 else lax.rem(wg + 1, i32(t.compute_wgs))  # the token goes round
        plgpu.barrier_arrive(t.wg_token.at[next_wg])

    def scores_and_softmax(kb, m, l, *, masked, pv_ref=None, p16=None):
        """Issue S = Q K_kb^T (and O += P V_{kb-1} into ``pv_ref``); ``(p, m_new, alpha, l_new)`` of S."""
        k_slot = t.slot(kb)

        def scoped(s_ref):
            def issue():
                plgpu.wgmma(s_ref, t.q_smem, t.k_smem.at[k_slot].T)
                if pv_ref is not None:
                    plgpu.wgmma(pv_ref, p_tile if t.interpret else p16, t.v_smem.at[t.slot(kb - 1)])

            issue_turn(issue)
            # A masked block waits for P V too (masking while it is in flight serializes the kernel's wgmmas).
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if pv_ref is None or masked else 1)

        s = pl.run_scoped(scoped, plgpu.ACC((t.block_q, t.block_kv), jnp.float32))
        kv_seg = t.kv_seg(kb, masked)
        plgpu.barrier_arrive(t.k_consumed.at[k_slot])
        if masked:
            s = t.mask(s, kb, kv_seg)
        p, m_new, alpha = t.softmax(s, m)
        return p, m_new, alpha, l * alpha + p.sum(axis=1)

    def stage_p(p16):
        if t.interpret:  # the next P V reads P from shared memory
            p_tile[...] = p16
            plgpu.commit_smem()

    if t.may_start_late:

        @pl.loop(i32(t.cta_kv_start), i32(t.kv_start))
        def _release_before(kb):  # blocks only the partner sees (its window starts earlier)
            t.release(kb)
            issue_turn(lambda: None)

    plgpu.barrier_wait(t.k_ready.at[t.slot(t.kv_start)])
    p, m, _, l = scores_and_softmax(i32(t.kv_start), m, l, masked=t.needs_mask)
    t.after_first_s()
    p16 = p.astype(dtype)
    stage_p(p16)

    def kv_step(j, carry, *, masked: bool):
        acc, m, l, p16 = carry
        v_slot = t.slot(j)
        plgpu.barrier_wait(t.k_ready.at[t.slot(j + 1)])
        plgpu.barrier_wait(t.v_ready.at[v_slot])
        if t.interpret:

            def pv_fresh(o_ref):
                out = scores_and_softmax(j + 1, m, l, masked=masked, pv_ref=o_ref)
                return (*out, o_ref[...])

            p, m, alpha, l, pv = pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
            acc = acc + pv
            p16 = p.astype(dtype)
            stage_p(p16)
        else:

            def pv(refs):
                o_ref, m_ref, l_ref, alpha_ref, p_ref = refs
                p, m_new, alpha, l_new = scores_and_softmax(j + 1, m, l, masked=masked, pv_ref=o_ref, p16=p16)
                m_ref[...] = m_new
                l_ref[...] = l_new
                alpha_ref[...] = alpha
                p_ref[...] = p.astype(dtype)

            acc, m, l, alpha, p16 = pl.run_state(pv)((plgpu.ACC.init(acc), m, l, m, p16))
        plgpu.barrier_arrive(t.v_consumed.at[v_slot])
        return acc * bcast(alpha, acc.shape, 0), m, l, p16

    # Step j finishes block j's P V and starts block j + 1's S; block j + 1 needs no mask in [kv_lo, kv_unmasked).
    carry = (acc, m, l, p16)
    last_step = i32(t.kv_end) - 1
    if t.masks_front:  # the window's left edge, the blocks of other ids
        first_unmasked_step = jnp.clip(i32(t.kv_lo) - 1, i32(t.kv_start), last_step)
        last_unmasked_step = jnp.clip(i32(t.kv_unmasked) - 1, first_unmasked_step, last_step)
        carry = lax.fori_loop(i32(t.kv_start), first_unmasked_step, functools.partial(kv_step, masked=True), carry)
    else:
        first_unmasked_step = i32(t.kv_start)
        last_unmasked_step = jnp.maximum(i32(t.kv_unmasked) - 1, first_unmasked_step)
    carry = lax.fori_loop(first_unmasked_step, last_unmasked_step, functools.partial(kv_step, masked=False), carry)
    if t.needs_mask:
        carry = lax.fori_loop(last_unmasked_step, last_step, functools.partial(kv_step, masked=True), carry)
    acc, m, l, p16 = carry

    slot = t.slot(i32(t.kv_end) - 1)
    plgpu.barrier_wait(t.v_ready.at[slot])
    if t.interpret:

        def pv_fresh(o_ref):
            issue_turn(lambda: plgpu.wgmma(o_ref, p_tile, t.v_smem.at[slot]))
            return o_ref[...]

        acc = acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
    else:
        acc = pl.run_state(lambda o_ref: issue_turn(lambda: plgpu.wgmma(o_ref, p16, t.v_smem.at[slot])))(
            plgpu.ACC.init(acc))
    plgpu.barrier_arrive(t.v_consumed.at[slot])

    @pl.loop(i32(t.kv_end), i32(t.cta_kv_end))
    def _release_unseen(kb):
        t.release(kb)
        issue_turn(lambda: None)

    return acc, m, l
