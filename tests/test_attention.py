"""The kernels against the float64 reference: values and dq/dk/dv, odd shapes.

On a CPU these run the Pallas kernels in interpret mode on ``CPU_CASES``; on a
GPU the compiled kernels on ``GPU_CASES``. Every test draws fresh inputs and a
random output cotangent.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import CPU_CASES, GPU_CASES, Shape
from tests.cases import CONFIG, random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

CASES = GPU_CASES if ON_GPU else CPU_CASES
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def reference_vjp(q, k, v, ct, **kwargs):
    """Output and (dq, dk, dv) of the float64 reference on the same rounded inputs."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kwargs), *args)
        grads = vjp(jnp.asarray(np.asarray(ct, np.float64)))
        return np.asarray(out), [np.asarray(g) for g in grads]


def assert_close(name: str, got, want, dtype, seed: int):
    tol = TOLERANCE[jnp.dtype(dtype)]
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({jnp.dtype(dtype).name}, seed={seed})"


def check_fn_against_reference(fn, shape: Shape, dtype, seed: int, **ref_kwargs):
    q, k, v, ct = random_qkv(shape, dtype, seed)
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(ct)
    assert out.dtype == q.dtype and out.shape == q.shape
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    ref_out, ref_grads = reference_vjp(q, k, v, ct, **ref_kwargs)
    assert_close("out", out, ref_out, dtype, seed)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, rg, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_flash_attention_matches_reference(shape, causal, dtype, seed):
    def fn(q, k, v):
        return pf.flash_attention(q, k, v, causal=causal, config=CONFIG)

    check_fn_against_reference(fn, shape, dtype, seed, is_causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=str)
def test_triton_shipped_configs_match_reference(shape, causal, dtype, seed):
    """The Triton kernels with this GPU's shipped configs (on an H100/H200 ``"pallas"`` runs the Mosaic kernels
    at D 64/128/256 in bf16/fp16, so the test above does not reach the Triton table's entries there)."""

    def fn(q, k, v):
        return pf.attention_with_lse(q, k, v, is_causal=causal, implementation="triton")[0]

    check_fn_against_reference(fn, shape, dtype, seed, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_drop_in_api_matches_reference(causal, seed):
    shape = CASES[2]  # Tq != Tk, GQA: causal stays top-left aligned like jax.nn

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=causal, scale=0.3, implementation="pallas")

    check_fn_against_reference(fn, shape, jnp.float32, seed, is_causal=causal, scale=0.3)


def test_matches_jax_nn_xla(seed):
    """Same semantics as jax.nn.dot_product_attention (causal with Tq > Tk, GQA)."""
    shape = Shape("tq_gt_tk", 2, 40, 24, 4, 2, 32)
    q, k, v, _ = random_qkv(shape, jnp.float32, seed)
    ours = pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert rel_err(ours, theirs) <= TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_unbatched_inputs_and_the_residual_as_jax_nn(implementation, seed):
    """jax.nn's ``[T, N, H]`` call (no batch axis), values and gradients under a random cotangent; and its
    ``return_residual``: the lse of each row's scaled, masked logits, ``[B, Tq, N]`` in the key's dtype, no
    gradient; ``-inf`` where a row sees no key (jax.nn: the lse of its large negative fill)."""
    shape = Shape("tq_gt_tk_gqa", 2, 40, 24, 4, 2, 32)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    kw = dict(is_causal=True, scale=0.3)
    ours = lambda q, k, v: pf.dot_product_attention(q, k, v, implementation=implementation, **kw)  # noqa: E731
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)  # noqa: E731
    out, vjp = jax.vjp(ours, q[1], k[1], v[1])
    want, want_vjp = jax.vjp(theirs, q[1], k[1], v[1])
    assert out.shape == want.shape == q.shape[1:]
    for a, b in zip((out, *vjp(ct[1])), (want, *want_vjp(ct[1]))):
        assert rel_err(a, b) <= TOLERANCE[jnp.dtype(jnp.float32)]

    lengths = jnp.asarray([24, 0], jnp.int32)  # batch row 1 sees no key
    out, res = pf.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation,
                                        return_residual=True, **kw)
    want, want_res = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla",
                                                  return_residual=True, **kw)
    assert res.shape == want_res.shape == q.shape[:3] and res.dtype == want_res.dtype
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    assert rel_err(out[0], want[0]) <= tol and rel_err(res[0], want_res[0]) <= tol
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isneginf(np.asarray(res[1])))
    grad = jax.grad(lambda q: pf.dot_product_attention(q, k, v, implementation=implementation, return_residual=True,
                                                       **kw)[1][0].sum())(q)
    assert np.all(np.asarray(grad) == 0)  # stop_gradient, as jax.nn
    unbatched = pf.dot_product_attention(q[0], k[0], v[0], implementation=implementation, return_residual=True, **kw)
    assert [x.shape for x in unbatched] == [q.shape[1:], q.shape[1:3]]


def test_default_config_crosses_blocks(seed):
    """The shipped default blocks (not the forced small ones) over several blocks and ragged tails."""
    shape = Shape("default_blocks", 1, 300, 200, 2, 1, 64)
    for causal in (False, True):

        def fn(q, k, v):
            return pf.flash_attention(q, k, v, causal=causal)

        check_fn_against_reference(fn, shape, jnp.float32, seed, is_causal=causal)


def test_transformations_jit_vmap_grad(seed):
    shape = Shape("small", 1, 24, 20, 2, 1, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)

    def loss(q, k, v):
        return jnp.vdot(pf.flash_attention(q, k, v, causal=True), ct)

    with jax.enable_x64(True):  # the float64 reference on the same inputs
        want = jax.grad(lambda q, k, v: jnp.vdot(attention_reference(q, k, v, is_causal=True), ct.astype(jnp.float64)),
                        argnums=(0, 1, 2))(*(x.astype(jnp.float64) for x in (q, k, v)))
    for got in (jax.grad(loss, argnums=(0, 1, 2))(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)):
        for g, w in zip(got, want):
            assert rel_err(g, w) <= TOLERANCE[jnp.dtype(jnp.float32)]

    # vmap over an extra leading axis of 3 independent problems.
    xs = [jnp.stack([x, 2 * x, -x]) for x in (q, k, v)]
    got = jax.jit(jax.vmap(lambda q, k, v: pf.flash_attention(q, k, v, causal=True)))(*xs)
    for i in range(3):
        with jax.enable_x64(True):
            want_i = attention_reference(*(x[i].astype(jnp.float64) for x in xs), is_causal=True)
        assert rel_err(got[i], want_i) <= TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.gpu
def test_long_sequence_no_quadratic_memory():
    """B=1, N=64k, 16 heads, D=128 forward+backward fits (the N x N logits alone would be 256 GiB)."""
    shape = Shape("64k", 1, 65536, 65536, 16, 16, 128, causal=True)
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, shape.q_shape, jnp.bfloat16) for kk in jax.random.split(key, 3))

    @jax.jit
    def step(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: pf.flash_attention(q, k, v, causal=True), q, k, v)
        return out, vjp(out)

    out, grads = step(q, k, v)
    for x in (out, *grads):
        assert bool(jnp.isfinite(x.astype(jnp.float32)).all())


def test_under_enable_x64(seed):
    """With jax_enable_x64 the kernels' indices stay int32 (static loop bounds would default to int64)."""
    shape = Shape("x64", 1, 40, 27, 2, 1, 16)
    with jax.enable_x64(True):

        def fn(q, k, v):
            return pf.flash_attention(q, k, v, causal=True, config=CONFIG)

        check_fn_against_reference(fn, shape, jnp.float32, seed, is_causal=True)


def test_enable_x64_on_and_off_in_one_process(seed):
    """Calls of the same shapes with jax_enable_x64 on, then off, then on again (as a test computing its float64
    reference next to the kernels does): each setting gets its own trace of the kernels (a cached one of the other
    setting holds int64 or int32 indices the lowering rejects)."""
    shape = Shape("x64_toggle", 1, 38, 29, 2, 1, 16)

    def fn(q, k, v):
        return pf.flash_attention(q, k, v, causal=True, config=CONFIG)

    for x64 in (True, False, True):
        with jax.enable_x64(x64):
            check_fn_against_reference(fn, shape, jnp.float32, seed, is_causal=True)


def test_default_matmul_precision_changed_in_one_process():
    """The same call under two jax_default_matmul_precision settings, one after the other: each compiles its own
    dots' precision (a dot given none, the backward's float32 ``delta``, takes the setting at trace time; the
    kernels' cached trace of the first setting handed the second its DEFAULT dots)."""
    q, k, v, ct = random_qkv(Shape("precision_toggle", 1, 37, 31, 2, 1, 16), jnp.float32, 0)

    def loss(q, k, v):
        return (pf.flash_attention(q, k, v, causal=True, config=CONFIG) * ct).sum()

    for precision, want in (("bfloat16", "DEFAULT"), ("highest", "HIGHEST"), ("bfloat16", "DEFAULT")):
        with jax.default_matmul_precision(precision):
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
        found = set(re.findall(r"precision = \[(\w+), \w+\]", hlo))
        assert want in found, (precision, found)
        if precision == "highest":
            assert found == {"HIGHEST"}, found


def _dots(hlo: str, pattern: str) -> tuple[int, int]:
    """``(dots, dots matching pattern)``: the interpreted kernels' ``dot_general`` ops and those carrying
    ``pattern`` in their attributes."""
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    return len(dots), sum(bool(re.search(pattern, line)) for line in dots)


def _grad_hlo(loss, q, k, v) -> str:
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()


def test_xla_metadata_changed_in_one_process():
    """The same call under ``set_xla_metadata`` of one value, then none, then another: each lowers its kernels'
    ops with its own attributes (a trace of the kernels cached under the first value lent them to the later
    calls: the equations carry the context's metadata)."""
    from jax.experimental.xla_metadata import set_xla_metadata

    q, k, v, ct = random_qkv(Shape("xla_metadata", 1, 35, 35, 2, 1, 16), jnp.float32, 0)

    def loss(q, k, v):
        return (pf.flash_attention(q, k, v, causal=True, config=CONFIG, interpret=True) * ct).sum()

    for tag in ("one", None, "two"):
        if tag is None:
            hlo = _grad_hlo(loss, q, k, v)
        else:
            with set_xla_metadata(pallas_flash_probe=tag):
                hlo = _grad_hlo(loss, q, k, v)
        dots, tagged = _dots(hlo, r"pallas_flash_probe")
        assert dots and tagged == (0 if tag is None else dots), (tag, dots, tagged)
        if tag is not None:
            assert _dots(hlo, f'pallas_flash_probe = "{tag}"')[1] == dots, tag


def test_compute_on_then_not_in_one_process():
    """The same call outside ``compute_on("device_host")``, inside it, then outside again: only the call inside
    puts the kernels on the host (a trace of the kernels cached outside it kept them off the host inside it, and
    one cached inside put a later call's kernels on the host: the equations carry the compute type)."""
    from jax.experimental.compute_on import compute_on

    q, k, v, ct = random_qkv(Shape("compute_on", 1, 33, 33, 2, 1, 16), jnp.float32, 0)

    def loss(q, k, v):
        return (pf.flash_attention(q, k, v, causal=True, config=CONFIG, interpret=True) * ct).sum()

    on_host = compute_on(compute_type="device_host", out_memory_spaces=jax.memory.Space.Device)(loss)
    for host in (False, True, False):
        dots, marked = _dots(_grad_hlo(on_host if host else loss, q, k, v), r"_xla_compute_type")
        assert dots and marked == (dots if host else 0), (host, dots, marked)
