"""Bad input gets a clear error that names the argument; unsupported calls raise NotImplementedError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv
from tests.conftest import rel_err


def qkv(b=1, tq=8, tk=8, n=2, k=2, h=16, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((b, tq, n, h)), dtype),
        jnp.asarray(rng.standard_normal((b, tk, k, h)), dtype),
        jnp.asarray(rng.standard_normal((b, tk, k, h)), dtype),
    )


ENTRY_POINTS = {
    "flash_attention": lambda q, k, v: pf.flash_attention(q, k, v),
    "dot_product_attention": lambda q, k, v: pf.dot_product_attention(q, k, v, implementation="pallas"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: (qkv()[0][0], *qkv()[1:]), ValueError, ["query", "rank 4", "(8, 2, 16)"]),
        (lambda: (qkv()[0], qkv(h=32)[1], qkv(h=32)[2]), ValueError, ["head_dim", "(1, 8, 2, 16)", "(1, 8, 2, 32)"]),
        (lambda: (qkv(n=3)[0], *qkv(k=2)[1:]), ValueError, ["multiple", "(1, 8, 3, 16)", "(1, 8, 2, 16)"]),
        (lambda: (qkv(b=2)[0], *qkv(b=1)[1:]), ValueError, ["batch", "(2, 8, 2, 16)", "(1, 8, 2, 16)"]),
        (lambda: (qkv()[0], qkv()[1], qkv(tk=9)[2]), ValueError, ["value", "(1, 8, 2, 16)", "(1, 9, 2, 16)"]),
        (lambda: (qkv()[0], *qkv(dtype=jnp.bfloat16)[1:]), TypeError, ["dtype", "float32", "bfloat16"]),
        (lambda: tuple(x.astype(jnp.int32) for x in qkv()), TypeError, ["query", "floating", "int32"]),
        (lambda: ("q", *qkv()[1:]), TypeError, ["query", "array", "str"]),  # (lists are arrays, as in jax.nn)
        (lambda: qkv(h=0), ValueError, ["head_dim must be at least 1", "(1, 8, 2, 0)"]),
    ],
    ids=["rank", "head_dim", "heads_not_divisible", "batch", "kv_shape", "dtype_mismatch", "int_dtype", "not_array",
         "head_dim_zero"],
)
def test_bad_input_raises_named_error(entry, make, error, words):
    with pytest.raises(error) as info:
        entry(*make())
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(implementation="bogus"), ValueError, "implementation"),
        (dict(implementation=[]), TypeError, "implementation"),
        (dict(implementation=[["xla"]]), TypeError, "implementation must be None, a string or a non-empty sequence"),
        (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
        (dict(local_window_size=-1), ValueError, "local_window_size"),
        (dict(query_seq_lengths=jnp.array([1, 2])), ValueError, "query_seq_lengths"),
        (dict(key_value_seq_lengths=jnp.array([1.0])), TypeError, "key_value_seq_lengths"),
        (dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), ValueError, "kv_segment_ids"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale="big"), TypeError, "scale"),
        (dict(config="fast"), TypeError, "config"),
    ],
)
def test_bad_keyword_raises_named_error(kwargs, error, word):
    q, k, v = qkv()
    kwargs.setdefault("implementation", "pallas")
    with pytest.raises(error, match=word):
        pf.dot_product_attention(q, k, v, **kwargs)


def test_attention_with_lse_names_what_it_does_not_take():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"attention_with_lse got unexpected keyword arguments \['causal'\]"):
        pf.attention_with_lse(q, k, v, causal=True)
    with pytest.raises(TypeError, match="implementation must name one kernel backend"):
        pf.attention_with_lse(q, k, v, implementation=None)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="block_q=24"):
        pf.ForwardConfig(block_q=24)
    with pytest.raises(ValueError, match="num_warps_dq=3"):  # the field's own name, not "num_warps"
        pf.BackwardConfig(num_warps_dq=3)
    with pytest.raises(ValueError, match="num_stages_dkv=9"):
        pf.BackwardConfig(num_stages_dkv=9)
    for kw in (dict(num_warps=4.0), dict(num_stages=True), dict(num_stages="2")):
        with pytest.raises(TypeError, match=f"{next(iter(kw))}=.* must be an int"):
            pf.ForwardConfig(**kw)
    with pytest.raises(TypeError, match="FlashConfig.fwd must be a ForwardConfig, got BackwardConfig"):
        pf.FlashConfig(fwd=pf.BackwardConfig())
    with pytest.raises(TypeError, match="FlashConfig.bwd must be a BackwardConfig, got NoneType"):
        pf.FlashConfig(bwd=None)


@pytest.mark.parametrize(
    "make, x64",
    [(lambda: qkv(h=8), False), (lambda: qkv(h=512), False), (lambda: qkv(dtype=jnp.float64), True)],
    ids=["head_dim_8", "head_dim_512", "float64"],
)
def test_unsupported_raises_not_implemented_and_falls_back(make, x64):
    with jax.enable_x64(x64):
        args = make()
        with pytest.raises(NotImplementedError):
            pf.dot_product_attention(*args, implementation="pallas")
        got = pf.dot_product_attention(*args, implementation=("pallas", "xla"))
        want = jax.nn.dot_product_attention(*args, implementation="xla")
        assert rel_err(got, want) < 1e-6
        with pytest.warns(UserWarning, match="falling back"):
            pf.dot_product_attention(*args)


def test_cudnn_without_gpu_is_not_implemented():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(NotImplementedError, match="cudnn"):
        pf.dot_product_attention(*qkv(), implementation="cudnn")


def test_traced_scale_is_a_type_error():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale"):
        jax.jit(lambda s: pf.flash_attention(q, k, v, scale=s))(0.5)


# ------------------------------------------------------------ the variants' arguments


def _qkv():
    return random_qkv(Shape("e", 2, 8, 8, 4, 2, 16), jnp.float32, 0)[:3]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(bias=jnp.zeros((2, 3, 8, 8))), ValueError, ["bias", "(2, 4, 8, 8)", "(2, 3, 8, 8)"]),
        (dict(bias=jnp.zeros((1, 1, 2, 4, 8, 8))), ValueError, ["bias"]),
        (dict(bias=jnp.zeros((2, 4, 8, 8), jnp.int32)), TypeError, ["bias", "floating"]),
        (dict(mask=jnp.ones((2, 4, 8, 7), bool)), ValueError, ["mask", "(2, 4, 8, 7)"]),
        (dict(mask=jnp.ones((2, 4, 8, 8), jnp.float32)), TypeError, ["mask", "boolean"]),
        (dict(alibi_slopes=jnp.ones((2,))), ValueError, ["alibi_slopes", "(4,)"]),
        (dict(alibi_slopes=jnp.ones((4,), jnp.int32)), TypeError, ["alibi_slopes"]),
        (dict(logits_soft_cap=-1.0), ValueError, ["logits_soft_cap"]),
        (dict(logits_soft_cap="x"), TypeError, ["logits_soft_cap"]),
        (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, ["dropout_rate"]),
        (dict(dropout_rate=0.1), ValueError, ["dropout_rng"]),
        (dict(dropout_rate=0.1, dropout_rng=jnp.zeros(3)), TypeError, ["dropout_rng"]),
    ],
)
def test_bad_variant_arguments_raise_named_errors(kwargs, error, words):
    with pytest.raises(error) as info:
        pf.dot_product_attention(*_qkv(), implementation="pallas", **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_traced_soft_cap_and_rate_are_type_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="logits_soft_cap"):
        jax.jit(lambda c: pf.dot_product_attention(q, k, v, logits_soft_cap=c, implementation="pallas"))(2.0)
    with pytest.raises(TypeError, match="dropout_rate"):
        jax.jit(
            lambda r: pf.dot_product_attention(q, k, v, dropout_rate=r, dropout_rng=jax.random.key(0), implementation="pallas")
        )(0.1)
