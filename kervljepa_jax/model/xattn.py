"""Flamingo-style gated cross-attention from decoder layers to the visual tokens (paper III-B 3, eq. 7).

After each injection layer l (7, 14, 21 for the 3B):

    P_l(V~) = Linear_l(V~)                                    VisualProjector  [B, K, D] (kernel + bias)
    h'      = h + tanh(gate_l) * MHA_l(LN(h), P_l(V~), P_l(V~))   GatedCrossAttention [B, T, D]

MHA_l has bias-free Q/K/V/O projections, Xavier-uniform with gain 0.3; one LayerNorm (scale +
bias) normalises the queries. The gate is a choice (`CrossAttentionConfig.gate`, from
`model.xattn_gate` / `model.xattn_gate_init` of the run config): the paper calls its adapters
gated and Flamingo-style (III-B3) but writes eq. 7 without a gate, h' = h + MHA_l(...).

* "tanh" (default): Flamingo's scalar tanh gate, starting at `gate_init` = 0, so a fresh adapter
  is the identity and a fresh VLM equals its base LLM exactly: the pretrained decoder is not
  disturbed by a random adapter before the bridge has learnt anything. Each adapter holds 7
  tensors (q, k, v, o kernels, LN scale, LN bias, gate) and each projector 2: 3 injection layers
  give the paper's 27 bridge components.
* "none": eq. 7 as written, the adapter's output added ungated (6 tensors an adapter, no gate).

K/V are recomputed from the 32 projected visual tokens on every call (cheap), and nothing depends
on the query length: a full sequence h [B, T, D] and one decode step h [B, 1, D] go through the
same code, so the adapter fires on every generated token (the paper's 0.122 -> 0.304 F1 fix).

Instantiate as `xattn_{layer}` / `projector_{layer}` so that phase tables and the warm bridge
select them with `XATTN_PATTERN` / `PROJECTOR_PATTERN`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kervljepa_jax.sharding import constrain

# Path patterns (over '/'-joined param paths) of the bridge modules, when named as documented above.
XATTN_PATTERN = r"(^|.*/)xattn_\d+/.*"
PROJECTOR_PATTERN = r"(^|.*/)projector_\d+/.*"
# The adapters' scalar tanh gates alone (an optimizer group of their own in training/config.py).
XATTN_GATE_PATTERN = r"(^|.*/)xattn_\d+/gate$"

_MASKED = -1e9
GATES = ("tanh", "none")     # CrossAttentionConfig.gate: Flamingo's tanh(gate) * out, or eq. 7's ungated out


@dataclasses.dataclass(frozen=True)
class CrossAttentionConfig:
    """Sizes of one adapter; defaults are Llama 3.2 3B's (D=3072, 24 heads of 128)."""

    d_model: int = 3072
    num_heads: int = 24
    head_dim: int = 128
    init_gain: float = 0.3
    gate: str = "tanh"          # one of GATES
    gate_init: float = 0.0      # the tanh gate's initial value
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if min(self.d_model, self.num_heads, self.head_dim) <= 0:
            raise ValueError(f"xattn: d_model, num_heads and head_dim must be positive, got {self.d_model}, "
                             f"{self.num_heads}, {self.head_dim}")
        if self.gate not in GATES:
            raise ValueError(f"xattn: gate={self.gate!r}; use one of {list(GATES)}")


def _xavier(gain: float, n_in: int, n_out: int):
    """torch.nn.init.xavier_uniform_(w, gain) for a kernel whose first `n_in` axes are fan-in and last
    `n_out` fan-out: U(+-gain * sqrt(6 / (fan_in + fan_out)))."""
    return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
                                            out_axis=tuple(range(n_in, n_in + n_out)))


class Projection(nn.Module):
    """Bias-free multi-axis linear map `x [..., *in_shape] -> [..., *out_shape]`, Xavier-uniform kernel
    declared at its full shape `in_shape + out_shape` with logical names `axes`."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    gain: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = _xavier(self.gain, len(self.in_shape), len(self.out_shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            self.in_shape + self.out_shape, self.param_dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=len(self.in_shape))


class VisualProjector(nn.Module):
    """Linear_l: `V~ [B, K, D] -> [B, K, D]`, with bias (torch Linear default init)."""

    config: CrossAttentionConfig

    @nn.compact
    def __call__(self, visual: jax.Array) -> jax.Array:
        cfg = self.config
        if visual.shape[-1] != cfg.d_model:
            raise ValueError(f"VisualProjector: visual tokens must end in d_model={cfg.d_model}, got {visual.shape}")
        bound = 1.0 / math.sqrt(cfg.d_model)
        uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        # Params sit directly on the module (projector_l/kernel, projector_l/bias): torch's Linear_l.weight.T, .bias.
        kernel = self.param("kernel", nn.with_logical_partitioning(uniform, ("proj", "embed")),
                            (cfg.d_model, cfg.d_model), cfg.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(uniform, ("embed",)), (cfg.d_model,), cfg.param_dtype)
        out = visual.astype(cfg.dtype) @ kernel.astype(cfg.dtype) + bias.astype(cfg.dtype)
        return constrain(out, ("batch", "zones", "act_embed"))


class GatedCrossAttention(nn.Module):
    """`h [B, T, D], visual [B, K, D] (projected), visual_mask [B, K] | None -> h' [B, T, D]`.

    T is free (a whole sequence or a single decode step). A row whose visual tokens are all
    masked gets no visual contribution (h' = h).
    """

    config: CrossAttentionConfig

    def _proj(self, name: str, x: jax.Array) -> jax.Array:
        cfg = self.config
        return Projection((cfg.d_model,), (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                          cfg.init_gain, cfg.dtype, cfg.param_dtype, name=name)(x)

    @nn.compact
    def __call__(self, h: jax.Array, visual: jax.Array, visual_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if h.ndim != 3 or h.shape[-1] != cfg.d_model or visual.ndim != 3 or visual.shape[-1] != cfg.d_model \
                or visual.shape[0] != h.shape[0]:
            raise ValueError(f"GatedCrossAttention: need h [B, T, {cfg.d_model}] and visual [B, K, {cfg.d_model}], "
                             f"got {h.shape} and {visual.shape}")
        if visual_mask is not None and visual_mask.shape != visual.shape[:2]:
            raise ValueError(f"GatedCrossAttention: visual_mask {visual_mask.shape} must be {visual.shape[:2]}")
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype,
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                         name="layer_norm")(h)
        q = self._proj("q_proj", x)                                       # [B, T, H, hd]
        k = self._proj("k_proj", visual)                                  # [B, K, H, hd]
        v = self._proj("v_proj", visual)
        logits = jnp.einsum("bthe,bkhe->bhtk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
        if visual_mask is not None:
            visible = visual_mask.astype(bool)[:, None, None, :]          # [B, 1, 1, K]
            logits = jnp.where(visible, logits, _MASKED)
        weights = jax.nn.softmax(logits, axis=-1)                         # [B, H, T, K]
        if visual_mask is not None:  # a row with nothing visible reads nothing (o_proj has no bias)
            weights = weights * visible.any(axis=-1, keepdims=True)
        attended = jnp.einsum("bhtk,bkhe->bthe", weights.astype(cfg.dtype), v)
        attended = constrain(attended, ("batch", "length", "act_heads", None))
        out = Projection((cfg.num_heads, cfg.head_dim), (cfg.d_model,), ("heads", "head_dim", "embed"),
                         cfg.init_gain, cfg.dtype, cfg.param_dtype, name="o_proj")(attended)
        h_new = h + (self._gate() * out.astype(jnp.float32)).astype(h.dtype)
        return constrain(h_new, ("batch", "length", "act_embed"))

    def _gate(self) -> jax.Array | float:
        """What multiplies the adapter's output: tanh of the learnt scalar gate, or 1 (eq. 7)."""
        cfg = self.config
        if cfg.gate == "none":
            return 1.0
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.constant(cfg.gate_init), ()),
                          (), cfg.param_dtype)
        return jnp.tanh(gate.astype(jnp.float32))
