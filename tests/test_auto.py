"""``implementation="auto"`` (and its alias ``"pallas"``): the per-pass choice from the shipped table, and its fallbacks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends import auto
from pallas_flash.backends.mosaic_gpu import MosaicConfig
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import SMALL_BLOCKS, random_qkv
from tests.conftest import TOLERANCE, rel_err

H200 = "NVIDIA H200"


def test_table_orders_per_gpu_and_pass():
    assert auto.table_order("fwd", 128, True, 4096, gpu=H200) == ("mosaic", "triton")
    assert auto.table_order("fwd", 256, False, 1024, gpu=H200) == ("mosaic", "triton")
    assert auto.table_order("fwd", 96, False, 1024, gpu=H200) == ("triton",)  # no rule: the fallback
    assert auto.table_order("bwd", 128, True, 4096, gpu=H200) == ("mosaic", "triton")
    assert auto.table_order("bwd", 256, True, 4096, gpu=H200) == ("mosaic", "triton")
    assert auto.table_order("bwd", 96, True, 4096, gpu=H200) == ("triton",)  # no Mosaic kernels at D=96
    for h100 in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"):  # the H100's own table: the same sm_90 kernels
        assert auto.table_order("fwd", 64, True, 1024, gpu=h100) == ("mosaic", "triton")
        assert auto.table_order("bwd", 128, False, 16384, gpu=h100) == ("mosaic", "triton")
        assert auto.table_order("bwd", 96, False, 16384, gpu=h100) == ("triton",)
    assert auto.table_order("fwd", 128, True, 4096, gpu="NVIDIA A100-SXM4-80GB") == ("triton",)  # no table
    assert auto.table_order("fwd", 128, True, 4096, gpu="NVIDIA A100-SXM4-80GB", capability="8.0") == ("triton",)
    assert auto.table_order("fwd", 128, True, 4096, gpu="") == ("triton",)  # no GPU: interpret mode


@pytest.mark.parametrize("gpu", ["NVIDIA H800", "NVIDIA H20"])
def test_other_hopper_parts_take_the_architecture_table(gpu):
    """A Hopper part no named table covers runs the sm_90 kernels (``sm90.json``); without its compute capability
    (or with another one) only the named tables apply, and none does."""
    for pass_, head_dim in (("fwd", 64), ("fwd", 256), ("bwd", 128)):
        assert auto.table_order(pass_, head_dim, True, 4096, gpu=gpu, capability="9.0") == ("mosaic", "triton")
    assert auto.table_order("fwd", 96, True, 4096, gpu=gpu, capability="9.0") == ("triton",)  # no Mosaic D=96
    assert auto.table_order("fwd", 128, True, 4096, gpu=gpu) == ("triton",)
    assert auto.table_order("fwd", 128, True, 4096, gpu=gpu, capability="8.9") == ("triton",)


def test_gpu_capability_reads_this_machine():
    """``"9.0"``-style on a GPU (what ``sm90.json`` matches), ``""`` without one."""
    capability = auto.gpu_capability()
    if jax.default_backend() == "gpu":
        major, minor = capability.split(".")
        assert major.isdigit() and minor.isdigit(), capability
    else:
        assert capability == ""


def test_a_named_table_comes_before_the_architecture_one(monkeypatch):
    """The H200's table is the whole of its GPU's: a pass it sends to Triton stays there on an sm_90 part."""
    h200 = {"gpu": "H200", "rules": [{"pass": "fwd", "order": ["triton"]}]}
    sm90 = {"compute_capability": "9.0", "rules": [{"pass": "fwd", "order": ["mosaic", "triton"]}]}
    monkeypatch.setattr(auto, "_tables", lambda: (sm90, h200))
    assert auto.table_order("fwd", 128, True, 4096, gpu=H200, capability="9.0") == ("triton",)
    assert auto.table_order("bwd", 128, True, 4096, gpu=H200, capability="9.0") == ("triton",)  # no rule: fallback
    assert auto.table_order("fwd", 128, True, 4096, gpu="NVIDIA H800", capability="9.0") == ("mosaic", "triton")


def test_every_table_names_registered_kernel_backends():
    for table in auto._tables():
        assert ("gpu" in table) != ("compute_capability" in table), "a table names a GPU or an architecture"
        assert (table.get("gpu") or table.get("compute_capability")) and table["rules"] and table["source"]
        for rule in table["rules"]:
            assert rule["pass"] in ("fwd", "bwd")
            assert set(rule) <= RULE_KEYS, f"keys table_order does not read (ignored): {set(rule) - RULE_KEYS}"
            assert all(isinstance(d, int) for d in rule.get("head_dims", [])) and rule["order"]
            assert isinstance(rule.get("causal", False), bool)
            for name in rule["order"]:
                assert isinstance(backends.get(name), backends.KernelBackend)


# What a rule may hold: the keys ``table_order`` matches on, the order, and where it was measured.
RULE_KEYS = {"pass", "head_dims", "causal", "min_seq", "max_seq", "order", "source"}


def test_rules_match_causal_and_the_query_length_range(monkeypatch):
    """``causal`` and ``min_seq``/``max_seq`` (the query length, both bounds included), which no shipped rule uses
    yet: a rule that does not match gives way to the next."""
    rules = [
        {"pass": "fwd", "causal": True, "max_seq": 2048, "order": ["mosaic"]},
        {"pass": "fwd", "min_seq": 1024, "max_seq": 4096, "order": ["triton", "mosaic"]},
        {"pass": "fwd", "order": ["mosaic", "triton"]},
    ]
    monkeypatch.setattr(auto, "_tables", lambda: ({"gpu": "H200", "rules": rules},))
    order = lambda causal, seq: auto.table_order("fwd", 128, causal, seq, gpu=H200)  # noqa: E731
    assert order(True, 2048) == ("mosaic",)
    assert order(True, 2049) == order(False, 2048) == order(False, 1024) == order(False, 4096) == ("triton", "mosaic")
    assert order(False, 1023) == order(False, 4097) == order(True, 4097) == ("mosaic", "triton")


def _spec(**kw) -> AttentionSpec:
    return AttentionSpec(scale=0.125, **kw)


@pytest.mark.parametrize(
    "dtype, head_dim, spec, want",
    [
        (jnp.bfloat16, 128, _spec(causal=True), "mosaic"),
        (jnp.float16, 64, _spec(), "mosaic"),
        (jnp.float32, 128, _spec(), "triton"),  # the Mosaic kernels take bf16/fp16 only
        (jnp.bfloat16, 96, _spec(), "triton"),  # no table rule for D=96
        (jnp.bfloat16, 128, _spec(mask_shape=(1, 1, 256, 256)), "triton"),  # a feature the Mosaic kernels lack
        (jnp.bfloat16, 128, _spec(has_segments=True, window=(64, 0)), "mosaic"),
        (jnp.bfloat16, 256, _spec(has_segments=True), "mosaic"),
        (jnp.bfloat16, 128, _spec(q_offset=64), "triton"),
    ],
)
def test_forward_choice_on_an_h200(monkeypatch, dtype, head_dim, spec, want):
    monkeypatch.setattr(auto, "gpu_name", lambda: H200)
    q = jax.ShapeDtypeStruct((2, 256, 4, head_dim), dtype)
    chosen = backends.get("auto").choose("fwd", q, q, q, AttentionInputs(), spec)
    assert chosen == want
    assert backends.get("auto").choose("bwd", q, q, q, AttentionInputs(), spec) == want  # D 64/128


def test_no_heads_on_an_h200_gives_empty_results(monkeypatch):
    """Zero query and K/V heads (as jax.nn takes): ``"auto"`` plans the call before the kernel backends' shortcut for
    empty calls, and the Mosaic default config divided the query heads by the K/V heads (a ZeroDivisionError, with no
    fallback, on an H100/H200). Empty values and gradients, as the other backends give."""
    monkeypatch.setattr(auto, "gpu_name", lambda: H200)
    q = jnp.ones((1, 16, 0, 64), jnp.bfloat16)
    for impl in (None, "pallas", "mosaic"):
        f = lambda q: pf.dot_product_attention(q, q, q, implementation=impl)  # noqa: E731
        assert f(q).shape == q.shape
        assert jax.grad(lambda q: f(q).astype(jnp.float32).sum())(q).shape == q.shape


def test_off_a_table_gpu_auto_is_the_triton_kernels(seed):
    """On this machine (no table entry, or a CPU in interpret mode) auto runs exactly the Triton kernels."""
    if jax.default_backend() == "gpu" and auto.table_order("fwd", 16, False, 20) != ("triton",):
        pytest.skip("this GPU's table chooses another backend for the forward")
    q, k, v, do = random_qkv(Shape("a", 1, 20, 28, 4, 2, 16), jnp.float32, seed)

    def run(name):
        f = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, implementation=name)  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    for a, b in zip(run("auto"), run("triton")):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_backend_config_runs_that_backend_for_both_passes():
    a = backends.get("auto")
    assert a.adopt(SMALL_BLOCKS) == auto.AutoConfig("triton", SMALL_BLOCKS, "triton", SMALL_BLOCKS)
    m = MosaicConfig()
    assert a.adopt(m) == auto.AutoConfig("mosaic", m, "mosaic", m)
    with pytest.raises(TypeError, match="AutoConfig or a config of the 'triton' or 'mosaic' backend"):
        a.adopt(pf.ForwardConfig())


@pytest.mark.parametrize(
    "config, error, match",
    [
        (auto.AutoConfig("xla", None, "xla", None), ValueError, r"AutoConfig.forward must name .* got 'xla'"),
        (auto.AutoConfig("triton", SMALL_BLOCKS, "nope", SMALL_BLOCKS), ValueError, "AutoConfig.backward .* 'nope'"),
        (auto.AutoConfig("mosaic", SMALL_BLOCKS, "triton", SMALL_BLOCKS), TypeError,
         "AutoConfig.forward_config must be a MosaicConfig .* got FlashConfig"),
        (auto.AutoConfig("triton", SMALL_BLOCKS, "triton", None), TypeError,
         "AutoConfig.backward_config must be a FlashConfig .* got NoneType"),
    ],
)
def test_a_malformed_auto_config_is_a_user_error(config, error, match):
    """A hand-built ``AutoConfig`` naming no kernel backend, or with another backend's config: a ``ValueError`` or
    ``TypeError`` naming the field before any work (an ``AttributeError`` from deep in a backend before)."""
    q = jnp.ones((1, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(error, match=match):
        pf.dot_product_attention(q, q, q, implementation="auto", config=config)


def test_auto_with_a_mosaic_config_in_interpret_mode(seed):
    """``"auto"`` handed a Mosaic config runs the Mosaic interpreter, whose ordered host callbacks
    ``custom_partitioning`` cannot lower: it must run unpartitioned, as ``"mosaic"`` does (a KeyError before).
    Values and gradients under a random cotangent, eager and under jit, equal to ``"mosaic"``'s."""
    q, k, v, do = random_qkv(Shape("m", 1, 40, 40, 2, 2, 64), jnp.bfloat16, seed)
    cfg = MosaicConfig()

    def run(name, jit):
        f = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, implementation=name, config=cfg)  # noqa: E731
        out, vjp = jax.vjp(jax.jit(f) if jit else f, q, k, v)
        return (out, *vjp(do))

    want = run("mosaic", False)
    for jit in (False, True):
        for a, b in zip(run("auto", jit), want):
            assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with jax.enable_x64(True):
        ref = pf.attention_reference(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)), is_causal=True)
    assert rel_err(want[0], ref) < TOLERANCE[jnp.dtype(jnp.bfloat16)]


def test_a_plan_run_on_a_call_its_backend_refuses_falls_back(seed):
    """A plan made for one spec, run on a spec with offsets (a ring's chunk pair): the Triton kernels run it."""
    q, k, v, _ = random_qkv(Shape("o", 1, 24, 24, 2, 2, 64), jnp.bfloat16, seed)
    spec = AttentionSpec(scale=0.125, causal=True, q_offset=24)
    plan = auto.AutoConfig("mosaic", MosaicConfig(), "mosaic", MosaicConfig())
    out, lse2 = backends.get("auto").forward(q, k, v, AttentionInputs(), spec, config=plan, interpret=True)
    triton = backends.get("triton")
    want, want_lse2 = triton.forward(q, k, v, AttentionInputs(), spec, config=triton.default_config(q, k, spec),
                                     interpret=True)
    assert np.array_equal(np.asarray(out), np.asarray(want))
    assert np.array_equal(np.asarray(lse2), np.asarray(want_lse2))
    with jax.enable_x64(True):
        ref = pf.attention_reference(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)),
                                     scale=0.125, is_causal=True, q_offset=24)
        assert rel_err(out, ref) < TOLERANCE[jnp.dtype(jnp.bfloat16)]


def test_auto_config_is_a_static_argument():
    c = auto.AutoConfig("triton", SMALL_BLOCKS, "triton", SMALL_BLOCKS)
    assert hash(c) == hash(dataclasses.replace(c))
