"""The zigzag layout for causal context parallelism: chunk order, round trip, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_zigzag_gives_device_i_chunks_i_and_2n_minus_1_minus_i(n):
    chunk = 3
    x = jnp.arange(2 * n * chunk)[None, :, None]  # [B, T, 1]: positions
    z = np.asarray(pf.zigzag(x, n))[0, :, 0]
    per_device = z.reshape(n, 2 * chunk)  # contiguous sharding over n devices
    for i in range(n):
        want = np.concatenate([np.arange(i * chunk, (i + 1) * chunk), np.arange((2 * n - 1 - i) * chunk, (2 * n - i) * chunk)])
        assert np.array_equal(per_device[i], want)
    assert np.array_equal(np.asarray(pf.unzigzag(pf.zigzag(x, n), n)), np.asarray(x))


def test_causal_work_is_balanced():
    """Visible (query, key) pairs per device under a causal mask: equal in zigzag order."""
    n, t = 4, 64
    pos = np.asarray(pf.zigzag(jnp.arange(t)[None, :], n))[0].reshape(n, -1)
    work = [(pos[i][:, None] >= np.arange(t)[None, :]).sum() for i in range(n)]
    assert len(set(work)) == 1


def test_other_axes_and_errors():
    x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)
    assert np.array_equal(np.asarray(pf.unzigzag(pf.zigzag(x, 2, axis=-2), 2, axis=-2)), np.asarray(x))
    with pytest.raises(ValueError, match="2n = 6 equal chunks"):
        pf.zigzag(x, 3)
    with pytest.raises(ValueError, match="n \\(the number of devices\\)"):
        pf.zigzag(x, 0)
    with pytest.raises(ValueError, match="out of range"):
        pf.zigzag(x, 2, axis=3)
