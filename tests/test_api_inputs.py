"""Inputs as jax.nn takes them: NumPy arrays and lists, integer dtypes past int32, windows past every distance.

Each case is one that once gave a wrong result or an unhelpful error (a review of the drop-in against
``jax.nn.dot_product_attention``); values are judged against the float64 reference with the one tolerance table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import MosaicConfig
from pallas_flash.reference import attention_reference
from tests.conftest import TOLERANCE, rel_err

TOL = TOLERANCE[jnp.dtype(jnp.float32)]


def qkv(b=2, tq=6, tk=6, n=4, k=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32) for shape in
                 ((b, tq, n, h), (b, tk, k, h), (b, tk, k, h)))


def reference(q, k, v, **kw):
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
        return np.asarray(attention_reference(q, k, v, **kw))


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("window, same_as", [
    ((2**31 - 1, 0), (6, 0)),  # "no limit" to the left: causal
    ((0, 2**31 - 1), (0, 6)),
    ((2**31 - 1, 2**31 - 1), (6, 6)),
    ((2**31, 0), (6, 0)),  # past int32: still no limit, not an overflow
])
def test_a_window_wider_than_every_distance_is_no_limit(impl, window, same_as):
    q, k, v = (jnp.asarray(x) for x in qkv())
    out = pf.dot_product_attention(q, k, v, local_window_size=window, implementation=impl)
    assert rel_err(out, reference(q, k, v, local_window_size=same_as)) < TOL


def test_numpy_float64_and_list_inputs_are_taken_as_jax_nn_takes_them():
    q, k, v = (x.astype(np.float64) for x in qkv())  # x64 is off: jax.nn computes in float32
    want = jax.nn.dot_product_attention(q, k, v, bias=np.zeros((6, 6)))
    for impl in ("xla", "triton", None):
        out = pf.dot_product_attention(q, k, v, bias=np.zeros((6, 6)), implementation=impl)
        assert out.dtype == want.dtype == jnp.float32
        assert rel_err(out, reference(q, k, v)) < TOL
    mixed = pf.dot_product_attention(jnp.asarray(q, jnp.float32), k, v, implementation="triton")
    assert rel_err(mixed, reference(q, k, v)) < TOL
    unbatched = pf.dot_product_attention(q[0].tolist(), k[0].tolist(), v[0].tolist(), implementation="triton")
    assert rel_err(unbatched, reference(q, k, v)[0]) < TOL
    with pytest.raises(TypeError, match="key must be an array, got str"):
        pf.dot_product_attention(q, "k", v)


@pytest.mark.parametrize("lengths", [
    np.array([2**32 + 3, 4], np.int64),  # jnp.asarray would wrap it to 3
    jnp.array([2**32 - 1, 4], jnp.uint32),  # astype(int32) would wrap it to -1
    [2**40, 4],
])
@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_lengths_past_int32_are_clipped_never_wrapped(lengths, impl):
    q, k, v = qkv()
    out = pf.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, query_seq_lengths=lengths,
                                   implementation=impl)
    want = reference(q, k, v, key_value_seq_lengths=np.array([6, 4]), query_seq_lengths=np.array([6, 4]))
    assert rel_err(out, want) < TOL


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.uint8, np.int8])
@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_lengths_narrower_than_int32_keep_their_values(dtype, impl):
    # int32's bounds cast to int8 wrap to 0 and -1: clipping a JAX int8 array to them made every length -1
    q, k, v = qkv()
    lengths = (np if dtype is np.int8 else jnp).array([5, 3], dtype)
    out = pf.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, query_seq_lengths=lengths,
                                   implementation=impl)
    want = reference(q, k, v, key_value_seq_lengths=np.array([5, 3]), query_seq_lengths=np.array([5, 3]))
    assert rel_err(out, want) < TOL


def test_segment_ids_past_int32_are_refused():
    q, k, v = qkv()
    ids = np.zeros((2, 6), np.int64)
    ids[0, 3:] = 2**32  # would wrap onto document 0
    with pytest.raises(ValueError, match=r"q_segment_ids must fit int32.*\[0, 4294967296\]"):
        pf.dot_product_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=np.zeros((2, 6), np.int32))


def test_numpy_integer_windows():
    q, k, v = qkv()
    out = pf.dot_product_attention(q, k, v, local_window_size=(np.int64(2), np.int32(1)), implementation="triton")
    assert rel_err(out, reference(q, k, v, local_window_size=(2, 1))) < TOL
    with pytest.raises(TypeError, match="local_window_size"):
        pf.dot_product_attention(q, k, v, local_window_size=(np.bool_(True), 1))


def test_xla_residual_of_rows_past_the_query_length_is_minus_inf_as_the_kernels():
    q, k, v = qkv()
    lengths = np.array([3, 6])
    outs = {impl: pf.dot_product_attention(q, k, v, query_seq_lengths=lengths, return_residual=True,
                                           implementation=impl) for impl in ("xla", "triton")}
    for impl, (out, lse) in outs.items():
        assert np.all(np.isneginf(np.asarray(lse)[0, 3:])), impl
        assert np.all(np.asarray(out)[0, 3:] == 0), impl
        assert np.all(np.isfinite(np.asarray(lse)[0, :3])), impl
    assert rel_err(outs["xla"][1][np.isfinite(outs["xla"][1])], outs["triton"][1][np.isfinite(outs["triton"][1])]) < TOL


def test_xla_alibi_with_a_half_precision_bias_stays_float32():
    q, k, v = qkv(tq=40, tk=40)
    bias = jnp.asarray(np.random.default_rng(1).standard_normal((40, 40)), jnp.bfloat16)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    out = pf.dot_product_attention(q, k, v, bias=bias, alibi_slopes=slopes, is_causal=True, implementation="xla")
    want = reference(q, k, v, bias=np.asarray(bias.astype(jnp.float32)), alibi_slopes=slopes, is_causal=True)
    assert rel_err(out, want) < TOL


def test_a_backend_config_under_pallas_runs_that_backend_or_refuses():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="Mosaic GPU kernels do not implement a bias"):
        pf.dot_product_attention(q, k, v, bias=np.zeros((6, 6), np.float32), implementation="pallas",
                                 config=MosaicConfig())


def test_a_traced_scale_says_what_to_do():
    q, k, v = (jnp.asarray(x) for x in qkv())
    with pytest.raises(TypeError, match=r"static.*query \* t"):
        jax.jit(lambda t: pf.dot_product_attention(q, k, v, scale=t, implementation="xla"))(0.5)
