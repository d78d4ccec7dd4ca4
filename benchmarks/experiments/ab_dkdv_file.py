"""Backward alone: this checkout's dK/dV kernel against another version of ``backward_dkdv.py``, in one process,
interleaved rounds, cuDNN in the same rounds; gradients compared with cuDNN's.

PROBS="D:N:causal[:det],..." PYTHONPATH=. python3 benchmarks/experiments/ab_dkdv_file.py OTHER_FILE ROUNDS
(``det`` 1: the deterministic mode; default the fused dQ). The other file is loaded as a module and swapped in for
``backward.launch_dkdv``, with ``partition._trace`` cleared per variant (NOTES 53).
"""
import dataclasses, importlib.util, os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import backward, config as mc
from pallas_flash.sharding import partition
from pallas_flash.testing.errors import rel_err

from benchmarks.experiments.pullbacks import pullback, tflops_rounds

spec = importlib.util.spec_from_file_location("dkdv_other", sys.argv[1])
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
probs = [tuple(int(x) for x in p.split(":")) for p in os.environ.get("PROBS", "128:16384:0,64:4096:0").split(",")]
variants = {"this": backward.launch_dkdv, "other": other.launch_dkdv, "cudnn": None}
for D, N, causal, *det in probs:
    causal, det = bool(causal), bool(det and det[0])
    B, H = 16384 // N, 2048 // D
    q, k, v, do = (jax.random.normal(kk, (B, N, H, D), jnp.bfloat16) for kk in jax.random.split(jax.random.key(1), 4))
    cfg = dataclasses.replace(mc.default_config(head_dim=D, dtype=q.dtype, causal=causal, seq_q=N, seq_k=N),
                              bwd=mc.default_backward(D, q.dtype, N, N, causal=causal, deterministic=det))
    bwds, grads = {}, {}
    for name, launch in variants.items():
        if launch is None:
            g = lambda q, k, v, causal=causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                            implementation="cudnn")
        else:
            backward.launch_dkdv = launch
            partition._trace.cache_clear()
            g = lambda q, k, v, causal=causal, cfg=cfg: pf.dot_product_attention(
                q, k, v, is_causal=causal, implementation="mosaic", config=cfg)
        bwd, vjp, grads[name] = pullback(g, q, k, v, do)
        bwds[name] = (bwd, vjp)
    backward.launch_dkdv = variants["this"]
    errs = {n: max(rel_err(a, b) for a, b in zip(grads[n], grads["cudnn"])) for n in ("this", "other")}
    res = tflops_rounds(bwds, do, 4 * B * H * N * N * D * (0.5 if causal else 1) * 2.5, ROUNDS)
    med = {n: float(np.median(x)) for n, x in res.items()}
    print(f"D{D} N{N} c{int(causal)} {'det' if det else 'fused'}: this {med['this']:.1f} other {med['other']:.1f} "
          f"({med['this'] / med['other'] - 1:+.1%}) cudnn {med['cudnn']:.1f} this/cudnn {med['this'] / med['cudnn']:.3f} "
          f"| rounds this {[round(x) for x in res['this']]} other {[round(x) for x in res['other']]} "
          f"| err-vs-cudnn {errs['this']:.1e}/{errs['other']:.1e}", flush=True)
