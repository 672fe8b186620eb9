"""Ker-VLJEPA: the composed vision-language model (paper III-B, Fig. 1).

    slices [B, N, d_v], z_mm [B, N], valid [B, N]
      -> ZoneCompressor                      V'  [B, K, d_v]     compressor/
      -> JEPAPredictor                       V^  [B, K, D]       predictor/
      -> NormCalibrator (alpha)              V~  [B, K, D]       calibration: calibrator/alpha
      -> visual ablation (eval only: zero | shuffle | noise)
      -> (a) graft: the embeddings at the K `<|visual_region|>` ids := V~
         (b) gated cross-attention after decoder layers l in injection_layers:
             h += tanh(g_l) * MHA(LN(h), Linear_l(V~))          projector_{l}/, xattn_{l}/
             (or ungated, eq. 7, with xattn_gate="none": xattn.py)
         (c) JEPA head on mean(V~) -> z_v [B, jepa_dim], and per token -> [B, K, jepa_dim]
         (d) visual classifier on V' (mean and MIL max), LLM-visual classifier on the
             response tokens' last-layer hidden states            visual_classifier/, llm_classifier/
    log_temperature: the InfoNCE temperature (phase 2), a trained scalar.

Decoding (`prefill` / `extend`): the prefill computes V~ once, grafts it and returns the
projected tokens Linear_l(V~) as the decode context; every `extend` step passes that context to
the adapters, so the cross-attention fires on every generated token (the paper lost 2.5x F1 when
it only fired in the prefill; tests/model/test_vlm.py checks token-by-token == full forward).

The module names are the path patterns of the phase tables and the warm bridge
(see `BRIDGE_PATTERNS`); `make_config` derives every sub-config from the LLM preset, so sizes
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from kervljepa_jax import losses
from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import xattn as xattn_lib
from kervljepa_jax.model.bridge import (BridgeConfig, JEPAHead, JEPAPredictor, LLMVisualClassifier, NormCalibrator,
                                        VisualClassifier)
from kervljepa_jax.model.compressor import CompressorConfig, ZoneCompressor
from kervljepa_jax.sharding import constrain

Array = jax.Array

VISUAL_MODES = ("normal", "zero", "shuffle", "noise")
CALIBRATOR_PATH = ("calibrator",)     # where alpha sits in the "calibration" collection
XATTN_GATES = xattn_lib.GATES         # make_config's choices of xattn_gate
# The warm bridge (paper IV-B): layer projectors, cross-attention adapters, every LoRA tensor.
BRIDGE_PATTERNS = (xattn_lib.PROJECTOR_PATTERN, xattn_lib.XATTN_PATTERN, lora_lib.LORA_PATTERN)


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    llm: llama_lib.LlamaConfig
    compressor: CompressorConfig
    bridge: BridgeConfig
    xattn: xattn_lib.CrossAttentionConfig
    visual_token_id: int
    num_visual_tokens: int = 32
    # False: the adapters are built (checkpoints keep one layout) but never add to h, so the visual
    # tokens reach the LLM only as grafted input embeddings (the component ablation of Table XI).
    xattn_adapters: bool = True

    def __post_init__(self):
        checks = {"compressor.num_zones": (self.compressor.num_zones, self.num_visual_tokens),
                  "compressor.d_visual": (self.compressor.d_visual, self.bridge.d_visual),
                  "bridge.d_llm": (self.bridge.d_llm, self.llm.hidden_size),
                  "xattn.d_model": (self.xattn.d_model, self.llm.hidden_size)}
        bad = [f"{k}={a} (expected {b})" for k, (a, b) in checks.items() if a != b]
        if bad:
            raise ValueError(f"VLMConfig: inconsistent sizes: {', '.join(bad)}; build it with vlm.make_config")
        if not 0 <= self.visual_token_id < self.llm.vocab_size:
            raise ValueError(f"VLMConfig: visual_token_id={self.visual_token_id} is outside the vocabulary "
                             f"[0, {self.llm.vocab_size}); add <|visual_region|> to the tokenizer first")
        if not self.llm.injection_layers:
            raise ValueError("VLMConfig: the LLM config has no injection_layers; the bridge needs at least one")


def make_config(preset: str = "tiny", *, visual_token_id: int, vocab_size: int | None = None,
                d_visual: int = 1024, num_visual_tokens: int = 32, lora: lora_lib.LoraConfig | None = None,
                jepa_dim: int = 256, llm_config: llama_lib.LlamaConfig | None = None, xattn_gate: str = "tanh",
                xattn_gate_init: float = 0.0, zone_constraint: bool = True, norm_calibration: bool = True,
                xattn_adapters: bool = True, **llm_overrides) -> VLMConfig:
    """Every sub-config from one LLM preset (or an imported HF config, `llm_config`).

    xattn_gate / xattn_gate_init: the adapters' gate, "tanh" starting at the given value (Flamingo's,
    the default) or "none" (eq. 7 as written); see xattn.py.
    zone_constraint / norm_calibration / xattn_adapters: False removes that component (Table XI):
    queries attend to all valid slices, alpha stays 1, no adapter adds to the decoder's states.

    The JEPA space is the whitened text space, at most the LLM width wide (the tiny LLM has 64
    dims, so its JEPA/whitening space is 64, the 3B's is the paper's 256).
    """
    llm = llm_config or llama_lib.preset(preset)
    if vocab_size is not None:
        llm_overrides["vocab_size"] = vocab_size
    if lora is not None:
        llm_overrides["lora"] = lora
    llm = llm.replace(**llm_overrides)
    dtype = llm.jnp_dtype
    d_llm = llm.hidden_size
    compressor = CompressorConfig(d_visual=d_visual, num_zones=num_visual_tokens, zone_constraint=zone_constraint,
                                  dtype=dtype)
    bridge = BridgeConfig(d_visual=d_visual, d_llm=d_llm, jepa_hidden=min(1024, 4 * d_llm),
                          jepa_dim=min(jepa_dim, d_llm), norm_calibration=norm_calibration, dtype=dtype)
    cross = xattn_lib.CrossAttentionConfig(d_model=d_llm, num_heads=llm.num_attention_heads, head_dim=llm.head_dim,
                                           layer_norm_eps=llm.rms_norm_eps, gate=xattn_gate,
                                           gate_init=float(xattn_gate_init), dtype=dtype)
    return VLMConfig(llm=llm, compressor=compressor, bridge=bridge, xattn=cross, visual_token_id=visual_token_id,
                     num_visual_tokens=num_visual_tokens, xattn_adapters=xattn_adapters)


@struct.dataclass
class VisualOutput:
    tokens: Array          # V' [B, K, d_v]   compressor output
    calibrated: Array      # V~ [B, K, D]     after the predictor, alpha and any ablation
    cls_logits: Array      # [B, C]           visual classifier on mean(V')
    mil_logits: Array      # [B, C]           the same classifier on max(V') (MIL)
    z_visual: Array        # [B, jepa_dim]    JEPA head on mean(V~)
    z_tokens: Array        # [B, K, jepa_dim] JEPA head per token (phase 1 MMD)


@struct.dataclass
class VLMOutput:
    visual: VisualOutput
    logits: Array | None = None          # [B, T, V] f32
    hidden: Array | None = None          # [B, T, D] last layer, after the final norm
    llm_cls_logits: Array | None = None  # [B, C] LLM-visual classifier on the response tokens


def _keep(visual: Array, rng: Array | None) -> Array:
    return visual


def _zero(visual: Array, rng: Array | None) -> Array:
    return jnp.zeros_like(visual)


def _shuffle(visual: Array, rng: Array | None) -> Array:
    return jnp.roll(visual, 1, axis=0)


def _noise(visual: Array, rng: Array | None) -> Array:
    noise = jax.random.normal(jax.random.key(0) if rng is None else rng, visual.shape, jnp.float32)
    norm = jnp.linalg.norm(visual.astype(jnp.float32), axis=-1, keepdims=True)
    return (noise * norm / jnp.linalg.norm(noise, axis=-1, keepdims=True)).astype(visual.dtype)


_ABLATIONS = (_keep, _zero, _shuffle, _noise)     # in VISUAL_MODES order


def ablate(visual: Array, mode: str | Array, rng: Array | None = None) -> Array:
    """The paper's visual-grounding ablations (Table IX) on V~ [B, K, D].

    zero: all zeros. shuffle: every row gets the next row's tokens (a roll over the batch: no row
    keeps its own when B > 1). noise: Gaussian directions with each token's own norm, so only the
    content is destroyed, not the scale the LLM sees.
    `mode` is a name in VISUAL_MODES, or its index as an int32 array: then the mode is data
    (lax.switch), and one compiled program serves every mode (`visual_mode_index`).
    """
    if isinstance(mode, str):
        return _ABLATIONS[visual_mode_index(mode)](visual, rng)
    rng = jax.random.key(0) if rng is None else rng
    return jax.lax.switch(jnp.asarray(mode, jnp.int32), _ABLATIONS, visual, rng)


def visual_mode_index(mode: str) -> int:
    """The position of `mode` in VISUAL_MODES (what `ablate` takes as a traced mode)."""
    if mode not in VISUAL_MODES:
        raise ValueError(f"visual_mode={mode!r}: choose one of {VISUAL_MODES}")
    return VISUAL_MODES.index(mode)


def graft(embeds: Array, input_ids: Array, visual: Array, visual_token_id: int) -> Array:
    """`embeds [B, T, D]` with the k-th `<|visual_region|>` position of each row := `visual[:, k]`.

    A mask-based scatter (gather + where), differentiable in `visual`; the batch builder
    guarantees exactly K placeholders per row (data/text.check_visual_placeholders).
    """
    rank = jnp.cumsum(input_ids == visual_token_id, axis=1) - 1                    # k of each position
    # Only the first K placeholders are slots; a stray later one (never in a built batch) stays text.
    is_visual = (input_ids == visual_token_id) & (rank < visual.shape[1])          # [B, T]
    rank = jnp.clip(rank, 0, visual.shape[1] - 1)
    gathered = jnp.take_along_axis(visual.astype(embeds.dtype), rank[..., None], axis=1)  # [B, T, D]
    return jnp.where(is_visual[..., None], gathered, embeds)


class VLM(nn.Module):
    """Ker-VLJEPA. `deterministic=False` turns on dropout (compressor, predictor, LoRA)."""

    cfg: VLMConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        self.compressor = ZoneCompressor(cfg.compressor)
        self.predictor = JEPAPredictor(cfg.bridge)
        self.calibrator = NormCalibrator(enabled=cfg.bridge.norm_calibration)
        self.jepa_head = JEPAHead(cfg.bridge)
        self.visual_classifier = VisualClassifier(cfg.bridge)
        self.llm_classifier = LLMVisualClassifier(cfg.bridge)
        self.log_temperature = self.param("log_temperature", lambda key: losses.init_log_temperature())
        layers = cfg.llm.injection_layers
        self.projectors = [xattn_lib.VisualProjector(cfg.xattn, name=f"projector_{l}") for l in layers]
        self.xattns = [xattn_lib.GatedCrossAttention(cfg.xattn, name=f"xattn_{l}") for l in layers]
        self.llm = llama_lib.Llama(cfg.llm, adapters=tuple(self._adapter(i) for i in range(len(layers))),
                                   deterministic=self.deterministic)

    def _adapter(self, i: int):
        """Adapter i for the decoder hook: context = the projected visual tokens, one per adapter."""
        def adapter(h: Array, context: tuple[Array, ...] | None) -> Array:
            if context is None:
                return h
            out = self.xattns[i](h, context[i])       # run even when off: init creates its params
            return out if self.cfg.xattn_adapters else h   # off: XLA drops the unused adapter
        return adapter

    # ------------------------------------------------------------------ visual path

    def encode_visual(self, slices: Array | None, z_mm: Array | None, valid: Array | None,
                      visual_mode: str | Array = "normal", rng: Array | None = None,
                      visual_tokens: Array | None = None) -> VisualOutput:
        """`slices [B, N, d_v], z_mm [B, N], valid [B, N]` -> V', V~ and the visual heads.

        `visual_tokens [B, K, d_v]`, when given, is V' itself (a frozen compressor's output
        computed once per volume: feature_cache.compressor_tokens) and the slices are not read.
        """
        tokens = self.compressor(slices, z_mm, valid, self.deterministic) if visual_tokens is None \
            else visual_tokens.astype(self.cfg.compressor.dtype)
        cls_logits, mil_logits = self.visual_classifier(tokens)
        calibrated = ablate(self.calibrator(self.predictor(tokens, self.deterministic)), visual_mode, rng)
        return VisualOutput(tokens=tokens, calibrated=calibrated, cls_logits=cls_logits, mil_logits=mil_logits,
                            z_visual=self.jepa_head(calibrated.mean(axis=1)), z_tokens=self.jepa_head(calibrated))

    def visual_context(self, calibrated: Array) -> tuple[Array, ...]:
        """V~ [B, K, D] -> Linear_l(V~) per adapter: what the cross-attention attends to."""
        return tuple(projector(calibrated) for projector in self.projectors)

    def _embed(self, input_ids: Array, calibrated: Array) -> Array:
        embeds = graft(self.llm.embed(input_ids), input_ids, calibrated, self.cfg.visual_token_id)
        return constrain(embeds, ("batch", "length", "act_embed"))

    # ------------------------------------------------------------------ training forward

    def __call__(self, slices: Array, z_mm: Array, valid: Array, input_ids: Array | None = None,
                 attention_mask: Array | None = None, response_mask: Array | None = None, *,
                 visual_mode: str | Array = "normal", rng: Array | None = None,
                 return_logits: bool = True, visual_tokens: Array | None = None) -> VLMOutput:
        """Every output in one forward. Without `input_ids` only the visual path runs (phases 1-2).

        input_ids / attention_mask / response_mask [B, T]; response_mask (the assistant tokens)
        feeds the LLM-visual classifier. return_logits=False leaves the LM head to the caller
        (`token_logits`, e.g. only where a loss needs it: losses.lm_loss_from_hidden).
        visual_tokens [B, K, d_v]: a precomputed V' in place of the compressor (see encode_visual).
        """
        visual = self.encode_visual(slices, z_mm, valid, visual_mode, rng, visual_tokens)
        if input_ids is None:
            return VLMOutput(visual=visual)
        out = self.llm(inputs_embeds=self._embed(input_ids, visual.calibrated), attention_mask=attention_mask,
                       adapter_context=self.visual_context(visual.calibrated), return_logits=return_logits)
        if response_mask is None:
            response_mask = jnp.ones(input_ids.shape, jnp.bool_) if attention_mask is None else attention_mask
        return VLMOutput(visual=visual, logits=out.logits, hidden=out.hidden,
                         llm_cls_logits=self.llm_classifier(out.hidden, response_mask))

    def token_logits(self, hidden: Array) -> Array:
        """The LM head: last hidden states [B, T, D] -> logits [B, T, V] float32."""
        return self.llm.logits(hidden)

    # ------------------------------------------------------------------ decoding

    def prefill(self, slices: Array, z_mm: Array, valid: Array, input_ids: Array, attention_mask: Array,
                cache: dict[str, Any], visual_mode: str | Array = "normal",
                rng: Array | None = None) -> tuple[Array, dict[str, Any], tuple[Array, ...]]:
        """The prompt [B, P] (left-padded) into the cache -> (last logits [B, V], cache, decode context)."""
        calibrated = self.encode_visual(slices, z_mm, valid, visual_mode, rng).calibrated
        context = self.visual_context(calibrated)
        out = self.llm(inputs_embeds=self._embed(input_ids, calibrated), attention_mask=attention_mask,
                       cache=cache, adapter_context=context)
        return self._no_placeholder(out.logits[:, -1]), out.cache, context

    def extend(self, token: Array, cache: dict[str, Any],
               context: tuple[Array, ...]) -> tuple[Array, dict[str, Any]]:
        """One step: token [B, 1] -> (logits [B, V], cache); the adapters see `context` again."""
        out = self.llm(token, cache=cache, adapter_context=context)
        return self._no_placeholder(out.logits[:, -1]), out.cache

    def _no_placeholder(self, logits: Array) -> Array:
        """Decoding never emits `<|visual_region|>`: it is an input slot, not a word."""
        return logits.at[:, self.cfg.visual_token_id].set(-jnp.inf)

    def text_hidden_states(self, input_ids: Array, attention_mask: Array) -> tuple[Array, ...]:
        """The LLM alone on text (no visual context, adapters idle): hidden states of every layer."""
        return self.llm(input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        return_logits=False).hidden_states


def select(params: Any, patterns: tuple[str, ...] | str) -> list[str]:
    """'/'-joined paths of the leaves matching any of `patterns` (re.fullmatch)."""
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    return sorted({p for pattern in patterns for p in lora_lib.select_paths(params, pattern)})


def count_bridge_tensors(params: Any) -> dict[str, int]:
    """Per-layer tensor counts of the warm bridge: projectors, adapters, LoRA (scanned [L, ...] = L)."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    count = lambda pattern: sum(1 for p in flat if re.fullmatch(pattern, p))  # noqa: E731
    return {"projector": count(xattn_lib.PROJECTOR_PATTERN), "xattn": count(xattn_lib.XATTN_PATTERN),
            "lora": lora_lib.count_lora_tensors(params)}


def init(cfg: VLMConfig, rng: Array, batch: int = 1, num_slices: int = 8, seq_len: int | None = None) -> dict:
    """Fresh variables ({"params", "calibration"}), unboxed, from dummy inputs of the given sizes."""
    seq_len = seq_len or cfg.num_visual_tokens + 2
    ids = jnp.full((batch, seq_len), cfg.visual_token_id, jnp.int32)
    slices = jnp.zeros((batch, num_slices, cfg.compressor.d_visual), jnp.float32)
    # jit: one compilation instead of dispatching every init op eagerly (seconds vs tens of seconds).
    variables = jax.jit(VLM(cfg).init)(rng, slices, jnp.zeros((batch, num_slices)),
                                       jnp.ones((batch, num_slices), bool), ids)
    return nn.unbox(variables)
