"""models.gpt2 generation with the KV cache, and the benchmarks.generate CLI (without a GPU).

The cached path (prefill with the flash kernel, then decode_attention over the
cache) must give the tokens of the path without a cache, and its logits must
be the full forward pass's at every position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import generate as bench
from models import generate as generate_lib
from models import gpt2
from tests.conftest import rel_err


def _model(seed, attention="xla", **kw):
    cfg = gpt2.get_config("tiny", attention=attention, dtype="float32", block_size=64, n_embd=64, **kw)
    return gpt2.GPT(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("decode_implementation", ["xla", "pallas"])
def test_greedy_tokens_with_the_cache_equal_those_without(seed, decode_implementation):
    """Batch of 2, 11-token prompts, 20 new tokens; the pallas case prefills with the Pallas kernel too."""
    model = _model(seed, attention=decode_implementation)
    prompt = jax.random.randint(jax.random.key(seed), (2, 11), 0, 256)
    without = gpt2.generate(model, prompt, 20, temperature=0.0, use_cache=False)
    with_cache = gpt2.generate(model, prompt, 20, temperature=0.0, use_cache=True,
                               decode_implementation=decode_implementation)
    assert with_cache.shape == (2, 31) and with_cache.dtype == jnp.int32
    np.testing.assert_array_equal(with_cache[:, :11], prompt)
    np.testing.assert_array_equal(with_cache, without)


def test_cached_logits_equal_the_full_forward_pass(seed):
    """Prefill 9 tokens, then decode 1, 3 and 2 at a time (under jit): the logits of model(idx) at each position."""
    model = _model(seed)
    idx = jax.random.randint(jax.random.key(seed), (2, 15), 0, 256)
    want = model(idx)  # [2, 15, V], no cache
    model.init_cache(2, 16)

    @nnx.jit
    def decode(model, ids):
        return model(ids, decode=True)

    got = [model(idx[:, :9], prefill=True), decode(model, idx[:, 9:10]), decode(model, idx[:, 10:13]),
           decode(model, idx[:, 13:15])]
    assert rel_err(jnp.concatenate(got, axis=1), want) < 1e-4
    np.testing.assert_array_equal(model.blocks[0].attn.cache_index[...], [15, 15])


def test_sampling_one_prompt_and_the_default(seed):
    model = _model(seed)
    prompt = jax.random.randint(jax.random.key(seed), (7,), 0, 256)
    key = jax.random.key(seed + 1)
    cached = gpt2.generate(model, prompt, 12, rng=key)  # use_cache=None: the cache, the text fits
    assert cached.shape == (19,)
    # Token t draws from the same key on both paths: with float32 logits the samples agree.
    np.testing.assert_array_equal(cached, gpt2.generate(model, prompt, 12, rng=key, use_cache=False))
    # The compiled loop is reused by the next call with the same shapes and options. (Measured from a second call:
    # in a fresh process the first one's kernels set a JAX context value, so the second traces once more.)
    assert gpt2.generate is generate_lib.generate  # the re-export
    gpt2.generate(model, prompt, 12, rng=key)
    compiled = generate_lib._generate_with_cache._cache_size()
    gpt2.generate(model, (prompt + 1) % 256, 12, rng=key)  # another prompt of the same shape, inside the vocabulary
    assert generate_lib._generate_with_cache._cache_size() == compiled
    # Past block_size the default slides the window without a cache.
    long = gpt2.generate(model, prompt, 60, temperature=0.0)
    np.testing.assert_array_equal(long, gpt2.generate(model, prompt, 60, temperature=0.0, use_cache=False))
    np.testing.assert_array_equal(gpt2.generate(model, prompt, 0), prompt)


def test_generate_errors():
    model = _model(0)
    prompt = jnp.zeros((2, 10), jnp.int32)
    with pytest.raises(ValueError, match="10 \\+ max_new_tokens 55 = 65 exceeds block_size 64"):
        gpt2.generate(model, prompt, 55, use_cache=True)
    with pytest.raises(ValueError, match="decode_implementation"):
        gpt2.generate(model, prompt, 2, decode_implementation="cudnn")
    with pytest.raises(ValueError, match="use_cache"):
        gpt2.generate(model, prompt, 2, use_cache="yes")
    with pytest.raises(ValueError, match="top_k"):
        gpt2.generate(model, prompt, 2, top_k=0)
    for bad in (float("nan"), float("inf"), -0.5):  # a NaN temperature would sample token 0 every step
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            gpt2.generate(model, prompt, 2, temperature=bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="temperature must be a real number"):
            gpt2.generate(model, prompt, 2, temperature=bad)
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="top_k must be None or a positive int"):
            gpt2.generate(model, prompt, 2, top_k=bad)
    assert generate_lib._check_sampling(np.float32(0.5), np.int64(3)) == (0.5, 3)  # NumPy scalars are numbers
    with pytest.raises(ValueError, match="max_new_tokens"):
        gpt2.generate(model, prompt, -1)
    with pytest.raises(ValueError, match="prompt"):
        gpt2.generate(model, jnp.zeros((1, 2, 3), jnp.int32), 2)
    for bad in (model.config.vocab_size, -3):  # past the embedding table it embeds as NaN, below it as garbage
        with pytest.raises(ValueError, match=rf"prompt \(shape \(2,\)\) holds token ids outside \[0, vocab_size="
                                             rf"{model.config.vocab_size}\): \[{bad}\]"):
            gpt2.generate(model, jnp.asarray([5, bad]), 2)
    with pytest.raises(ValueError, match="init_cache"):
        model(prompt, decode=True)
    if len(jax.devices()) >= 2:  # a model whose attention is a ring over a sharded sequence does not generate
        from pallas_flash.nnx import ContextParallel

        cp = ContextParallel(jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2]), seq_axis="seq")
        ring_model = gpt2.GPT(dataclasses.replace(model.config, attention="pallas"), context_parallel=cp,
                              rngs=nnx.Rngs(0))
        for use_cache in (True, False):
            with pytest.raises(NotImplementedError, match="generate under context parallelism"):
                gpt2.generate(ring_model, prompt, 2, use_cache=use_cache)
        with pytest.raises(NotImplementedError, match="KV cache under context parallelism"):
            ring_model.init_cache(2, 16)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model.init_cache(2, 65)


def test_decode_refuses_a_batch_that_is_not_the_caches():
    """Decode's positions come from the cache's index: one sequence's token would broadcast over both (and advance
    them), three would fail inside the embedding's add. As prefill, a ValueError naming both batch sizes."""
    model = _model(0)
    model.init_cache(2, 8)
    model(jnp.array([[1, 2, 3], [4, 5, 6]]), prefill=True)
    for bad in ([[7]], [[7], [8], [9]]):
        with pytest.raises(ValueError, match=rf"the new tokens \[batch, length\] = \({len(bad)}, 1\) do not fit "
                                             rf"the KV cache \[batch, max_length\] = \(2, 8\)"):
            model(jnp.array(bad), decode=True)
    np.testing.assert_array_equal(model.blocks[0].attn.cache_index[...], [3, 3])  # nothing advanced
    assert model(jnp.array([[7], [8]]), decode=True).shape == (2, 1, model.config.vocab_size)


def test_generate_refuses_prompts_that_are_not_token_ids():
    """Checked before the int32 cast, which truncated floats and wrapped an int64 2**32 + 1 to 1."""
    model = _model(0)
    for bad, dtype in ((jnp.array([1.7, 2.9]), "float32"), (np.array([1.0, 2.0]), "float64"), ("hello", "<U5"),
                       ([True, False], "bool")):
        with pytest.raises(TypeError, match=f"prompt must be integer token ids, got dtype {dtype}"):
            gpt2.generate(model, bad, 2, temperature=0.0)
    for bad in (np.array([2**32 + 1, 5]), np.array([2**63, 5], np.uint64)):
        with pytest.raises(ValueError, match=rf"prompt \(shape \(2,\)\) holds token ids outside \[0, vocab_size=256\): "
                                             rf"\[{bad[0]}\]"):
            gpt2.generate(model, bad, 2, temperature=0.0)
    want = gpt2.generate(model, jnp.array([3, 4]), 2, temperature=0.0)  # integer ids of any width and container
    for ok in (np.array([3, 4], np.int64), np.array([3, 4], np.uint8), [3, 4]):
        np.testing.assert_array_equal(gpt2.generate(model, ok, 2, temperature=0.0), want)


def test_a_tiny_temperature_samples_greedily(seed):
    """logits / temperature overflowed float32 (or divided by a temperature that is 0 there): token 0 every step."""
    model = _model(seed)
    prompt = jax.random.randint(jax.random.key(seed), (2, 4), 0, 256)
    greedy = gpt2.generate(model, prompt, 6, temperature=0.0)
    for temperature, top_k in ((1e-300, 1), (1e-300, None), (1e-40, None), (1e-37, None), (1e-37, 5)):
        got = gpt2.generate(model, prompt, 6, temperature=temperature, top_k=top_k, rng=jax.random.key(seed))
        np.testing.assert_array_equal(got, greedy, err_msg=f"temperature={temperature}, top_k={top_k}")
    # Logits large enough to overflow at an ordinary temperature: the largest, not the first overflowing one.
    logits = jnp.array([[1e38, 3e38, -3e38, 2e38]] * 3)
    for top_k in (None, 2):
        np.testing.assert_array_equal(generate_lib._Sampler(0.1, top_k)(logits, jax.random.key(seed)), [1, 1, 1])
    # Ordinary temperatures sample the tokens of the plain logits / temperature, bit for bit.
    logits = 4 * jax.random.normal(jax.random.key(seed), (64, 256))
    for temperature, top_k in ((0.8, 40), (1.0, None), (1e-3, 3)):
        scaled = logits / temperature
        if top_k is not None:
            scaled = jnp.where(scaled < jax.lax.top_k(scaled, top_k)[0][:, -1:], -jnp.inf, scaled)
        key = jax.random.key(seed + 1)
        np.testing.assert_array_equal(generate_lib._Sampler(temperature, top_k)(logits, key),
                                      jax.random.categorical(key, scaled, axis=-1))


def test_argument_types_of_generate_and_init_cache():
    model = _model(0)  # block_size 64
    prompt = jnp.array([[1, 2, 3]])
    for bad in (0, 7, "key", jax.random.split(jax.random.key(0), 2), jnp.zeros((3,), jnp.uint32)):
        with pytest.raises(TypeError, match=r"rng must be one PRNG key, jax.random.key\(seed\) \(or a legacy"):
            gpt2.generate(model, prompt, 2, rng=bad)
    np.testing.assert_array_equal(gpt2.generate(model, prompt, 3, rng=jax.random.PRNGKey(5)),
                                  gpt2.generate(model, prompt, 3, rng=jax.random.key(5)))
    # max_new_tokens: NumPy integers as temperature and top_k take NumPy scalars; not bools or floats.
    np.testing.assert_array_equal(gpt2.generate(model, prompt, np.int64(2), temperature=0.0),
                                  gpt2.generate(model, prompt, 2, temperature=0.0))
    for bad in (True, 2.0, np.float32(2), "2"):
        with pytest.raises(TypeError, match="max_new_tokens must be an int >= 0"):
            gpt2.generate(model, prompt, bad)
    # init_cache: NumPy integers, as the attention layer's init_cache takes them; not bools or floats.
    model.init_cache(np.int32(3), np.int64(16))
    assert model.blocks[1].attn.cached_key.shape[:2] == (3, 16)
    for name, args in (("batch_size", (True, 8)), ("batch_size", (2.0, 8)), ("max_length", (2, 16.0)),
                       ("max_length", (2, np.True_)), ("max_length", (2, "16"))):
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            model.init_cache(*args)
    for name, args in (("batch_size", (0, 8)), ("max_length", (2, -1))):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            model.init_cache(*args)
    with pytest.raises(ValueError, match="max_length 65 exceeds block_size 64"):
        model.init_cache(2, np.int64(65))


# ---------------------------------------------------------------- the benchmark CLI


def test_benchmark_plan_and_table():
    specs = bench.plan(quick=False, on_gpu=True)
    assert [(s.batch, s.path, s.new_tokens) for s in specs] == [
        (1, "no_cache", 64), (1, "cache_pallas", 1024), (1, "cache_xla", 1024),
        (32, "no_cache", 64), (32, "cache_pallas", 1024), (32, "cache_xla", 1024)]
    assert {(s.model, s.prompt_len, s.block_size, s.samples) for s in specs} == {("gpt2", 1024, 2048, 3)}
    assert {s.model for s in bench.plan(quick=True, on_gpu=False)} == {"tiny"}

    def ok(tps, tokens):
        return dict(ok=True, tokens_per_s=tps, seconds=1.0, compile_s=9.0, peak_bytes=2**30,
                    timing=dict(iqr_rel=0.01), new_tokens=tokens)

    results = [ok(100.0, [[1, 2]]), ok(1000.0, [[1, 2, 3]]), ok(500.0, [[1, 3, 3]]),
               {"ok": False, "status": "OOM", "error": "out of memory | x"}, ok(8000.0, [[5]] * 32), ok(4000.0, [[5]] * 32)]
    recs = bench.records(specs, results)
    assert [r["vs_no_cache"] for r in recs[:3]] == [1.0, 10.0, 5.0] and recs[1]["vs_xla"] == 2.0
    assert recs[1]["same_tokens"] == "1/1" and recs[2]["same_tokens"] == "0/1"
    assert recs[4]["vs_no_cache"] is None and recs[4]["same_tokens"] is None
    md = bench.render_markdown({"device": "NVIDIA H200", "platform": "gpu", "jax_version": "0"}, specs, recs, False)
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]
    assert rows[0][:5] == ["batch", "path", "new tokens timed", "tokens/s", "ms per step"]
    assert ["1", "cache + pallas", "1024", "1,000", "0.98", "10.00x", "2.00x", "1/1"] == rows[3][:8]
    assert rows[5][:4] == ["32", "no cache", "64", "OOM: out of memory / x"]


def test_benchmark_worker_runs_a_tiny_row():
    spec = dataclasses.asdict(bench.plan(quick=True, on_gpu=False, paths=("cache_xla",), batches=(2,))[0])
    r = bench._worker(spec)
    assert r["tokens_per_s"] > 0 and np.asarray(r["new_tokens"]).shape == (2, spec["new_tokens"])
    with pytest.raises(SystemExit):
        bench.main(["--paths", "bogus"])
