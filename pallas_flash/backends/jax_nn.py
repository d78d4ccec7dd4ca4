"""``jax.nn.dot_product_attention`` as backends: ``"xla"`` and ``"cudnn"``.

They take the same validated call as the kernels. jax.nn has no segment ids
or ALiBi, so these are expressed as a dense mask and bias (built here, of size
``Tq x Tk``); it has no soft-cap, dropout or position offsets, and refuses
those with ``NotImplementedError``. A query row that sees no key gets zeros from
``"xla"``, as from the kernels (jax.nn itself averages every value there);
``"cudnn"`` gives what cuDNN gives. A key whose bias is ``-inf`` counts as
masked for ``"xla"``, so a row with only such keys gets zeros too. They are
differentiable through jax.nn's own autodiff; ``config`` and ``interpret`` do
not apply.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_flash.backends.base import Backend
from pallas_flash.reference import visibility_mask
from pallas_flash.spec import AttentionInputs, AttentionSpec


def alibi_bias(slopes, seq_q: int, seq_k: int):
    """ALiBi as a dense ``[1 or B, N, Tq, Tk]`` float32 bias: ``slope * (j - i)``."""
    rel = (jnp.arange(seq_k)[None, :] - jnp.arange(seq_q)[:, None]).astype(jnp.float32)
    return slopes.astype(jnp.float32)[:, :, None, None] * rel


@dataclasses.dataclass(frozen=True)
class JaxNnBackend(Backend):
    """``jax.nn.dot_product_attention(..., implementation=self.implementation)``."""

    implementation: str  # "xla" or "cudnn"

    @property
    def name(self) -> str:
        return self.implementation

    def supports(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> None:
        impl = self.implementation
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise NotImplementedError("implementation='cudnn' needs an NVIDIA GPU")
        if spec.soft_cap is not None:
            raise NotImplementedError(f"jax.nn {impl} attention has no logits_soft_cap")
        if spec.has_dropout:
            raise NotImplementedError(f"jax.nn {impl} attention has no attention dropout")
        if spec.q_offset or spec.k_offset:
            raise NotImplementedError(f"jax.nn {impl} attention has no position offsets")

    def attention(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config=None, interpret=None,
                  return_residual: bool = False):
        """The output, or with ``return_residual`` jax.nn's ``(output, lse [B, Tq, N])``."""
        del config, interpret  # kernel-backend options
        mask, bias = inputs.mask, inputs.bias
        if spec.has_segments:  # jax.nn has no segment ids: express them as a mask
            q_ids, kv_ids = inputs.q_segment_ids, inputs.kv_segment_ids
            seg_mask = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
            mask = seg_mask if mask is None else (mask & seg_mask)
        if spec.has_alibi:  # nor ALiBi: express it as a bias, in float32 as the kernels add it
            alibi = alibi_bias(inputs.alibi_slopes, q.shape[1], k.shape[1])
            bias = alibi if bias is None else bias.astype(jnp.float32) + alibi
        if self.implementation == "xla" and inputs.bias is not None:
            # A key whose bias is -inf is one the row does not see: as a mask, so that a row whose keys all have it
            # gets zeros, as from the kernels (jax.nn's softmax over a row of -inf logits is NaN, as are its
            # gradients: every dK and dV). A NaN in the bias is not -inf, so it still reaches the output.
            finite = inputs.bias != -jnp.inf
            mask = finite if mask is None else (mask & finite)
        # jax.nn adds the window to int32 positions, so a wide one (2**31 - 1 means "no limit") would wrap: its
        # bounds clamped to these lengths, as the kernels take them (no offsets here: ``supports`` refuses them).
        within = spec.within(q.shape[1], k.shape[1])
        window = None if spec.window is None else (within.left, within.right)
        try:
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                bias,
                mask,
                scale=spec.scale,
                is_causal=spec.causal,
                query_seq_lengths=inputs.q_lengths,
                key_value_seq_lengths=inputs.kv_lengths,
                local_window_size=window,
                implementation=self.implementation,
                return_residual=return_residual,
            )
        except (ValueError, TypeError) as e:
            if self.implementation == "cudnn":  # cuDNN's own limits (head dims, dtypes, masks)
                raise NotImplementedError(f"jax.nn cudnn attention does not support this call: {e}") from e
            raise
        if self.implementation == "xla" and (mask is not None or window is not None or inputs.kv_lengths is not None
                                            or inputs.q_lengths is not None):
            # jax.nn's softmax over a row whose logits are all masked averages every value (for segment ids: the
            # other documents'); the kernels give such a row zeros, and so does this backend, so that a fallback
            # from them (implementation=None) keeps the result. The mask is dense here anyway, as are the logits.
            visible = visibility_mask(q.shape[1], k.shape[1], batch=q.shape[0], causal=spec.causal,
                                      local_window_size=window, query_seq_lengths=inputs.q_lengths,
                                      key_value_seq_lengths=inputs.kv_lengths,
                                      mask=mask)  # [B, 1 or N, Tq, Tk], the segments in ``mask``
            seen = jnp.transpose(visible.any(axis=-1), (0, 2, 1))[..., None]  # [B, Tq, 1 or N, 1]
            if return_residual:  # the kernels' lse of such a row is -inf; jax.nn's that of its large negatives
                out, lse = out
                return jnp.where(seen, out, jnp.zeros((), out.dtype)), jnp.where(seen[..., 0], lse, -jnp.inf)
            out = jnp.where(seen, out, jnp.zeros((), out.dtype))
        return out
