"""The backends and their registry: dispatch, fallback, and the jax.nn backends' translation of kernel-only features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, SELF, Case, build, random_qkv
from tests.conftest import TOLERANCE, rel_err


def _qkv():
    return random_qkv(Shape("e", 2, 8, 8, 4, 2, 16), jnp.float32, 0)[:3]


def test_registry_names_and_aliases():
    assert {"pallas", "auto", "triton", "mosaic", "xla", "cudnn"} <= set(backends.names())
    assert backends.get("pallas") is backends.get("auto")
    assert isinstance(backends.get("triton"), backends.KernelBackend)
    assert not isinstance(backends.get("xla"), backends.KernelBackend)
    with pytest.raises(ValueError, match="implementation must be one of"):
        backends.get("bogus")
    with pytest.raises(TypeError, match="Backend"):
        backends.register("mine", object())
    # an alias is no name to register under (get("pallas") would still be "auto"), nor is a non-string
    with pytest.raises(ValueError, match="'pallas' is an alias of 'auto'"):
        backends.register("pallas", backends.get("xla"))
    with pytest.raises(TypeError, match="non-empty string, got 3"):
        backends.register(3, backends.get("xla"))
    assert backends.get("pallas") is backends.get("auto") and len(set(backends.names())) == len(backends.names())


def test_triton_is_a_name_of_the_pallas_kernels(seed):
    q, k, v, _ = random_qkv(Shape("t", 1, 20, 20, 2, 1, 16), jnp.float32, seed)
    a = pf.dot_product_attention(q, k, v, implementation="triton", config=CONFIG)
    b = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_kernel_config_of_the_wrong_type_names_the_backend():
    with pytest.raises(TypeError, match="config must be a .*FlashConfig for the 'triton' backend"):
        pf.dot_product_attention(*_qkv(), implementation="triton", config=pf.ForwardConfig())
    with pytest.raises(TypeError, match="config must be an AutoConfig or a config of the 'triton' or 'mosaic' backend"):
        pf.dot_product_attention(*_qkv(), implementation="pallas", config=pf.ForwardConfig())


def test_backends_are_hashable_static_arguments():
    assert hash(backends.get("triton")) == hash(type(backends.get("triton"))())
    assert backends.get("xla") != backends.get("cudnn")


def test_xla_delegate_takes_segments_and_alibi(seed):
    """``implementation="xla"`` gets segment ids as a mask and ALiBi as a bias: same result as the kernels."""
    shape = SELF
    case = Case(causal=True, segments="packed", alibi="bn")
    kw, _, _ = build(case, shape, seed)
    q, k, v, _ = random_qkv(shape, jnp.float32, seed)
    ours = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, **kw)
    xla = pf.dot_product_attention(q, k, v, implementation="xla", **kw)
    assert rel_err(ours, xla) <= TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.parametrize(
    "kwargs",
    [dict(logits_soft_cap=3.0), dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))],
    ids=["soft_cap", "dropout"],
)
def test_jax_nn_delegates_raise_not_implemented_for_kernel_only_features(kwargs):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError):
        pf.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    # ("pallas", "xla") takes the kernels, which have them.
    got = pf.dot_product_attention(q, k, v, implementation=("xla", "pallas"), config=CONFIG, **kwargs)
    want = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, **kwargs)
    assert np.array_equal(np.asarray(got), np.asarray(want))
