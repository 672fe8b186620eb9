"""Zone-constrained compressor (paper III-B 1): N <= 600 slice embeddings -> 32 visual tokens.

    slices [B, N, d_v] + z_mm [B, N] + valid [B, N]
      -> s'_i = s_i + PE(z_i)                         sinusoidal encoding of physical z (eq. 1)
      -> K = 32 learnable queries; query k attends only to the valid slices of its zone (eq. 2-3)
         Z_k = { i : floor(k n / K) <= i < floor((k+1) n / K) },  n = the volume's valid slices
         (`zone_constraint=False`, the Table XI ablation: every query attends to every valid slice)
      -> one global post-norm TransformerEncoderLayer over the 32 tokens (eq. 4)   V' [B, K, d_v]

Decisions the paper leaves open, fixed here:

* Positional encoding. PE(z) is the Vaswani sinusoid with the position measured in millimetres:
  PE[2j] = sin(z w_j), PE[2j+1] = cos(z w_j), w_j = pe_base^(-2j/d) rad/mm. With pe_base=1e4 the
  wavelengths run from 2*pi mm (resolves neighbouring 1-5 mm slices) to ~6e4 mm (a smooth ramp
  across a whole ~400 mm thorax). z is taken relative to the volume's first slice
  (`z_relative_to_first`), because the absolute DICOM table position is scanner-arbitrary.
* Empty zones. When n < K some zones hold no slice (floor(k n/K) == floor((k+1) n/K)); such a zone
  widens to the single slice floor(k n/K) (always <= n-1), i.e. its token reads the nearest slice
  at its own z-fraction. Every token is therefore a well-defined, spatially grounded token and the
  softmax never sees an empty row. A volume with n = 0 (rejected by the data layer) still gives
  finite output: the mask bias is finite, so its rows spread uniformly over the zeroed padding and
  each token is out_proj(v_proj's bias), the same for every such volume.
* Padding never enters: slices beyond `valid` are zeroed before anything touches them and are
  outside every zone, so the output does not depend on the padding length or padding content.
* Queries: `svd_init_queries` (top-K right singular vectors of a sample of slice embeddings,
  scaled to the sample's median norm) is the paper's initialisation; the module's own initialiser
  (N(0, 0.02)) only serves shape inference and data-free tests.

Parameter layout mirrors PyTorch (nn.MultiheadAttention + nn.TransformerEncoderLayer) so released
weights load by transpose/reshape only; see `torch_state_dict_to_params`:

    queries                       [K, d]          <- region_queries [K, d] or [1, K, d]
    zone_attn/{q,k,v}_proj/kernel [d, H, hd]      <- in_proj_weight[i*d:(i+1)*d].T reshaped
    zone_attn/{q,k,v}_proj/bias   [H, hd]         <- in_proj_bias[i*d:(i+1)*d] reshaped
    zone_attn/out_proj/kernel     [H, hd, d]      <- out_proj.weight.T reshaped
    zone_attn/out_proj/bias       [d]             <- out_proj.bias
    global_layer/self_attn/...    (as zone_attn)  <- self_attn.*
    global_layer/linear{1,2}/{kernel,bias}        <- linear{1,2}.weight.T, .bias
    global_layer/norm{1,2}/{scale,bias}           <- norm{1,2}.weight, .bias
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kervljepa_jax.model.dropout import Dropout
from kervljepa_jax.model.llama import ModelConfigError
from kervljepa_jax.sharding import constrain

# Additive bias for a key outside the zone: exp() of it underflows to exactly 0 in f32.
_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Sizes of the zone compressor; defaults are the paper's (d_v=1024, K=32, H=16)."""

    d_visual: int = 1024
    num_zones: int = 32
    num_heads: int = 16
    # The global layer is nn.TransformerEncoderLayer with its defaults (released weights come from it).
    ffn_dim: int = 2048
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pe_base: float = 10000.0
    z_relative_to_first: bool = True
    # False: no zones, every query attends to all valid slices (the component ablation of Table XI).
    zone_constraint: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # d_visual and num_zones are --config.model.d_visual / num_visual_tokens: the user's sizes.
        if self.d_visual <= 0 or self.d_visual % self.num_heads or self.d_visual % 2:
            raise ModelConfigError(f"--config.model.d_visual={self.d_visual}: the compressor's {self.num_heads} "
                                   "heads and its sin/cos z encoding need a positive even multiple of "
                                   f"{self.num_heads}; set it to the slice embeddings' width (--config.data."
                                   "embed_dim; 1024 for LeJEPA ViT-L)")
        if self.num_zones <= 0:
            raise ModelConfigError(f"--config.model.num_visual_tokens={self.num_zones}: the compressor needs at "
                                   "least one zone token")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"compressor: dropout={self.dropout}; need 0 <= dropout < 1")

    @property
    def head_dim(self) -> int:
        return self.d_visual // self.num_heads


# ---------------------------------------------------------------------------------------
# Pure functions: z encoding, zone mask, query initialisation
# ---------------------------------------------------------------------------------------

def sinusoidal_z_encoding(z_mm: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """Sinusoidal encoding of physical z: `z_mm [B, N]` (millimetres) -> `[B, N, dim]` (f32).

    Interleaved layout (PE[2j] = sin, PE[2j+1] = cos) with angular frequency base^(-2j/dim) rad/mm.
    """
    freqs = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-math.log(base) / dim))  # [dim/2]
    angles = z_mm.astype(jnp.float32)[..., None] * freqs                                  # [B, N, dim/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*z_mm.shape, dim)


def zone_bounds(num_valid: jax.Array, num_zones: int) -> tuple[jax.Array, jax.Array]:
    """Zone k of a volume with n valid slices: `[lo_k, hi_k)`; `num_valid [B]` -> two `[B, K]` int arrays.

    lo_k = floor(k n / K), hi_k = max(floor((k+1) n / K), lo_k + 1): an empty zone (n < K) widens to
    the single slice lo_k, which is <= n - 1 for every k < K whenever n >= 1.
    """
    k = jnp.arange(num_zones, dtype=jnp.int32)
    n = num_valid.astype(jnp.int32)[:, None]
    lo = (k * n) // num_zones
    hi = jnp.maximum(((k + 1) * n) // num_zones, lo + 1)
    return lo, hi


def zone_mask(valid: jax.Array, num_zones: int, constrained: bool = True) -> jax.Array:
    """`valid [B, N]` bool (a prefix) -> `[B, K, N]` bool: may query k read slice i.

    `constrained=False` drops the zones: every query may read every valid slice.
    """
    if not constrained:
        return jnp.broadcast_to(valid[:, None, :], (valid.shape[0], num_zones, valid.shape[-1]))
    lo, hi = zone_bounds(valid.sum(axis=-1), num_zones)
    i = jnp.arange(valid.shape[-1], dtype=jnp.int32)
    in_zone = (i >= lo[..., None]) & (i < hi[..., None])
    return in_zone & valid[:, None, :]


def svd_init_queries(embeddings: np.ndarray, num_queries: int = 32) -> np.ndarray:
    """Region queries from data: `embeddings [M, d_v]` slice embeddings -> `[num_queries, d_v]`.

    The top right singular vectors of the (uncentred) sample span the directions where slice
    embeddings carry the most energy, the first being their common mean direction; each is signed
    to point along the data (positive mean projection) and scaled to the sample's median row norm,
    so the queries live where the keys do and at their typical magnitude.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < num_queries or x.shape[1] < num_queries:
        raise ValueError(f"svd_init_queries: need embeddings [M, d_v] with M >= {num_queries} and "
                         f"d_v >= {num_queries}, got shape {x.shape}; pass more slice embeddings")
    if not np.all(np.isfinite(x)):
        raise ValueError("svd_init_queries: embeddings contain NaN/inf; clean the sample first")
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    directions = vt[:num_queries]                                   # [K, d_v], orthonormal rows
    signs = np.sign(x.mean(axis=0) @ directions.T)
    directions *= np.where(signs == 0, 1.0, signs)[:, None]
    scale = np.median(np.linalg.norm(x, axis=1))
    return (directions * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------

def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class HeadProjection(nn.Module):
    """A Dense over multi-axis shapes: `x [..., *in_shape] -> [..., *out_shape]`, kernel `in_shape + out_shape`.

    The kernel is declared at its full shape (not flattened, unlike nn.DenseGeneral's initialiser),
    so its logical axis names always match its rank, also when checked under an active mesh.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    kernel_init: Any
    bias_init: Any = nn.initializers.zeros
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            self.in_shape + self.out_shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[n_in:]),
                          self.out_shape, self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        return y + bias.astype(self.dtype)


class TorchMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (biases on, batch_first) with an optional additive bias.

    `query [B, L, d], key_value [B, S, d], bias [B, 1|H, L, S] | None -> [B, L, d]`.
    Init as torch: in_proj xavier-uniform over the joint [3d, d] matrix, out_proj U(+-1/sqrt(d)),
    zero biases. Attention dropout applies to the softmax weights, as torch's `dropout` does.
    """

    d_model: int
    num_heads: int
    dropout: float = 0.0
    seq_axis: str = "zones"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    sow_weights: bool = False

    def _proj(self, name: str, x: jax.Array) -> jax.Array:
        heads = (self.num_heads, self.d_model // self.num_heads)
        bound = math.sqrt(6.0 / (self.d_model + 3 * self.d_model))
        return HeadProjection((self.d_model,), heads, ("visual_embed", "heads", "head_dim"), _uniform(bound),
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    @nn.compact
    def __call__(self, query: jax.Array, key_value: jax.Array, bias: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        head_dim = self.d_model // self.num_heads
        q = self._proj("q_proj", query)                                   # [B, L, H, hd]
        k = self._proj("k_proj", key_value)                               # [B, S, H, hd]
        v = self._proj("v_proj", key_value)
        logits = jnp.einsum("blhe,bshe->bhls", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1)                         # [B, H, L, S]
        if self.sow_weights:
            self.sow("intermediates", "attention_weights", weights)
        weights = Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhls,bshe->blhe", weights.astype(self.dtype), v)
        out = HeadProjection((self.num_heads, head_dim), (self.d_model,), ("heads", "head_dim", "visual_embed"),
                             _uniform(1.0 / math.sqrt(self.d_model)), dtype=self.dtype,
                             param_dtype=self.param_dtype, name="out_proj")(out)
        return constrain(out, ("batch", self.seq_axis, "act_embed"))


class TransformerEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer with its defaults: post-norm, ReLU, biases, dropout everywhere.

    x = norm1(x + drop(self_attn(x))); x = norm2(x + drop(linear2(drop(relu(linear1(x))))))
    `x [B, K, d] -> [B, K, d]`.
    """

    config: CompressorConfig

    def _dense(self, features: int, fan_in: int, axes: tuple[str, str], name: str) -> nn.Dense:
        bound = 1.0 / math.sqrt(fan_in)  # torch Linear default (kaiming-uniform a=sqrt(5)) for weight and bias
        return nn.Dense(features, dtype=self.config.dtype, param_dtype=self.config.param_dtype,
                        kernel_init=nn.with_logical_partitioning(_uniform(bound), axes),
                        bias_init=nn.with_logical_partitioning(_uniform(bound), (axes[1],)), name=name)

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, use_fast_variance=False, dtype=self.config.dtype,
                            param_dtype=self.config.param_dtype,
                            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("visual_embed",)),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("visual_embed",)),
                            name=name)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        drop = lambda y: Dropout(cfg.dropout)(y, deterministic=deterministic)  # noqa: E731
        attn = TorchMultiheadAttention(cfg.d_visual, cfg.num_heads, cfg.dropout, "zones", cfg.dtype,
                                       cfg.param_dtype, name="self_attn")(x, x, None, deterministic)
        x = self._norm("norm1")(x + drop(attn))
        hidden = nn.relu(self._dense(cfg.ffn_dim, cfg.d_visual, ("visual_embed", "mlp"), "linear1")(x))
        ffn = self._dense(cfg.d_visual, cfg.ffn_dim, ("mlp", "visual_embed"), "linear2")(drop(hidden))
        x = self._norm("norm2")(x + drop(ffn))
        return constrain(x, ("batch", "zones", "act_embed"))


class ZoneCompressor(nn.Module):
    """`slices [B, N, d_v], z_mm [B, N], valid [B, N] -> V' [B, K, d_v]` (paper eq. 1-4).

    `zone_tokens` gives the per-zone tokens before the global layer (eq. 3); with
    `mutable=["intermediates"]` the zone attention weights [B, H, K, N] are sown under
    `zone_attn/attention_weights` for inspection.
    """

    config: CompressorConfig

    def setup(self):
        cfg = self.config
        self.queries = self.param(
            "queries", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("zones", "visual_embed")),
            (cfg.num_zones, cfg.d_visual), cfg.param_dtype)
        self.zone_attn = TorchMultiheadAttention(cfg.d_visual, cfg.num_heads, cfg.dropout, "zones", cfg.dtype,
                                                 cfg.param_dtype, sow_weights=True)
        self.global_layer = TransformerEncoderLayer(cfg)

    def _check(self, slices: jax.Array, z_mm: jax.Array, valid: jax.Array) -> None:
        d = self.config.d_visual
        if slices.ndim != 3 or slices.shape[-1] != d:
            raise ValueError(f"compressor: slices must be [B, N, {d}], got {slices.shape}; "
                             "check the slice-embedding width against CompressorConfig.d_visual")
        if z_mm.shape != slices.shape[:2] or valid.shape != slices.shape[:2]:
            raise ValueError(f"compressor: z_mm {z_mm.shape} and valid {valid.shape} must both be "
                             f"{slices.shape[:2]} (the slices' [B, N])")

    def zone_tokens(self, slices: jax.Array, z_mm: jax.Array, valid: jax.Array,
                    deterministic: bool = True) -> jax.Array:
        """Per-zone tokens before the global layer (eq. 1-3): `-> V [B, K, d_v]`."""
        cfg = self.config
        self._check(slices, z_mm, valid)
        valid = valid.astype(bool)
        z = z_mm.astype(jnp.float32)
        if cfg.z_relative_to_first:
            z = z - z[:, :1]
        z = jnp.where(valid, z, 0.0)
        pe = sinusoidal_z_encoding(z, cfg.d_visual, cfg.pe_base)
        # Zero the padding (whatever it holds, NaN included) so it can reach nothing downstream.
        keys = jnp.where(valid[..., None], slices.astype(jnp.float32) + pe, 0.0).astype(cfg.dtype)
        keys = constrain(keys, ("batch", "slices", "act_embed"))

        mask = zone_mask(valid, cfg.num_zones, cfg.zone_constraint)            # [B, K, N]
        bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)[:, None]       # [B, 1, K, N]
        queries = jnp.broadcast_to(self.queries.astype(cfg.dtype), (slices.shape[0],) + self.queries.shape)
        tokens = self.zone_attn(queries, keys, bias, deterministic)            # [B, K, d]
        return constrain(tokens, ("batch", "zones", "act_embed"))

    def __call__(self, slices: jax.Array, z_mm: jax.Array, valid: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        tokens = self.zone_tokens(slices, z_mm, valid, deterministic)
        return self.global_layer(tokens, deterministic)


# ---------------------------------------------------------------------------------------
# PyTorch weights
# ---------------------------------------------------------------------------------------

def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; .float() also covers bf16, which numpy lacks
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def torch_mha_to_params(state_dict: Mapping[str, Any], prefix: str, d_model: int, num_heads: int) -> dict:
    """nn.MultiheadAttention weights under `prefix` -> the `TorchMultiheadAttention` param dict."""
    head_dim = d_model // num_heads
    w_in = _np(state_dict[prefix + "in_proj_weight"])                  # [3d, d]
    b_in = _np(state_dict[prefix + "in_proj_bias"])                    # [3d]
    params = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * d_model, (i + 1) * d_model)
        params[name] = {"kernel": w_in[rows].T.reshape(d_model, num_heads, head_dim),
                        "bias": b_in[rows].reshape(num_heads, head_dim)}
    params["out_proj"] = {"kernel": _np(state_dict[prefix + "out_proj.weight"]).T.reshape(num_heads, head_dim, d_model),
                          "bias": _np(state_dict[prefix + "out_proj.bias"])}
    return params


def torch_encoder_layer_to_params(state_dict: Mapping[str, Any], prefix: str, config: CompressorConfig) -> dict:
    """nn.TransformerEncoderLayer weights under `prefix` -> the `TransformerEncoderLayer` param dict."""
    params = {"self_attn": torch_mha_to_params(state_dict, prefix + "self_attn.", config.d_visual, config.num_heads)}
    for name in ("linear1", "linear2"):
        params[name] = {"kernel": _np(state_dict[f"{prefix}{name}.weight"]).T,
                        "bias": _np(state_dict[f"{prefix}{name}.bias"])}
    for name in ("norm1", "norm2"):
        params[name] = {"scale": _np(state_dict[f"{prefix}{name}.weight"]),
                        "bias": _np(state_dict[f"{prefix}{name}.bias"])}
    return params


def torch_state_dict_to_params(state_dict: Mapping[str, Any], config: CompressorConfig, *,
                               queries_key: str = "region_queries", zone_attn_prefix: str = "zone_attn.",
                               encoder_prefix: str = "global_layer.") -> dict:
    """A PyTorch compressor state dict -> `ZoneCompressor` params (plain, unboxed arrays).

    Key names are arguments because the reference implementation's module names are its own;
    every key under the given names must be consumed and every produced shape must match the
    config, or this raises naming the offending key.
    """
    wanted = {queries_key}
    wanted |= {zone_attn_prefix + k for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    wanted |= {encoder_prefix + "self_attn." + k for k in
               ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    wanted |= {f"{encoder_prefix}{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in ("weight", "bias")}
    missing = sorted(wanted - set(state_dict))
    if missing:
        raise ValueError(f"torch_state_dict_to_params: missing key(s) {missing}; pass the right "
                         "queries_key/zone_attn_prefix/encoder_prefix for this checkpoint")
    prefixes = (zone_attn_prefix, encoder_prefix)
    extra = sorted(k for k in state_dict if k not in wanted and (k == queries_key or k.startswith(prefixes)))
    if extra:
        raise ValueError(f"torch_state_dict_to_params: unexpected key(s) {extra} under the compressor's prefixes; "
                         "the checkpoint does not match this architecture")
    params = {"queries": _np(state_dict[queries_key]).reshape(-1, config.d_visual),
              "zone_attn": torch_mha_to_params(state_dict, zone_attn_prefix, config.d_visual, config.num_heads),
              "global_layer": torch_encoder_layer_to_params(state_dict, encoder_prefix, config)}
    expected = jax.eval_shape(
        lambda: nn.unbox(ZoneCompressor(config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2, config.d_visual)), jnp.zeros((1, 2)), jnp.ones((1, 2), bool))
        )["params"])
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        got = params
        for entry in path:
            got = got[entry.key]
        if got.shape != want.shape:
            raise ValueError(f"torch_state_dict_to_params: {jax.tree_util.keystr(path)} has shape {got.shape}, "
                             f"expected {want.shape} for {config}")
    return jax.tree.map(lambda a: jnp.asarray(a, config.param_dtype), params)
