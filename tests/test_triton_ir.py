"""Every kernel variant lowers to a Triton module that passes MLIR verification, on a CPU.

Interpret mode runs the kernels' logic but not the Triton lowering, and a
module the lowering builds wrongly (an op whose operand types disagree, say)
is only rejected when the GPU compiler parses it. This test lowers each
variant for an sm_90 (H100) target on the CPU, with the block configs an H100
would use, and runs the MLIR verifier on every ``pallas_call``'s module, so
that class of bug fails in CI rather than on the GPU.

It hooks two private JAX functions (the GPU-info query and the lowering
entry point) of the pinned JAX release; if they move, it skips with a reason.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import pytest

import pallas_flash as pf
from pallas_flash.backends.triton.config import default_config
from pallas_flash.testing.shapes import GPU_CASES, Shape
from tests.cases import ALONE, COMBINED, build
from tests.digests import DigestBook

try:
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import pallas_call_registration as _registration

    _HOOKS = hasattr(_registration, "gpu_info_lib") and hasattr(_lowering, "lower_jaxpr_to_triton_module")
except ImportError:  # pragma: no cover - another JAX release
    _HOOKS = False

pytestmark = pytest.mark.skipif(not _HOOKS, reason="this JAX release moved the Pallas Triton lowering hooks")

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def triton_modules(monkeypatch):
    """A list that fills with the lowering result (Triton module and grid) of each ``pallas_call`` lowered for CUDA."""
    modules = []
    original = _lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result)
        return result

    monkeypatch.setattr(_registration.gpu_info_lib, "get_gpu_info", lambda: types.SimpleNamespace(compute_capability="9.0"))
    monkeypatch.setattr(_registration.lowering, "lower_jaxpr_to_triton_module", capture)
    return modules


def _lower_fwd_bwd(fn, *args) -> None:
    """Lower ``fn(*args[:-1])`` and its VJP with cotangent ``args[-1]`` for CUDA."""

    def fwd_bwd(*a):
        out, vjp = jax.vjp(fn, *a[:-1])
        return out, vjp(a[-1])

    jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",))


# The Triton IR of every variant, as digests (tests/digests.py). Digests cover the module text without source
# locations, and the grid.
DIGESTS = DigestBook(pathlib.Path(__file__).with_name("triton_ir_digests.json"), "the Triton IR")


@pytest.fixture(scope="module", autouse=True)
def _write_digests():
    yield
    DIGESTS.write()


def _digest(result) -> str:
    text = result.module.operation.get_asm(enable_debug_info=False)
    return hashlib.sha256(f"{text}\ngrid={tuple(result.grid)}".encode()).hexdigest()[:20]


def _verify(results, key: str) -> None:
    assert len(results) >= 3, f"lowered {len(results)} Triton kernels, expected forward, dK/dV and dQ"
    for r in results:
        r.module.operation.verify()  # raises with the op and its source line on failure
    DIGESTS.check(key, [_digest(r) for r in results])


def _config(shape: Shape, dtype, causal: bool):
    return default_config(
        head_dim=shape.head_dim, dtype=dtype, causal=causal, seq_q=shape.seq_q, seq_k=shape.seq_k, gpu=H100
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: s.name)
def test_plain_kernels_verify(shape, causal, dtype, triton_modules):
    q = jax.ShapeDtypeStruct(shape.q_shape, dtype)
    kv = jax.ShapeDtypeStruct(shape.kv_shape, dtype)
    config = _config(shape, dtype, causal)

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas", config=config, interpret=False)

    _lower_fwd_bwd(fn, q, kv, kv, q)
    _verify(triton_modules, f"plain/{shape.name}/{'causal' if causal else 'full'}/{jnp.dtype(dtype).name}")


VARIANT_SHAPE = Shape("variants", 2, 700, 700, 4, 2, 64)
CROSS_SHAPE = Shape("variants_cross", 2, 333, 517, 6, 2, 80)
VARIANTS = {**{f"alone_{k}": v for k, v in ALONE.items()}, **{f"combined_{k}": v for k, v in COMBINED.items()}}


@pytest.mark.parametrize("shape", [VARIANT_SHAPE, CROSS_SHAPE], ids=lambda s: s.name)
@pytest.mark.parametrize("case_name", VARIANTS)
def test_variant_kernels_verify(case_name, shape, triton_modules):
    case = VARIANTS[case_name]
    kw, _, diff = build(case, shape, seed=0)
    names = list(diff)
    dtype = jnp.bfloat16
    q = jax.ShapeDtypeStruct(shape.q_shape, dtype)
    kv = jax.ShapeDtypeStruct(shape.kv_shape, dtype)
    config = _config(shape, dtype, case.causal)

    def fn(q, k, v, *d):
        return pf.dot_product_attention(
            q, k, v, implementation="pallas", config=config, interpret=False, **kw, **dict(zip(names, d))
        )

    _lower_fwd_bwd(fn, q, kv, kv, *diff.values(), q)
    _verify(triton_modules, f"variant/{shape.name}/{case_name}")


SHIPPED_TABLES = sorted((pathlib.Path(pf.__file__).parent / "backends" / "triton" / "tables").glob("*.json"))
TABLE_ENTRIES = [(path, key) for path in SHIPPED_TABLES for key in sorted(json.loads(path.read_text()))]


@pytest.mark.parametrize(("table", "key"), TABLE_ENTRIES, ids=[f"{p.stem}/{k}" for p, k in TABLE_ENTRIES])
def test_shipped_table_configs_verify(table, key, triton_modules, tmp_path, monkeypatch):
    """Each entry of each shipped table is what ``default_config`` returns on that GPU, and lowers and verifies
    (at a ragged length, GQA 2:1, the entry's head dim and causal)."""
    monkeypatch.setenv("PALLAS_FLASH_CACHE_DIR", str(tmp_path))  # no user-tuned config in the way
    head_dim = int(key.split("|")[0][1:])
    causal = key.split("|")[2] == "causal=True"
    gpu = {"h100": H100, "h200": "NVIDIA H200"}[table.stem]
    seq = int(key.split("|n")[1])
    config = default_config(head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, seq_q=seq, seq_k=seq, gpu=gpu)
    assert config == pf.FlashConfig.from_dict(json.loads(table.read_text())[key])
    shape = Shape("table", 1, 333, 333, 4, 2, head_dim)
    q = jax.ShapeDtypeStruct(shape.q_shape, jnp.bfloat16)
    kv = jax.ShapeDtypeStruct(shape.kv_shape, jnp.bfloat16)

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas", config=config, interpret=False)

    _lower_fwd_bwd(fn, q, kv, kv, q)
    _verify(triton_modules, f"table/{table.stem}/{key}")
