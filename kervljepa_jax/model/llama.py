"""Llama 3 decoder (paper III-B: the Llama 3.2 3B backbone) as pure functional Flax linen modules.

Parameter names follow Hugging Face so that import/export is transpose/reshape only:
  model/embed_tokens/weight [V, D]                    (HF model.embed_tokens.weight)
  model/layers_{a}_{b}/self_attn/{q,k,v,o}_proj/kernel [L, in, out]   (HF weight.T, stacked)
  model/layers_{a}_{b}/mlp/{gate,up,down}_proj/kernel  [L, in, out]
  model/layers_{a}_{b}/{input,post_attention}_layernorm/weight [L, D]
  model/norm/weight [D];  lm_head/kernel [D, V] (untied only)
Layers run under `nn.scan`, split into segments that end at `cfg.injection_layers` (0-based HF layer
indices) so that an adapter (the gated cross-attention of the bridge) runs after those layers;
segment `layers_8_14` holds HF layers 8..14 stacked on its leading axis.

Decoding uses an explicit, static-shape KV cache (`init_cache`): the same `__call__` does the full
forward (cache=None), the prefill (cache, T tokens at slot 0) and each one-token extend, and can be
called inside `jax.lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kervljepa_jax.model.lora import LoraConfig, LoraDense
from kervljepa_jax.sharding import constrain

Array = jax.Array

# Named rematerialisation policies for the scanned decoder layer.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


class ModelConfigError(ValueError):
    """Model sizes or a preset that cannot work (a user's config, not a bug): one line naming the
    setting and what fits. Every model config raises it; the entry points report it in one line."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE base and the optional llama3 frequency scaling (rope_type 'default' or 'llama3')."""

    theta: float = 500000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def injection_problem(injection_layers: Sequence[int], num_hidden_layers: int) -> str:
    """Why adapters cannot run after `injection_layers` of a `num_hidden_layers` decoder ("" = they can)."""
    layers = tuple(injection_layers)
    bad = [i for i in layers if not 0 <= i < num_hidden_layers - 1]
    if bad or list(layers) != sorted(set(layers)):
        return (f"injection_layers={layers}: need sorted, unique indices in [0, {num_hidden_layers - 2}] "
                f"(an adapter runs after that layer)")
    return ""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    lora: LoraConfig | None = None
    injection_layers: tuple[int, ...] = ()
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                   f"num_key_value_heads={self.num_key_value_heads}; fix the LLM's config.json")
        if self.remat_policy not in REMAT_POLICIES:
            raise ModelConfigError(f"remat_policy={self.remat_policy!r}: choose one of {sorted(REMAT_POLICIES)}")
        problem = injection_problem(self.injection_layers, self.num_hidden_layers)
        if problem:
            raise ModelConfigError(f"--config.model.{problem}")

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """Inclusive (first, last) layer ranges; each but the last ends at an injection layer."""
        bounds, start = [], 0
        for end in self.injection_layers:
            bounds.append((start, end))
            start = end + 1
        bounds.append((start, self.num_hidden_layers - 1))
        return tuple(bounds)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)


def segment_name(first: int, last: int) -> str:
    return f"layers_{first}_{last}"


def llama3_2_3b(**overrides) -> LlamaConfig:
    """Llama 3.2 3B (Instruct): 28 layers, hidden 3072, 24 heads / 8 kv heads, tied embeddings, bf16."""
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        # "dots" (every matmul output kept, the rest recomputed): by `python -m kervljepa_jax.aot`, the
        # phase-3 step at 8 x 544 per device on fsdp:8 needs 39.6 GiB a device and 2.08x the forward's
        # FLOPs, against 32.3 GiB and 2.11x for dots_no_batch and 59.7 GiB and 2.08x for no remat.
        tie_word_embeddings=True, injection_layers=(7, 14, 21), remat_policy="dots",
        dtype="bfloat16", param_dtype="bfloat16")
    return cfg.replace(**overrides)


def tiny(**overrides) -> LlamaConfig:
    """A Llama-architecture decoder small enough for tests and the CPU demo (f32)."""
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=64),
        tie_word_embeddings=True, max_position_embeddings=2048, injection_layers=(1,))
    return cfg.replace(**overrides)


PRESETS: dict[str, Callable[..., LlamaConfig]] = {"llama3_2_3b": llama3_2_3b, "tiny": tiny}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ModelConfigError(f"--config.model.preset={name!r}: no such preset; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> Array:
    """[head_dim / 2] inverse frequencies, with HF's llama3 smoothing when rope_type == 'llama3'."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "default":
        return inv_freq
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Array, head_dim: int, rope: RopeConfig) -> tuple[Array, Array]:
    """positions [B, T] -> cos, sin [B, T, head_dim] in HF's rotate-half layout (freqs repeated twice)."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, rope)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd]; rotate-half RoPE as HF `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF: weight * hidden.to(input_dtype)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def _dense(cfg: LlamaConfig, name: str, features: int, axes: tuple[str, str], deterministic: bool) -> LoraDense:
    lora = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
    return LoraDense(features=features, axes=axes, lora=lora, dtype=cfg.jnp_dtype,
                     param_dtype=cfg.jnp_param_dtype, name=name, deterministic=deterministic)


class Attention(nn.Module):
    """Grouped-query self-attention over an optional static KV cache."""

    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, bias: Array,
                 kv_cache: dict[str, Array] | None, cache_index: Array | None):
        cfg = self.cfg
        b, t, _ = x.shape
        h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, "q_proj", h * hd, ("embed", "heads"), self.deterministic)(x).reshape(b, t, h, hd)
        k = _dense(cfg, "k_proj", kvh * hd, ("embed", "kv_heads"), self.deterministic)(x).reshape(b, t, kvh, hd)
        v = _dense(cfg, "v_proj", kvh * hd, ("embed", "kv_heads"), self.deterministic)(x).reshape(b, t, kvh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "act_heads", None))
        groups = h // kvh
        q = q.reshape(b, t, kvh, groups, hd)
        if kv_cache is None:
            k = constrain(k, ("batch", "length", "act_kv_heads", None))
            v = constrain(v, ("batch", "length", "act_kv_heads", None))
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
            probs = jax.nn.softmax(scores + bias[:, None, None, :, :], axis=-1).astype(cfg.jnp_dtype)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * hd)
            new_cache = None
        else:
            out, new_cache = _attend_with_cache(cfg, q, k, v, bias, kv_cache)
        out = _dense(cfg, "o_proj", cfg.hidden_size, ("heads", "embed"), self.deterministic)(out)
        return out, new_cache


def _attend_with_cache(cfg: LlamaConfig, q: Array, k: Array, v: Array, bias: Array,
                       kv_cache: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Attention over the cache's past slots plus the T new keys: q [B, T, KVH, G, hd], k/v [B, T, KVH, hd],
    bias [B, T, S + T] (`cache_bias`), kv_cache k/v [B, KVH, S, hd] as before this call.

    Returns (out [B, T, H * hd], the new k/v [B, T, KVH, hd] in the cache dtype). The cache itself is
    not rewritten here: the backbone writes every layer's new k/v in one in-place update, so a decode
    step moves no whole-cache copy through the layer scan; heads-before-slots needs no transpose."""
    b, t, kvh, groups, hd = q.shape
    slots = kv_cache["k"].shape[2]
    new_cache = {"k": k.astype(kv_cache["k"].dtype), "v": v.astype(kv_cache["v"].dtype)}
    past_k = constrain(kv_cache["k"].astype(cfg.jnp_dtype), ("batch", "act_kv_heads", "length", None))
    past_v = constrain(kv_cache["v"].astype(cfg.jnp_dtype), ("batch", "act_kv_heads", "length", None))
    k = constrain(new_cache["k"].astype(cfg.jnp_dtype), ("batch", "length", "act_kv_heads", None))
    v = constrain(new_cache["v"].astype(cfg.jnp_dtype), ("batch", "length", "act_kv_heads", None))
    scores = jnp.concatenate([
        jnp.einsum("btkgd,bksd->bkgts", q, past_k, preferred_element_type=jnp.float32),
        jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)], axis=-1) / math.sqrt(hd)
    probs = jax.nn.softmax(scores + bias[:, None, None, :, :], axis=-1).astype(cfg.jnp_dtype)
    out = (jnp.einsum("bkgts,bksd->bkgtd", probs[..., :slots], past_v)    # batch dims first: a plain
           + jnp.einsum("bkgts,bskd->bkgtd", probs[..., slots:], v))        # batched matmul, no transpose
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kvh * groups * hd), new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        gate = _dense(cfg, "gate_proj", cfg.intermediate_size, ("embed", "mlp"), self.deterministic)(x)
        up = _dense(cfg, "up_proj", cfg.intermediate_size, ("embed", "mlp"), self.deterministic)(x)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return _dense(cfg, "down_proj", cfg.hidden_size, ("mlp", "embed"), self.deterministic)(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block; scan signature: (h, layer_cache, *broadcast) -> (h, (layer_cache, h))."""

    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, kv_cache: dict[str, Array] | None, cos: Array, sin: Array,
                 bias: Array, cache_index: Array | None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)
        attn_out, new_cache = Attention(cfg, self.deterministic, name="self_attn")(
            norm("input_layernorm")(h), cos, sin, bias, kv_cache, cache_index)
        h = h + checkpoint_name(attn_out, "attn_out")
        mlp_out = MLP(cfg, self.deterministic, name="mlp")(norm("post_attention_layernorm")(h))
        h = h + checkpoint_name(mlp_out, "mlp_out")
        h = constrain(h, ("batch", "length", "act_embed"))
        return h, (new_cache, h)


def _scanned_segment(cfg: LlamaConfig, length: int, deterministic: bool, name: str) -> nn.Module:
    layer_cls = DecoderLayer
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=1 if cfg.scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, deterministic, name=name)


# ----------------------------------------------------------------------------- model


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """A zeroed KV cache: per segment k/v [L_seg, B, KVH, S, hd] (heads before slots: what decode attention
    reads), the slot mask [B, S] and the next slot."""
    dtype = dtype or cfg.jnp_dtype
    layers = {}
    for first, last in cfg.segments:
        shape = (last - first + 1, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        layers[segment_name(first, last)] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return {"layers": layers, "mask": jnp.zeros((batch, max_len), jnp.bool_), "index": jnp.zeros((), jnp.int32)}


@struct.dataclass
class LlamaOutput:
    """hidden [B, T, D] (after the final norm), logits [B, T, V] f32, the updated cache (decoding),
    hidden_states (num_layers + 1 tensors [B, T, D], as HF's output_hidden_states)."""

    hidden: Array
    logits: Array | None = None
    cache: Any = None
    hidden_states: Any = None


class Llama(nn.Module):
    """Llama 3 causal LM. `adapters[i]` (if given) runs after layer `cfg.injection_layers[i]`
    as `h = adapter(h, adapter_context)`: the hook the gated cross-attention bridge uses."""

    cfg: LlamaConfig
    adapters: Sequence[Callable[[Array, Any], Array]] = ()
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        if self.adapters and len(self.adapters) != len(cfg.injection_layers):
            raise ValueError(f"{len(self.adapters)} adapters given for injection_layers={cfg.injection_layers}")
        self.model = LlamaBackbone(cfg, self.deterministic)
        if not cfg.tie_word_embeddings:
            self.lm_head = LoraDense(cfg.vocab_size, ("embed", "vocab"), None, cfg.jnp_dtype,
                                     cfg.jnp_param_dtype, kernel_init=nn.initializers.normal(0.02))

    def embed(self, input_ids: Array) -> Array:
        """input_ids [B, T] -> embeddings [B, T, D] (compute dtype)."""
        return self.model.embed(input_ids)

    def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
                 attention_mask: Array | None = None, positions: Array | None = None,
                 cache: dict[str, Any] | None = None, adapter_context: Any = None,
                 output_hidden_states: bool = False, return_logits: bool = True) -> LlamaOutput:
        """Full forward (cache None) or prefill/extend at slot `cache['index']`.

        input_ids [B, T] or inputs_embeds [B, T, D]; attention_mask [B, T] (1 = real token, 0 = pad);
        positions [B, T] default: count of real tokens before each one (left padding safe).
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.cfg.jnp_dtype)
        hidden, new_cache, all_hidden = self.model(x, attention_mask, positions, cache,
                                                   tuple(self.adapters), adapter_context, output_hidden_states)
        return LlamaOutput(hidden=hidden, logits=self.logits(hidden) if return_logits else None,
                           cache=new_cache, hidden_states=all_hidden)

    def logits(self, hidden: Array) -> Array:
        """hidden [B, T, D] -> logits [B, T, V] in float32."""
        if self.cfg.tie_word_embeddings:
            logits = self.model.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))


class Embedding(nn.Module):
    """Token embedding `weight [V, D]`, also the tied output projection."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                                 (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, input_ids: Array) -> Array:
        """[B, T] -> [B, T, D]"""
        return jnp.take(self.weight, input_ids, axis=0).astype(self.dtype)

    def attend(self, hidden: Array) -> Array:
        """[B, T, D] -> [B, T, V]"""
        return hidden @ self.weight.astype(self.dtype).T


class LlamaBackbone(nn.Module):
    """HF's `model`: embed_tokens, the scanned layer segments, norm."""

    cfg: LlamaConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.jnp_dtype, cfg.jnp_param_dtype)
        self.segment_modules = [
            _scanned_segment(cfg, last - first + 1, self.deterministic, segment_name(first, last))
            for first, last in cfg.segments]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)

    def embed(self, input_ids: Array) -> Array:
        return constrain(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))

    def attend(self, hidden: Array) -> Array:
        return self.embed_tokens.attend(hidden)

    def __call__(self, x, attention_mask, positions, cache, adapters, adapter_context, output_hidden_states):
        cfg = self.cfg
        b, t, _ = x.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if cache is None:
            key_mask, index = attention_mask, jnp.zeros((), jnp.int32)
            done_before = jnp.zeros((b,), jnp.int32)
        else:
            index = cache["index"]
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
            done_before = jnp.sum(cache["mask"], axis=-1, dtype=jnp.int32)
        if positions is None:
            positions = done_before[:, None] + jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1
            positions = jnp.maximum(positions, 0)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope)
        bias = causal_bias(index, t, key_mask) if cache is None else cache_bias(index, cache["mask"], attention_mask)
        x = constrain(x, ("batch", "length", "act_embed"))

        new_layers, hidden_states = {}, [x] if output_hidden_states else None
        for seg_idx, ((first, last), segment) in enumerate(zip(cfg.segments, self.segment_modules)):
            name = segment_name(first, last)
            layer_cache = None if cache is None else cache["layers"][name]
            x, (seg_new, seg_hidden) = segment(x, layer_cache, cos, sin, bias, index)
            if cache is not None:  # the segment's new k/v [L, B, T, KVH, hd] into slots index.. in one update
                new_layers[name] = {n: jax.lax.dynamic_update_slice(
                    layer_cache[n], jnp.swapaxes(seg_new[n], 2, 3), (0, 0, 0, index, 0)) for n in ("k", "v")}
            if output_hidden_states:
                hidden_states.extend(seg_hidden[i] for i in range(seg_hidden.shape[0]))
            if adapters and seg_idx < len(adapters):
                x = adapters[seg_idx](x, adapter_context)
                if output_hidden_states:  # the adapter's output is what the next layer sees
                    hidden_states[-1] = x
        hidden = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {"layers": new_layers, "mask": key_mask, "index": index + t}
        return hidden, new_cache, (tuple(hidden_states) if output_hidden_states else None)


def cache_bias(index: Array, past_mask: Array, attention_mask: Array) -> Array:
    """Additive bias [B, T, S + T] for `_attend_with_cache`: the S cache slots (only the filled ones,
    slot < index, that held real tokens) then the T new tokens (causal, real tokens only)."""
    t, s = attention_mask.shape[1], past_mask.shape[1]
    past = (jnp.arange(s)[None, None, :] < index) & past_mask[:, None, :]
    new = (jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :]) & attention_mask[:, None, :]
    allowed = jnp.concatenate([jnp.broadcast_to(past, (past_mask.shape[0], t, s)), new], axis=-1)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_bias(index: Array, t: int, key_mask: Array) -> Array:
    """Additive bias [B, T, S]: query t sits at slot index+t and sees valid slots <= its own."""
    s = key_mask.shape[-1]
    q_slot = index + jnp.arange(t)[:, None]
    allowed = (jnp.arange(s)[None, :] <= q_slot)[None] & key_mask[:, None, :]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
