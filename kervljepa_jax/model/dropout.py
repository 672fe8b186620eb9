"""Dropout whose mask costs 16 random bits per element instead of 32.

`flax.linen.Dropout` draws a float32 uniform per element (`jax.random.bernoulli`), i.e. one
32-bit threefry word each. A keep/drop decision needs far fewer bits: here every 32-bit word
is split into two 16-bit draws, so the mask costs half the random words. On 2 CPU cores the
embedded phase-3 step spends ~30 ms of ~240 on dropout masks (LoRA on 7 projections x 4
layers, the compressor, the predictor); `benchmarks/train_step.py` measures both side by side.

The rate is quantised to 1/65536 (the drop threshold on a 16-bit draw; |error| <= 7.7e-6) and the
kept values are scaled by the quantised keep probability, so E[output] = input exactly.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_LEVELS = 1 << 16


def quantised_rate(rate: float) -> float:
    """The drop probability actually used for `rate`: round(rate * 2^16) / 2^16."""
    return round(rate * _LEVELS) / _LEVELS


def keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """Boolean [*shape]: True with probability 1 - quantised_rate(rate), two draws per 32-bit word."""
    shape = tuple(shape) or (1,)
    *lead, last = shape
    words = jax.random.bits(key, (*lead, math.ceil(last / 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)          # [..., words, 2]
    draws = halves.reshape(*lead, 2 * words.shape[-1])[..., :last]
    return draws >= jnp.uint16(round(rate * _LEVELS))


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout(rate)(x, deterministic=...)`: inverted dropout from the 'dropout' rngs."""

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"dropout rate must be in [0, 1], got {self.rate}")
        drop = quantised_rate(self.rate)
        if deterministic or drop == 0.0:
            return x
        if drop == 1.0:
            return jnp.zeros_like(x)
        keep = keep_mask(self.make_rng(self.rng_collection), self.rate, x.shape).reshape(x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - drop, x.dtype), jnp.zeros((), x.dtype))
