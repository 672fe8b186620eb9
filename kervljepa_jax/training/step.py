"""One training step per phase: the phase's losses (paper eq. 9-13) over one VLM forward.

    phase 1  1.5 BCE(cls) + 1.0 MIL + 1.0 orth(V') + 0.5 MMD-IMQ(z_tokens, condition texts)
    phase 2  InfoNCE(z_v, report text; learned tau, negatives = the global batch) + 0.5 MMD
    phase 3  LM + focal(LLM-cls) + JEPA(z_v, report text) + 3.0 BCE(LLM-cls)
    phase 4  LM + focal(LLM-cls)                    (EWC is in the optimizer, training/optim.py)

Text targets (condition texts, the report text) are embedded by the frozen base LLM without
LoRA (mean over the tokens of hidden layer `whiten.layer`) and whitened with the PCA fitted by
`kervljepa_jax.whiten`; they are constants of the step (stop_gradient). Neither the frozen LLM nor
a record's condition texts and class-ordered findings text change within a run, so the trainer
embeds them once per record (training/text_targets.py) and the batches carry them (target_embedding,
condition_embedding); a batch without them is embedded here, with the same result.
Decision the paper leaves open: the focal loss of eq. 12-13 is on the LLM-visual classifier's
logits (the only classification head that LoRA, the one trainable part of phase 4, can move);
LLM-cls is the pos-weighted BCE on the same logits.

The step differentiates only the trainable half of the params (training/phases.split_params);
frozen weights enter as an argument, cost no weight gradient and hold no optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kervljepa_jax import losses
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import phases
from kervljepa_jax.training.config import OverrideError

Array = jax.Array

# Positions per LM-head chunk (losses.lm_loss_from_hidden, lm_loss_frozen_head); bounds the 3B
# head's live logits to [B, 32, V]. With the frozen head's closed-form gradient, 16 and 32 took the
# same time on 2 CPU cores for the 8 x 512, vocabulary-32000 phase-3 head and 64 15% longer: a row's
# last chunk runs whole, so the larger the chunk the more positions past the last target it computes.
LM_CHUNK = 32


def _head_leaf(llm: llama_lib.LlamaConfig, params: Any) -> Any:
    """The LM head's leaf in a VLM param tree: the tied embedding [V, D] or lm_head/kernel [D, V]."""
    if llm.tie_word_embeddings:
        return params["llm"]["model"]["embed_tokens"]["weight"]
    return params["llm"]["lm_head"]["kernel"]


def head_weight(llm: llama_lib.LlamaConfig, params: Any) -> Array:
    """The LM head as [V, D] (a row per logit)."""
    leaf = _head_leaf(llm, params)
    return leaf if llm.tie_word_embeddings else leaf.T


def head_is_frozen(llm: llama_lib.LlamaConfig, trainable: Any) -> bool:
    """Whether the trainable half of split params (training/phases.split_params) leaves the LM head out."""
    try:
        return isinstance(_head_leaf(llm, trainable), optax.MaskedNode)
    except (KeyError, TypeError):         # a tree without the VLM's layout: take the general path
        return False


def _chunk_nll_and_grad(h: Array, w: Array, y: Array, m: Array, dtype) -> tuple[Array, Array]:
    """sum(m * nll(h w^T, y)) of one chunk h [B, c, D] and its gradient w.r.t. h, in closed form:
    d nll / d logits = softmax - one_hot, so one head matmul forward and one back."""
    logits = (h.astype(dtype) @ w.astype(dtype).T).astype(jnp.float32)       # as Llama.logits
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)
    nll = lse[..., 0] - jnp.sum(logits * one_hot, axis=-1)
    d_logits = (jnp.exp(logits - lse) - one_hot) * m[..., None]
    return jnp.sum(nll * m), (d_logits.astype(dtype) @ w.astype(dtype)).astype(h.dtype)


def _lm_loss_and_grad(hidden: Array, w: Array, tokens: Array, loss_mask: Array, dtype, chunk: int):
    """(loss, d loss / d hidden) of `lm_loss_frozen_head`, chunk by chunk over the target-first order."""
    targets, mask = losses._next_token_targets(tokens, loss_mask)
    b, t, d = hidden.shape
    # Each row's targets first (stable: in order), then padded to whole chunks with index t, out of
    # range: gathered as zeros (no target), and dropped when the gradient is scattered back.
    index = jnp.pad(jnp.argsort(mask == 0, axis=1, stable=True), [(0, 0), (0, (-t) % chunk)], constant_values=t)

    def chunked(x: Array) -> Array:  # [B, T, ...] -> [n, B, chunk, ...] in the target-first order
        x = jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1, mode="fill",
                                fill_value=0)
        return jnp.swapaxes(x.reshape(b, -1, chunk, *x.shape[2:]), 0, 1)

    def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        h, y, m = xs
        skip = lambda h, y, m: (jnp.zeros((), jnp.float32), jnp.zeros_like(h))  # noqa: E731
        run = lambda h, y, m: _chunk_nll_and_grad(h, w, y, m, dtype)  # noqa: E731
        nll, grad = jax.lax.cond(jnp.any(m > 0), run, skip, h, y, m)
        return total + nll, grad

    total, grads = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunked(hidden), chunked(targets), chunked(mask)))
    grads = jnp.zeros_like(hidden).at[jnp.arange(b)[:, None], index].set(
        jnp.swapaxes(grads, 0, 1).reshape(b, -1, d), mode="drop")                          # back to token order
    count = jnp.maximum(mask.sum(), 1.0)
    return total / count, (grads / count).astype(hidden.dtype)     # a bf16 model's cotangent is bf16


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lm_loss_frozen_head(hidden: Array, w: Array, tokens: Array, loss_mask: Array, dtype, chunk: int) -> Array:
    """losses.lm_loss_from_hidden(hidden, tokens, loss_mask, h -> h w^T, chunk) for a head weight
    w [V, D] that is not trained: same value, same gradient w.r.t. hidden, and none w.r.t. w.

    Why: lm_loss_from_hidden recomputes each chunk's logits in the backward pass (to keep one
    chunk's [B, c, V] live), so its head costs three [c, D] x [D, V] matmuls a chunk. Here the
    forward pass also forms the chunk's hidden-state gradient (softmax - one_hot) w, which is all a
    frozen head needs: two matmuls, and the stored residual is [B, T, D], not logits. In the
    phase-3 step of benchmarks/train_step_vs_torch.py (8 x 512 decoder, vocabulary 32000) the head
    went from 201 to 117 of the step's ~436 GFLOP (docs/performance.md).
    """
    return _lm_loss_and_grad(hidden, w, tokens, loss_mask, dtype, chunk)[0]


def _lm_loss_fwd(hidden, w, tokens, loss_mask, dtype, chunk):
    loss, grad = _lm_loss_and_grad(hidden, w, tokens, loss_mask, dtype, chunk)
    return loss, (grad, w, tokens, loss_mask)


def _lm_loss_bwd(dtype, chunk, res, g):
    grad, w, tokens, loss_mask = res
    # w, tokens, loss_mask get zero cotangents: the callers differentiate none of them (a trained
    # head goes through losses.lm_loss_from_hidden instead, phase_losses).
    return ((g * grad).astype(grad.dtype), jnp.zeros_like(w), None, None)


lm_loss_frozen_head.defvjp(_lm_loss_fwd, _lm_loss_bwd)


def base_llm_params(params: Any) -> Any:
    """The LLM's params without LoRA tensors (the frozen text encoder)."""
    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in ("lora_A", "lora_B")}
        return tree
    return strip(params["llm"])


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """Mean-pooled hidden states of one LLM layer, optionally whitened: texts -> [M, D_w]."""

    llm: llama_lib.LlamaConfig
    layer: int

    def __call__(self, llm_params: Any, ids: Array, mask: Array, whitening: dict[str, Array] | None) -> Array:
        model = llama_lib.Llama(self.llm.replace(lora=None))
        hidden = model.apply({"params": llm_params}, ids, attention_mask=mask, output_hidden_states=True,
                             return_logits=False).hidden_states[self.layer]
        weights = mask.astype(jnp.float32)[..., None]
        pooled = (hidden.astype(jnp.float32) * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1.0)
        if whitening is None:
            return pooled
        return (pooled - whitening["mean"]) @ whitening["projection"]


def _texts(encoder: TextEncoder, params: Any, ids: Array, mask: Array, whitening) -> Array:
    flat = encoder(base_llm_params(params), ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]),
                   whitening)
    return jax.lax.stop_gradient(flat.reshape(*ids.shape[:-1], flat.shape[-1]))


def condition_targets(encoder: TextEncoder, params: Any, batch: dict[str, Array], whitening) -> Array:
    """[B, C, D_w] per-condition text embeddings: the batch's cached ones, else embedded here."""
    if "condition_embedding" in batch:
        return batch["condition_embedding"]
    return _texts(encoder, params, batch["condition_ids"], condition_mask(batch), whitening)


def report_targets(encoder: TextEncoder, params: Any, batch: dict[str, Array], whitening) -> Array:
    """[B, D_w] embeddings of the positive-findings texts: the batch's cached ones, else embedded here."""
    if "target_embedding" in batch:
        return batch["target_embedding"]
    return _texts(encoder, params, batch["target_ids"], batch["target_mask"], whitening)


def condition_mask(batch: dict[str, Array]) -> Array:
    """[B, C, Tc] token mask of the per-condition texts."""
    tc = batch["condition_ids"].shape[-1]
    return jnp.arange(tc) < batch["condition_lengths"][..., None]


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a loss term reads: the forward pass's outputs, the batch, the step's constants."""

    model: vlm_lib.VLM
    encoder: TextEncoder
    variables: dict
    out: vlm_lib.VLMOutput
    batch: dict[str, Array]
    consts: dict[str, Any]
    head_frozen: bool

    @property
    def labels(self) -> Array:
        return self.batch["labels"].astype(jnp.float32)

    def conditions(self) -> Array:
        return condition_targets(self.encoder, self.variables["params"], self.batch, self.consts["whitening"])

    def report(self) -> Array:
        return report_targets(self.encoder, self.variables["params"], self.batch, self.consts["whitening"])


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One named loss term (unweighted); `reads_llm`: it needs the decoder's forward pass (the
    response tokens' hidden states), not only the visual path."""

    compute: Callable[[TermInputs], Array]
    reads_llm: bool = False
    reads_text: bool = False        # the frozen LLM's text targets (TermInputs.conditions / .report)


# Every loss term by the name config.loss_weights gives it (paper eq. 9-13).
LOSS_REGISTRY: dict[str, LossTerm] = {
    "bce": LossTerm(lambda x: losses.bce_with_logits(x.out.visual.cls_logits, x.labels, x.consts["pos_weight"])),
    "mil": LossTerm(lambda x: losses.bce_with_logits(x.out.visual.mil_logits, x.labels, x.consts["pos_weight"])),
    "orth": LossTerm(lambda x: losses.orthogonality_loss(x.out.visual.tokens)),
    "mmd": LossTerm(lambda x: losses.mmd_imq_loss(x.out.visual.z_tokens, x.conditions(), x.batch["condition_valid"]),
                    reads_text=True),
    "infonce": LossTerm(lambda x: losses.info_nce_loss(x.out.visual.z_visual, x.report(),
                                                       x.variables["params"]["log_temperature"]),
                        reads_text=True),
    "jepa": LossTerm(lambda x: losses.jepa_loss(x.out.visual.z_visual, x.report()), reads_text=True),
    "lm": LossTerm(lambda x: lm_term(x.model, x.variables, x.out.hidden, x.batch, x.head_frozen), reads_llm=True),
    "focal": LossTerm(lambda x: losses.focal_loss(x.out.llm_cls_logits, x.labels), reads_llm=True),
    "llm_cls": LossTerm(lambda x: losses.llm_visual_cls_loss(x.out.llm_cls_logits, x.labels, x.consts["pos_weight"]),
                        reads_llm=True),
}

# The terms each phase's config must weigh (0 turns one off): the paper's, and the ones its batches
# can feed (phases 1-2 carry no chat tokens, so no term that reads the decoder).
LOSS_TERMS = {1: ("bce", "mil", "orth", "mmd"), 2: ("mmd", "infonce"), 3: ("lm", "focal", "jepa", "llm_cls"),
              4: ("lm", "focal")}


def reads_text_targets(phase: int, weights: dict[str, float]) -> bool:
    """Whether a weighted term of `phase` reads the text targets: else its batches need no
    `TextTable` (the default phases 3-4 train on the LM loss alone) and none is embedded."""
    return any(LOSS_REGISTRY[n].reads_text for n in LOSS_TERMS[phase] if float(weights.get(n, 0.0)) != 0.0)


def phase_losses(phase: int, model: vlm_lib.VLM, encoder: TextEncoder, params: Any, calibration: Any,
                 batch: dict[str, Array], rng: Array, consts: dict[str, Any],
                 weights: dict[str, float] | None = None, head_frozen: bool = False) -> dict[str, Array]:
    """The named loss terms of `phase` (unweighted) that have a non-zero weight in `weights` (all
    when None), computed from one forward pass: a term weighted 0 is not computed, so it costs
    nothing and a NaN in it cannot make the step non-finite (0 * NaN = NaN); the decoder runs only
    when a computed term reads it. head_frozen: the LM head is not differentiated, so the LM term
    may take `lm_loss_frozen_head` (the same loss, a third fewer head FLOPs in the gradient)."""
    names = [n for n in LOSS_TERMS[phase] if weights is None or float(weights.get(n, 0.0)) != 0.0]
    variables = {"params": params, "calibration": calibration}
    rngs = {"dropout": rng}
    # A batch of a frozen-compressor phase may carry V' itself (feature_cache.compressor_tokens).
    cached = batch.get("visual_tokens")
    if any(LOSS_REGISTRY[n].reads_llm for n in names):
        out = model.apply(variables, batch["slices"], batch["z_mm"], batch["valid"], batch["input_ids"],
                          batch["attention_mask"], batch["loss_mask"], rngs=rngs, return_logits=False,
                          visual_tokens=cached)
    else:
        out = model.apply(variables, batch["slices"], batch["z_mm"], batch["valid"], rngs=rngs,
                          visual_tokens=cached)
    inputs = TermInputs(model, encoder, variables, out, batch, consts, head_frozen)
    return {n: LOSS_REGISTRY[n].compute(inputs) for n in names}


def lm_term(model: vlm_lib.VLM, variables: dict, hidden: Array, batch: dict[str, Array], head_frozen: bool) -> Array:
    """The LM loss of the last hidden states on the batch's response tokens (`loss_mask`)."""
    if head_frozen:
        return lm_loss_frozen_head(hidden, head_weight(model.cfg.llm, variables["params"]), batch["input_ids"],
                                   batch["loss_mask"], model.cfg.llm.jnp_dtype, LM_CHUNK)
    head = lambda h: model.apply(variables, h, method=vlm_lib.VLM.token_logits)  # noqa: E731
    return losses.lm_loss_from_hidden(hidden, batch["input_ids"], batch["loss_mask"], head, LM_CHUNK)


def _missing_weights(phase: int | None, names, weights: dict[str, float]) -> None:
    missing = [k for k in names if k not in weights]
    if missing:   # a config file without the weight: no --config.loss_weights.<name> flag can add it
        raise OverrideError(f"the phase {phase if phase is not None else '?'} config has no loss_weights for "
                            f"{missing}; add loss_weights.<name> to the --config file (0 turns a term off)")


def check_loss_weights(phase: int, weights: dict[str, float]) -> None:
    """OverrideError naming the terms of `phase` that `weights` lacks, or a weighted term the phase
    cannot compute (it would be dropped silently): raised when a step is built, before its
    compilation, rather than while it is traced."""
    _missing_weights(phase, LOSS_TERMS[phase], weights)
    foreign = [k for k, w in weights.items() if k not in LOSS_TERMS[phase] and float(w) != 0.0]
    if foreign:
        raise OverrideError(f"phase {phase}: loss_weights {foreign} name no term of this phase (its terms: "
                            f"{', '.join(LOSS_TERMS[phase])}); set them to 0 or remove them from the --config file")
    if all(float(weights[k]) == 0.0 for k in LOSS_TERMS[phase]):
        raise OverrideError(f"phase {phase}: every loss weight is 0 ({', '.join(LOSS_TERMS[phase])}); the phase "
                            "would train nothing: set --config.loss_weights.<name> > 0 for one of them")


def weighted_total(terms: dict[str, Array], weights: dict[str, float], phase: int | None = None) -> Array:
    _missing_weights(phase, terms, weights)
    return sum(weights[k] * v for k, v in terms.items())


def make_train_step(phase: int, model: vlm_lib.VLM, encoder: TextEncoder, tx: optax.GradientTransformation,
                    weights: dict[str, float]) -> Callable:
    """(trainable, frozen, opt_state, calibration, batch, rng, consts) -> (trainable, opt_state, metrics)."""
    check_loss_weights(phase, weights)

    def step(trainable, frozen, opt_state, calibration, batch, rng, consts):
        head_frozen = head_is_frozen(model.cfg.llm, trainable)

        def loss_fn(t):
            terms = phase_losses(phase, model, encoder, phases.merge_params(t, frozen), calibration, batch, rng,
                                 consts, weights, head_frozen)
            return weighted_total(terms, weights, phase), terms
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **terms}
        return trainable, opt_state, metrics

    return step


def make_eval_step(phase: int, model: vlm_lib.VLM, encoder: TextEncoder, weights: dict[str, float]) -> Callable:
    """(params, calibration, batch, consts) -> metrics (+ visual-classifier logits for phase 1 F1)."""
    check_loss_weights(phase, weights)

    def step(params, calibration, batch, consts):
        terms = phase_losses(phase, model, encoder, params, calibration, batch, jax.random.key(0), consts, weights)
        return {"loss": weighted_total(terms, weights, phase), **terms}

    return step
