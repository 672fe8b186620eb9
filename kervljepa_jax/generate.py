"""Batched sampling as one jitted `lax.while_loop` over the static KV cache (paper IV-B settings).

A decoder plugs in through two functions (a `DecodeModel`):
  prefill(variables, inputs, prompt_mask, cache) -> (last_logits [B, V], cache, context)
  extend(variables, token [B, 1], cache, context) -> (logits [B, V], cache)
`context` rides in the loop state: for the VLM it is the projected visual tokens Linear_l(V~), one per adapter, so the gated
cross-attention adapters fire at every decode step (paper III-B 3), not only in the prefill.

Prompts are left-padded ([B, P] with a mask); the repetition-penalty / n-gram history keeps each
row's real tokens left-aligned. Finished rows (eos) emit `pad_id`, as transformers does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kervljepa_jax import sampling as sampling_lib, sharding
from kervljepa_jax.data import text, tokenizer as tokenizers
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.sampling import SamplingConfig

Array = jax.Array


class DecodeModel(NamedTuple):
    prefill: Callable[..., tuple[Array, Any, Any]]
    extend: Callable[..., tuple[Array, Any]]
    init_cache: Callable[[int, int], Any]  # (batch, max_len) -> empty cache


@struct.dataclass
class GenerateOutput:
    tokens: Array    # [B, max_new_tokens] generated ids, pad_id after eos
    lengths: Array   # [B] generated tokens per row, eos included


@struct.dataclass
class _State:
    step: Array
    logits: Array
    cache: Any
    context: Any
    tokens: Array
    history: Array
    seen: Any        # [B, V] bool: ids in each row's history (repetition penalty), None when off
    length: Array
    done: Array
    rng: Array


def left_align(prompt_ids: Array, prompt_mask: Array, width: int) -> tuple[Array, Array]:
    """Left-padded [B, P] -> ([B, width] real tokens first, [B] prompt lengths)."""
    batch, p = prompt_ids.shape
    lengths = prompt_mask.astype(jnp.int32).sum(-1)
    src = jnp.arange(width)[None, :] + (p - lengths)[:, None]
    aligned = jnp.take_along_axis(prompt_ids, jnp.clip(src, 0, p - 1), axis=1)
    return jnp.where(jnp.arange(width)[None, :] < lengths[:, None], aligned, 0), lengths


def decode(model: DecodeModel, variables: Any, inputs: Any, prompt_ids: Array, prompt_mask: Array,
           rng: Array, cfg: SamplingConfig, eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> GenerateOutput:
    """The whole generation; call under jit (see `Generator`). prompt_ids [B, P] left-padded."""
    batch, p = prompt_ids.shape
    max_new = cfg.max_new_tokens
    cache = model.init_cache(batch, p + max_new)
    logits, cache, context = model.prefill(variables, inputs, prompt_mask, cache)
    history, length = left_align(prompt_ids, prompt_mask, p + max_new)
    # The nucleus draws' uniforms for every step in one call (a threefry call inside the loop body
    # costs a rolled loop per step on CPU); the per-step key only feeds sample_top_p's rare fallback.
    rng, draw_rng = jax.random.split(rng)
    uniforms = jax.random.uniform(draw_rng, (max_new, batch, sampling_lib.TOP_P_TRIES))
    seen = (sampling_lib.seen_tokens(history, length, logits.shape[-1])
            if cfg.repetition_penalty != 1.0 else None)
    state = _State(step=jnp.zeros((), jnp.int32), logits=logits, cache=cache, context=context,
                   tokens=jnp.full((batch, max_new), pad_id, jnp.int32), history=history, seen=seen,
                   length=length, done=jnp.zeros((batch,), jnp.bool_), rng=rng)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    rows = jnp.arange(batch)

    def cond(s: _State) -> Array:
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        rng, key = jax.random.split(s.rng)
        token = sampling_lib.next_token(key, s.logits, s.history, s.length, cfg, s.seen, uniforms[s.step])
        token = jnp.where(s.done, pad_id, token)
        history = s.history.at[rows, jnp.where(s.done, s.history.shape[1], s.length)].set(token, mode="drop")
        seen = None if s.seen is None else sampling_lib.mark_seen(s.seen, token, ~s.done)
        logits, cache = model.extend(variables, token[:, None], s.cache, s.context)
        return s.replace(step=s.step + 1, logits=logits, cache=cache, rng=rng,
                         tokens=s.tokens.at[:, s.step].set(token), history=history, seen=seen,
                         length=s.length + (~s.done).astype(jnp.int32),
                         done=s.done | jnp.isin(token, eos))

    final = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=final.tokens, lengths=final.length - length)


class Generator:
    """Compile once, generate many times: `Generator(decode_model, cfg, eos_ids)(variables, ...)`."""

    def __init__(self, model: DecodeModel, cfg: SamplingConfig, eos_ids: tuple[int, ...] = (), pad_id: int = 0):
        self.cfg = cfg
        self._fn = jax.jit(lambda variables, inputs, ids, mask, rng: decode(
            model, variables, inputs, ids, mask, rng, cfg, tuple(eos_ids), pad_id))

    def __call__(self, variables: Any, inputs: Any, prompt_ids: Array, prompt_mask: Array | None = None,
                 rng: Array | None = None) -> GenerateOutput:
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if prompt_ids.ndim != 2:
            raise ValueError(f"generate: prompt_ids must be [B, P], got shape {prompt_ids.shape}")
        mask = jnp.ones_like(prompt_ids, jnp.bool_) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.bool_)
        if mask.shape != prompt_ids.shape:
            raise ValueError(f"generate: prompt_mask {mask.shape} must match prompt_ids {prompt_ids.shape}")
        rng = jax.random.key(0) if rng is None else rng
        return self._fn(variables, inputs, prompt_ids, mask, rng)


# ----------------------------------------------------------------------------- plain Llama


def llama_decode_model(model: llama_lib.Llama) -> DecodeModel:
    """The text-only decoder (no visual path): inputs are the prompt ids themselves."""

    def prefill(variables, prompt_ids, prompt_mask, cache):
        out = model.apply(variables, prompt_ids, attention_mask=prompt_mask, cache=cache)
        return out.logits[:, -1], out.cache, None

    def extend(variables, token, cache, context):
        del context
        out = model.apply(variables, token, cache=cache)
        return out.logits[:, -1], out.cache

    return DecodeModel(prefill, extend, lambda b, n: llama_lib.init_cache(model.cfg, b, n))


def generate_text(model: llama_lib.Llama, params: Any, prompt_ids: Array, prompt_mask: Array | None = None,
                  cfg: SamplingConfig = SamplingConfig(), rng: Array | None = None,
                  eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> GenerateOutput:
    """One-off text generation with a plain Llama (compiles per call: keep a `Generator` for loops)."""
    gen = Generator(llama_decode_model(model), cfg, eos_ids, pad_id)
    return gen({"params": params}, jnp.asarray(prompt_ids, jnp.int32), prompt_ids, prompt_mask, rng)


# ----------------------------------------------------------------------------- the VLM


def vlm_decode_model(model: vlm_lib.VLM, visual_mode: str | None = "normal") -> DecodeModel:
    """Ker-VLJEPA decoding: inputs = {slices [B, N, d_v], z_mm [B, N], valid [B, N], input_ids [B, P],
    rng (noise ablation)}; the projected visual tokens are the loop's context, so the adapters fire
    on every step. `visual_mode` (normal | zero | shuffle | noise) is the paper's Table IX ablation;
    None reads it from inputs["visual_mode"] (`vlm.visual_mode_index`), so one compiled loop serves
    every mode."""
    if visual_mode is not None:
        vlm_lib.visual_mode_index(visual_mode)             # fails on an unknown mode

    def prefill(variables, inputs, prompt_mask, cache):
        mode = inputs["visual_mode"] if visual_mode is None else visual_mode
        return model.apply(variables, inputs["slices"], inputs["z_mm"], inputs["valid"], inputs["input_ids"],
                           prompt_mask, cache, mode, inputs.get("rng"), method="prefill")

    def extend(variables, token, cache, context):
        return model.apply(variables, token, cache, context, method="extend")

    return DecodeModel(prefill, extend, lambda b, n: llama_lib.init_cache(model.cfg.llm, b, n))


class ReportGenerator:
    """Reports from slice embeddings: the chat prompt with K placeholders, one jitted loop for every
    visual mode (the mode is an input of the loop, not a constant of it: the ablations cost no compile).

        gen = ReportGenerator(vlm_lib.VLM(cfg), tokenizer, SamplingConfig())
        texts = gen(variables, slices, z_mm, valid)            # list of B strings
    """

    def __init__(self, model: vlm_lib.VLM, tokenizer: Any, cfg: SamplingConfig = SamplingConfig(),
                 prompt_ids: Any = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.prompt_ids = jnp.asarray(text.encode_prompt(tokenizer, model.cfg.num_visual_tokens)
                                      if prompt_ids is None else prompt_ids, jnp.int32)
        ids = tokenizers.special_ids(tokenizer)
        self.eos_ids, self.pad_id = (ids["eot"], ids["eos"]), ids["pad"]
        self.generator = Generator(vlm_decode_model(model, None), cfg, self.eos_ids, self.pad_id)

    def tokens(self, variables: Any, slices: Array, z_mm: Array, valid: Array, *, visual_mode: str = "normal",
               rng: Array | None = None) -> GenerateOutput:
        mode = jnp.asarray(vlm_lib.visual_mode_index(visual_mode), jnp.int32)
        batch = slices.shape[0]
        prompt = jnp.broadcast_to(self.prompt_ids, (batch, self.prompt_ids.shape[0]))
        rng = jax.random.key(0) if rng is None else rng
        noise_key, sample_key = jax.random.split(rng)
        inputs = {"slices": slices, "z_mm": z_mm, "valid": valid, "input_ids": prompt, "rng": noise_key,
                  "visual_mode": mode}
        return self.generator(variables, inputs, prompt, None, sample_key)

    def __call__(self, variables: Any, slices: Array, z_mm: Array, valid: Array, *, visual_mode: str = "normal",
                 rng: Array | None = None) -> list[str]:
        out = self.tokens(variables, slices, z_mm, valid, visual_mode=visual_mode, rng=rng)
        # Every process gets every row: a multi-process batch is split over processes.
        tokens, lengths = sharding.host_copy((out.tokens, out.lengths))
        return [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(tokens, lengths)]
