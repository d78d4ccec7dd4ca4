"""Non-finite inputs through the Mosaic GPU kernels: a NaN or inf never vanishes from the rows that see it.

``test_reliability.py`` checks this through ``implementation="pallas"`` at head dim 16, which runs the Triton
kernels on every GPU; the Mosaic kernels (head dims 64/128/256, bf16/fp16) have their own online softmax
(``exp2`` with the scale folded in, a running row max, masked and skipped blocks), so they are checked here
against jax.nn on the same inputs: every row whose jax.nn output is non-finite is non-finite here too, every
row jax.nn keeps finite stays finite and close, and a NaN reaches the loss and all three gradients.

On a CPU the kernels run in Mosaic GPU interpret mode (the backend's own calls, as ``pallas_flash.op`` makes
them; D=64, a few cases: each takes seconds); on a GPU the compiled kernels through the public API at
D 64/128/256, causal and not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicConfig, MosaicForwardConfig
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import POISONS, random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

# In interpret mode: 64-key blocks, so the poisoned key (row 70) sits in the second block and the first
# block's rows skip it under causal masking; small configs keep the interpreter quick.
INTERPRET_CONFIG = MosaicConfig(
    fwd=MosaicForwardConfig(64, 64, 2),
    bwd=MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2),
)
POISONED_ROW = 70  # a query row, or the key/value position poisoned


def _shape(head_dim: int) -> Shape:
    if ON_GPU:
        return Shape("nonfinite", 2, 333, 333, 4, 2, head_dim)
    return Shape("nonfinite", 1, 150, 150, 2, 1, head_dim)


def _mosaic(q, k, v, causal: bool):
    """``(out, lse)`` from the Mosaic kernels: compiled through the public API on a GPU, interpreted elsewhere."""
    if ON_GPU:
        return pf.attention_with_lse(q, k, v, is_causal=causal, implementation="mosaic")
    spec = AttentionSpec(scale=1.0 / np.sqrt(q.shape[-1]), causal=causal)
    out, lse2 = backends.get("mosaic").forward(q, k, v, AttentionInputs(), spec, config=INTERPRET_CONFIG,
                                               interpret=True)
    return out, lse2 * np.log(2.0)


def _mosaic_vjp(q, k, v, ct, *, causal: bool, q_lengths=None, kv_lengths=None):
    """``(out, (dq, dk, dv))`` from the Mosaic kernels under the output cotangent ``ct``: compiled through the
    public API on a GPU, the backend's own forward and backward (as ``pallas_flash.op`` calls them) interpreted
    elsewhere."""
    if ON_GPU:
        def f(q, k, v):
            return pf.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=q_lengths,
                                            key_value_seq_lengths=kv_lengths, implementation="mosaic")

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(ct)
    backend = backends.get("mosaic")
    spec = AttentionSpec(scale=1.0 / np.sqrt(q.shape[-1]), causal=causal, has_q_lengths=q_lengths is not None,
                         has_kv_lengths=kv_lengths is not None)
    inputs = AttentionInputs(q_lengths=q_lengths, kv_lengths=kv_lengths)
    out, lse2 = backend.forward(q, k, v, inputs, spec, config=INTERPRET_CONFIG, interpret=True)
    g = backend.backward(q, k, v, out, lse2, ct, jnp.zeros(lse2.shape, jnp.float32), inputs, spec,
                         config=INTERPRET_CONFIG, interpret=True, want_dbias=False, want_dslopes=False)
    return out, (g.dq, g.dk, g.dv)


def _poisoned(shape: Shape, name: str, seed: int):
    which, value = POISONS[name]
    q, k, v, _ = random_qkv(shape, jnp.bfloat16, seed)
    arrays = {"q": q, "k": k, "v": v}
    arrays[which] = arrays[which].at[0, POISONED_ROW, 0, 3].set(value)
    return arrays["q"], arrays["k"], arrays["v"]


FORWARD_CASES = (
    [pytest.param(name, causal, d, id=f"{name}-{'causal' if causal else 'full'}-d{d}")
     for name in POISONS for causal in (False, True) for d in (64, 128, 256)]
    if ON_GPU else
    [pytest.param(name, True, 64, id=f"{name}-causal-d64") for name in POISONS]
    + [pytest.param("nan_in_k", False, 64, id="nan_in_k-full-d64")]
)


@pytest.mark.parametrize("name, causal, head_dim", FORWARD_CASES)
def test_non_finite_inputs_reach_every_row_that_sees_them(name, causal, head_dim, seed):
    """As jax.nn: a non-finite q, k or v entry makes every row that sees it non-finite; where jax.nn stays
    finite, so do the kernels, and close to it."""
    shape = _shape(head_dim)
    q, k, v = _poisoned(shape, name, seed)
    got = np.asarray(_mosaic(q, k, v, causal)[0].astype(jnp.float32))
    want = np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla").astype(jnp.float32))
    which = POISONS[name][0]
    # The rows that see the poisoned entry: batch 0; query head 0 (q) or the query heads of KV head 0 (k, v).
    group = shape.num_heads // shape.num_kv_heads
    sees = np.zeros(got.shape[:3], bool)
    if which == "q":
        sees[0, POISONED_ROW, 0] = True
    else:
        sees[0, POISONED_ROW if causal else 0:, :group] = True
    assert not np.isfinite(want[sees]).all()  # the poison is visible to jax.nn (else this test proves nothing)
    assert np.array_equal(np.isfinite(got[sees]), np.isfinite(want[sees])), f"a row that sees {name} lost it"
    # jax.nn also spreads a NaN in V to rows that do not see it (0 * NaN in its P.V); where it is finite, so
    # are the kernels, and exact to the dtype's tolerance.
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all()
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[jnp.dtype(jnp.bfloat16)]


@pytest.mark.parametrize("head_dim", (64, 128, 256) if ON_GPU else (64,))
def test_nan_reaches_the_loss_and_every_gradient(head_dim, seed):
    """A NaN in one key reaches the loss (``<out, ct>``) and dQ, dK and dV under that cotangent (never a finite
    gradient from a NaN input)."""
    shape = _shape(head_dim)
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    k = k.at[0, POISONED_ROW, 0, 0].set(jnp.nan)
    out, grads = _mosaic_vjp(q, k, v, ct, causal=True)
    value = jnp.vdot(out.astype(jnp.float32), ct.astype(jnp.float32))
    assert np.isnan(float(value))
    for label, g in zip(("dq", "dk", "dv"), grads):
        assert np.isnan(np.asarray(g.astype(jnp.float32))).any(), f"{label} lost the NaN"


# Batch row 1 holds 100 keys and 90 queries; what its arrays hold past those (padding) is garbage.
KV_LENGTHS, Q_LENGTHS = (150, 100), (150, 90)
# Rows past batch row 1's lengths: the first past the length (inside the block straddling it), and one past both
# lengths further on.
GARBAGE_ROWS = {"first": {"q": Q_LENGTHS[1], "k": KV_LENGTHS[1], "v": KV_LENGTHS[1]}, "inside": dict.fromkeys("qkv", 120)}


@pytest.mark.parametrize("row", GARBAGE_ROWS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("head_dim", (64, 128, 256) if ON_GPU else (64,))
def test_garbage_past_the_lengths_reaches_nothing(which, head_dim, row, seed):
    """A NaN in a row past a batch row's query or key length (padding) reaches neither the output nor any
    gradient, as in the Triton kernels (``test_reliability.py``): a key block straddling the length is loaded
    whole, and ``0 * NaN`` in its products would otherwise spread the garbage over the whole batch row."""
    shape = Shape("padded", 2, 150, 150, 2, 1, head_dim)
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    arrays = {"q": q, "k": k, "v": v}
    arrays[which] = arrays[which].at[1, GARBAGE_ROWS[row][which], 0, 5].set(jnp.nan)
    out, grads = _mosaic_vjp(arrays["q"], arrays["k"], arrays["v"], ct, causal=False,
                             q_lengths=jnp.asarray(Q_LENGTHS, jnp.int32), kv_lengths=jnp.asarray(KV_LENGTHS, jnp.int32))
    leaked = [label for label, x in zip(("out", "dq", "dk", "dv"), (out, *grads))
              if not np.isfinite(np.asarray(x.astype(jnp.float32))).all()]
    assert not leaked, f"the garbage in {which} reached {leaked}"


@pytest.mark.parametrize("block", [64, 128])
def test_straddling_blocks_hold_the_rows_of_the_block_across_each_length(block, seed):
    """The copies the kernels load instead of the block across a length: that block's rows, zeroed from the
    length on; lengths of 0, a block multiple (the block after it, never loaded: all zeros), inside the last
    partial block, and the whole array."""
    from pallas_flash.backends.mosaic_gpu.common import straddling_blocks

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 300, 2, 3)).astype(np.float32)
    lengths = np.asarray([0, block, 150, 299, 300, int(rng.integers(1, 300))], np.int32)
    got = np.asarray(straddling_blocks(jnp.asarray(x), jnp.asarray(lengths), block))
    assert got.shape == (6, block, 2, 3)
    for b, length in enumerate(lengths):
        start = (length // block) * block
        want = np.zeros((block, 2, 3), np.float32)
        live = max(0, min(length, 300) - start)
        want[:live] = x[b, start:start + live]
        np.testing.assert_array_equal(got[b], want, err_msg=f"batch row {b}, length {length}")


@pytest.mark.parametrize("block", [64, 128])
def test_zero_straddling_rows_zeroes_the_block_across_each_length_only(block, seed):
    """The D=256 backward's clean-up of dK/dV: rows at or past a length inside the block across it become 0,
    every other row (before the length, and in blocks wholly past it) is left as it was."""
    from pallas_flash.backends.mosaic_gpu.common import zero_straddling_rows

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 320, 2, 3)).astype(np.float32)
    lengths = np.asarray([0, block, 150, 319, 320, int(rng.integers(1, 320))], np.int32)
    got = np.asarray(zero_straddling_rows(jnp.asarray(x), jnp.asarray(lengths), block))
    want = x.copy()
    for b, length in enumerate(lengths):
        start = (length // block) * block
        want[b, length:start + block] = 0.0
    np.testing.assert_array_equal(got, want)


# Rows whose keys all lie past the batch row's key length (their window starts past it, or their segment's keys are
# all past it) see no key: the forward still runs one fully masked key block for them, which has to lie inside the key
# length, where the rows are real or the zeroed copy of the block across it (a block wholly past it held padding, and
# 0 * NaN in its P V made those rows NaN, and through delta the dK of valid keys and, fused, their dQ: NOTES 79).
# Batch row 0: 192 queries and keys, keys past 64 (or past 1) are padding; 64-key blocks and 64-row tiles.
SEE_NOTHING_T = 192
SEE_NOTHING_CASES = {
    "window": (64, dict(local_window_size=(0, 0))),
    "causal_window": (1, dict(is_causal=True, local_window_size=(5, 0))),
    "segments": (64, dict(q_segment_ids=np.repeat([0, 1, 2], 64)[None], kv_segment_ids=np.repeat([0, 1, 2], 64)[None])),
}
SEE_NOTHING_CONFIGS = {
    "turns_deterministic": MosaicConfig(fwd=MosaicForwardConfig(64, 64, 2), bwd=INTERPRET_CONFIG.bwd),
    "overlap_fused": MosaicConfig(fwd=MosaicForwardConfig(64, 64, 2, overlap=True),
                                  bwd=MosaicBackwardConfig(num_stages=2, deterministic=False)),
}


@pytest.mark.parametrize("config", SEE_NOTHING_CONFIGS)
@pytest.mark.parametrize("case", SEE_NOTHING_CASES)
def test_rows_that_see_no_key_past_the_key_length_stay_clean(case, config, seed):
    """NaN padding past the key length: the output is 0 on the rows that see no key and matches the float64
    reference on clean inputs everywhere, values and gradients under a random cotangent."""
    kv_len, kwargs = SEE_NOTHING_CASES[case]
    kwargs = {name: jnp.asarray(x, jnp.int32) if "segment" in name else x for name, x in kwargs.items()}
    shape = Shape("see_nothing", 1, SEE_NOTHING_T, SEE_NOTHING_T, 2, 1, 64)
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    lengths = dict(key_value_seq_lengths=jnp.asarray([kv_len], jnp.int32))

    def mosaic(q, k, v):
        return pf.dot_product_attention(q, k, v, implementation="mosaic", config=SEE_NOTHING_CONFIGS[config],
                                        **lengths, **kwargs)

    def reference(q, k, v):
        return pf.dot_product_attention(q, k, v, implementation="xla", **lengths, **kwargs)

    padded = {name: x.at[:, kv_len:].set(jnp.nan) for name, x in (("k", k), ("v", v))}
    out, vjp = jax.vjp(mosaic, q, padded["k"], padded["v"])
    grads = [g[:, :kv_len] if label != "dq" else g for label, g in zip(("dq", "dk", "dv"), vjp(ct))]
    with jax.enable_x64(True):
        f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, ct)]
        want_out, want_vjp = jax.vjp(reference, *f64[:3])
        want_grads = [g[:, :kv_len] if label != "dq" else g
                      for label, g in zip(("dq", "dk", "dv"), want_vjp(f64[3]))]
        want_out, want_grads = np.asarray(want_out), [np.asarray(g) for g in want_grads]
    got_out = np.asarray(out.astype(jnp.float32))
    nan_rows = np.where(~np.isfinite(got_out).all(axis=(0, 2, 3)))[0]
    assert np.isfinite(got_out).all(), f"NaN padding reached rows {nan_rows}"
    assert np.abs(want_out[0, 128:]).max() == 0.0  # the reference's rows that see no key
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    for label, got, want in zip(("out", "dq", "dk", "dv"), (got_out, *grads), (want_out, *want_grads)):
        got = np.asarray(jnp.asarray(got).astype(jnp.float32))
        assert np.isfinite(got).all(), f"{label}: NaN padding reached it"
        err = rel_err(got, want)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({case}, {config})"
