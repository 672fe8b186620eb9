"""16-bit dropout: the rate and the scale it claims, identity when deterministic, fresh masks per key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kervljepa_jax.model.dropout import Dropout, keep_mask, quantised_rate


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_drop_fraction_matches_the_rate(rate):
    shape = (64, 129, 33)                      # odd last dim: the half-word tail is cut, not reused
    keep = np.asarray(keep_mask(jax.random.key(0), rate, shape))
    n = keep.size
    dropped = 1.0 - keep.mean()
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(dropped - rate) < 5 * sigma, (dropped, rate)
    assert abs(quantised_rate(rate) - rate) <= 0.5 / 65536


def test_mask_has_no_structure_along_the_packed_axis():
    # Two draws come from one 32-bit word: neighbours must still be independent.
    keep = np.asarray(keep_mask(jax.random.key(1), 0.5, (4096, 64)), np.float64)
    even, odd = keep[:, 0::2].ravel(), keep[:, 1::2].ravel()
    assert abs(np.corrcoef(even, odd)[0, 1]) < 0.02


def test_inverted_scaling_keeps_the_expectation():
    x = jnp.ones((256, 512), jnp.float32)
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / (1.0 - quantised_rate(0.1)), rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 0.01


def test_deterministic_is_identity_and_keys_differ():
    x = jax.random.normal(jax.random.key(3), (8, 16, 10))
    layer = Dropout(0.3)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    a = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    b = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


def test_edge_rates_and_shapes():
    x = jnp.arange(7.0, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
    zeros = Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(zeros, jnp.zeros_like(x))
    scalar = Dropout(0.5).apply({}, jnp.float32(2.0), deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert scalar.shape == () and float(scalar) in (0.0, 4.0)
    with pytest.raises(ValueError, match="dropout rate"):
        Dropout(1.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
