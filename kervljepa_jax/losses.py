"""Every training loss of the four-phase curriculum (paper III-C), as pure jnp functions.

Phase 1 (eq. 9):  1.5 BCE(pos_weight) + 1.0 MIL + 1.0 orthogonality + 0.5 MMD-IMQ
Phase 2 (eq. 11): InfoNCE v->t with a learned temperature (+ MMD)
Phase 3 (eq. 12): LM + focal(gamma 2) + JEPA + 3.0 LLM-visual classification
Phase 4 (eq. 13): LM + focal + EWC, 100 * sum (theta_LoRA - theta_P3)^2

The lambdas live in the phase configs; every function here returns an unweighted scalar.
Classification losses take logits (never probabilities) and reduce in float32, whatever
the input dtype, so that bf16 activations cannot underflow a log.

Data parallelism: the batch is one global array sharded over the mesh's (data, fsdp) axes,
so every reduction here (the [B, B] InfoNCE similarity, the LM token mean) is already a
reduction over every device's samples when called inside `jax.jit`; there is no per-device
loss to all-gather.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# ---------------------------------------------------------------------------------------
# Classification (phase 1 BCE, MIL; phase 3 LLM-visual classifier)
# ---------------------------------------------------------------------------------------

MAX_POS_WEIGHT = 10.0


def pos_weight_from_labels(labels: Array, max_weight: float = MAX_POS_WEIGHT) -> Array:
    """Per-class positive weight w_c = min(n_neg / n_pos, max_weight) (paper III-C1).

    labels: [N, C] multi-hot (0/1) over the training set -> [C] float32.
    A class with no positive example (n_pos = 0) gets `max_weight`, the cap the ratio tends
    to as n_pos -> 0 (not inf, not NaN). A class positive in every sample gets 0: its
    positive term then carries no weight, which is what the formula gives.
    """
    labels = jnp.asarray(labels, jnp.float32)
    if labels.ndim != 2:
        raise ValueError(f"pos_weight_from_labels: labels must be [N, C] multi-hot, got shape {labels.shape}")
    n_pos = labels.sum(axis=0)
    n_neg = labels.shape[0] - n_pos
    ratio = n_neg / jnp.maximum(n_pos, 1.0)
    return jnp.where(n_pos > 0, jnp.minimum(ratio, max_weight), max_weight)


def bce_with_logits(logits: Array, labels: Array, pos_weight: Array | None = None) -> Array:
    """Mean binary cross-entropy on logits, torch.nn.BCEWithLogitsLoss(pos_weight=...) semantics.

    logits, labels: [..., C]; pos_weight: [C] or None.
    loss = -[pos_weight * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))], mean over all elements.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x): stable for any |x|.
    pos_term = labels * jax.nn.softplus(-logits)
    if pos_weight is not None:
        pos_term = pos_term * jnp.asarray(pos_weight, jnp.float32)
    neg_term = (1.0 - labels) * jax.nn.softplus(logits)
    return jnp.mean(pos_term + neg_term)


def llm_visual_cls_loss(logits: Array, labels: Array, pos_weight: Array | None = None) -> Array:
    """Phase 3 LLM-visual classification loss: BCE on the classifier over last-layer hidden states.

    logits, labels: [B, C]. The paper's weight lambda_vcls = 3.0 is applied by the phase config.
    """
    return bce_with_logits(logits, labels, pos_weight)


def focal_loss(logits: Array, labels: Array, gamma: float = 2.0) -> Array:
    """Binary multi-label focal loss on logits, -(1 - p_t)^gamma log p_t (paper eq. 12, gamma 2),
    mean over all elements: `optax.losses.sigmoid_focal_loss` without alpha (the paper gives none).

    logits, labels: [..., C]; p_t = p where y = 1 and 1 - p where y = 0 (soft labels interpolate).
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    return jnp.mean(optax.losses.sigmoid_focal_loss(logits, labels, gamma=gamma))


# ---------------------------------------------------------------------------------------
# Visual token regularisers (phase 1)
# ---------------------------------------------------------------------------------------

def _l2_normalize(x: Array, eps: float = 1e-8) -> Array:
    # eps inside the sqrt keeps the gradient finite for an all-zero vector.
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def orthogonality_loss(tokens: Array) -> Array:
    """Mean squared off-diagonal cosine between a sample's tokens, [B, K, D] -> scalar.

    G = T_hat T_hat^T with unit-norm tokens; loss = mean_b sum_{i != j} G_ij^2 / (K (K - 1)).
    0 when the K tokens are mutually orthogonal, 1 when they are all parallel.
    """
    tokens = _l2_normalize(jnp.asarray(tokens, jnp.float32))
    k = tokens.shape[-2]
    if k < 2:
        raise ValueError(f"orthogonality_loss: need at least 2 tokens per sample, got tokens of shape {tokens.shape}")
    gram = jnp.einsum("bkd,bld->bkl", tokens, tokens)
    off_diagonal = gram * (1.0 - jnp.eye(k, dtype=gram.dtype))
    return jnp.mean(jnp.sum(off_diagonal ** 2, axis=(-2, -1)) / (k * (k - 1)))


def imq_alpha(gamma: float = 5.0, dim: int = 256) -> float:
    """IMQ kernel scale a = 4 gamma / (2 D - 3) (paper III-C1: gamma 5, D 256 -> 0.0393)."""
    return 4.0 * gamma / (2.0 * dim - 3.0)


def _imq_kernel(x: Array, y: Array, alpha: float) -> Array:
    """k(x, y) = (1 + a ||x - y||^2)^(-1/2) for all pairs, x [B, N, D], y [B, M, D] -> [B, N, M]."""
    sq = (jnp.sum(x * x, -1)[:, :, None] + jnp.sum(y * y, -1)[:, None, :]
          - 2.0 * jnp.einsum("bnd,bmd->bnm", x, y))
    # The expanded form can dip below 0 by rounding; no sqrt is taken, so the clamp is all we need.
    return jax.lax.rsqrt(1.0 + alpha * jnp.maximum(sq, 0.0))


def mmd_imq_loss(visual: Array, text: Array, text_mask: Array, gamma: float = 5.0,
                 dim: int | None = None) -> Array:
    """Per-condition MMD with the IMQ kernel (paper eq. 10), averaged over samples with K > 0.

    visual: [B, N, D] a sample's visual tokens (N = 32) in the whitened space;
    text: [B, Kmax, D] its positive-condition text embeddings, padded; text_mask: [B, Kmax]
    (1 = real). Per sample, the biased V-statistic
        E k(v, v') - 2 E k(v, t) + E k(t, t')
    with every expectation over all pairs (diagonals included). Normal samples (K = 0)
    contribute nothing; the result is the mean over samples with K > 0, and 0 (with zero,
    finite gradients) when no sample has one. dim: D in a = 4 gamma / (2D - 3), default the
    feature size.
    """
    visual = jnp.asarray(visual, jnp.float32)
    text = jnp.asarray(text, jnp.float32)
    mask = jnp.asarray(text_mask, jnp.float32)
    if visual.ndim != 3 or text.ndim != 3 or mask.shape != text.shape[:2] or visual.shape[-1] != text.shape[-1]:
        raise ValueError(f"mmd_imq_loss: want visual [B,N,D], text [B,K,D], text_mask [B,K]; got "
                         f"{visual.shape}, {text.shape}, {mask.shape}")
    alpha = imq_alpha(gamma, dim if dim is not None else visual.shape[-1])
    n_text = mask.sum(-1)  # [B]
    safe_n = jnp.maximum(n_text, 1.0)
    k_vv = jnp.mean(_imq_kernel(visual, visual, alpha), axis=(-2, -1))
    k_vt = jnp.sum(jnp.mean(_imq_kernel(visual, text, alpha), axis=-2) * mask, -1) / safe_n
    pair_mask = mask[:, :, None] * mask[:, None, :]
    k_tt = jnp.sum(_imq_kernel(text, text, alpha) * pair_mask, axis=(-2, -1)) / safe_n ** 2
    per_sample = k_vv - 2.0 * k_vt + k_tt
    has_text = (n_text > 0).astype(jnp.float32)
    return jnp.sum(per_sample * has_text) / jnp.maximum(has_text.sum(), 1.0)


# ---------------------------------------------------------------------------------------
# Contrastive (phase 2)
# ---------------------------------------------------------------------------------------

TAU_INIT = 0.10
# tau is clamped to [0.01, 1]: 0.01 is CLIP's cap on its logit scale (100), 1 keeps the
# softmax from going flat; outside the range the gradient w.r.t. log tau is 0.
TAU_MIN, TAU_MAX = 0.01, 1.0


def init_log_temperature(tau: float = TAU_INIT) -> Array:
    """The learned parameter: log tau (a float32 scalar), initialised to log 0.10."""
    return jnp.asarray(math.log(tau), jnp.float32)


def temperature(log_tau: Array) -> Array:
    """tau = exp(clip(log tau, log 0.01, log 1))."""
    return jnp.exp(jnp.clip(log_tau, math.log(TAU_MIN), math.log(TAU_MAX)))


def info_nce_loss(z_visual: Array, z_text: Array, log_tau: Array, symmetric: bool = False) -> Array:
    """InfoNCE with cosine similarity and a learned temperature (paper eq. 11).

    z_visual, z_text: [B, D], row i of each is a positive pair, every other row a negative.
    Default: visual -> text only, as eq. 11 (softmax over the texts for each scan);
    symmetric=True averages it with text -> visual (CLIP). Called inside jit on a batch
    sharded over (data, fsdp), B is the global batch: the [B, B] similarity holds every
    device's samples, which is the paper's cross-GPU negatives (8 x 64 = 512).
    """
    if z_visual.ndim != 2 or z_visual.shape != z_text.shape:
        raise ValueError(f"info_nce_loss: want z_visual and z_text both [B, D]; got {z_visual.shape}, {z_text.shape}")
    v = _l2_normalize(jnp.asarray(z_visual, jnp.float32))
    t = _l2_normalize(jnp.asarray(z_text, jnp.float32))
    logits = (v @ t.T) / temperature(log_tau)  # [B, B], rows = scans, columns = texts
    v_to_t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
    if not symmetric:
        return v_to_t
    t_to_v = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (v_to_t + t_to_v)


# ---------------------------------------------------------------------------------------
# Generation (phases 3, 4)
# ---------------------------------------------------------------------------------------

def lm_loss(logits: Array, tokens: Array, loss_mask: Array) -> Array:
    """Next-token cross-entropy over the assistant tokens.

    logits: [B, T, V] from the decoder on `tokens` [B, T]; loss_mask: [B, T], 1 where the
    token at that position is a target (assistant response tokens), indexed like `tokens`.
    Shift convention (HF's): logits[:, t] predicts tokens[:, t + 1], so the loss is over
    t + 1 = 1 .. T - 1 and loss_mask[:, 0] is never used. Mean over all target tokens of the
    (global) batch; 0 when there is none.
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2] or loss_mask.shape != tokens.shape:
        raise ValueError(f"lm_loss: want logits [B,T,V], tokens [B,T], loss_mask [B,T]; got "
                         f"{logits.shape}, {tokens.shape}, {loss_mask.shape}")
    targets, mask = _next_token_targets(tokens, loss_mask)
    return jnp.sum(_token_nll(logits, targets) * mask) / jnp.maximum(mask.sum(), 1.0)


def _next_token_targets(tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """tokens, loss_mask [B, T] -> (targets [B, T], float mask [B, T]) aligned with the logits:
    position t predicts tokens[t + 1]. Shift the targets, not the logits: no [B, T-1, V] copy of
    the largest activation."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    return targets, mask


def _token_nll(logits: Array, targets: Array) -> Array:
    """logits [..., V], targets [...] -> -log softmax(logits)[target], float32 [...]."""
    logits = logits.astype(jnp.float32)
    # one-hot product instead of a gather: elementwise + reduce stays local when the vocab
    # axis is sharded over `tensor`, and XLA fuses it without materialising the one-hot.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def lm_loss_from_hidden(hidden: Array, tokens: Array, loss_mask: Array, logits_fn: Callable[[Array], Array],
                        chunk: int = 32) -> Array:
    """`lm_loss(logits_fn(hidden), tokens, loss_mask)` without the logits of positions that are no target.

    hidden: [B, T, D] last hidden states; logits_fn: [B, c, D] -> [B, c, V] (the LM head).
    The targets are ~40% of a phase-3 batch (prompt, visual slots and padding are not), and the
    head (+ its softmax) is the largest single cost of the tiny decoder's step and the largest
    activation of the 3B one ([B, T, 128256] float32). So each row's target positions are moved to
    its front (a stable sort keeps their order), the positions are cut into chunks of `chunk`, and
    a chunk where no row of the batch has a target is skipped (`lax.cond`, forward and backward).
    Each chunk's logits are recomputed in the backward pass instead of stored: peak memory is one
    chunk's [B, chunk, V]. Rows stay whole, so a batch sharded over data-parallel devices stays so.
    """
    if hidden.ndim != 3 or tokens.shape != hidden.shape[:2] or loss_mask.shape != tokens.shape or chunk < 1:
        raise ValueError(f"lm_loss_from_hidden: want hidden [B,T,D], tokens [B,T], loss_mask [B,T], chunk >= 1; "
                         f"got {hidden.shape}, {tokens.shape}, {loss_mask.shape}, chunk={chunk}")
    targets, mask = _next_token_targets(tokens, loss_mask)
    b, t, d = hidden.shape
    order = jnp.argsort(mask == 0, axis=1, stable=True)                 # [B, T] targets first, in order
    pad = (-t) % chunk

    def chunked(x: Array) -> Array:  # [B, T, ...] -> [T/chunk, B, chunk, ...], padded with non-targets
        x = jnp.take_along_axis(x, order.reshape(b, t, *([1] * (x.ndim - 2))), axis=1)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(b, (t + pad) // chunk, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_nll_sum(h: Array, y: Array, m: Array) -> Array:
        return jnp.sum(_token_nll(logits_fn(h), y) * m)

    def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
        h, y, m = xs
        skip = lambda h, y, m: jnp.zeros((), jnp.float32)  # noqa: E731
        return total + jax.lax.cond(jnp.any(m > 0), chunk_nll_sum, skip, h, y, m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunked(hidden), chunked(targets), chunked(mask)))
    return total / jnp.maximum(mask.sum(), 1.0)


def jepa_loss(z_visual: Array, target: Array) -> Array:
    """JEPA embedding prediction loss: per-dimension MSE of z_v [B, 256] to the whitened report
    embedding [B, 256], mean over batch and dimensions.

    The paper names the loss (eq. 12) but gives no formula; MSE is chosen because the target
    space is whitened: every coordinate has unit variance, so predicting the mean scores 1.0
    and the loss reads as 1 - R^2; it also pins the norm, which the MMD (Euclidean IMQ
    kernel in the same space) relies on and a cosine loss would leave free.
    """
    if z_visual.shape != target.shape:
        raise ValueError(f"jepa_loss: z_visual {z_visual.shape} and target {target.shape} must match")
    diff = jnp.asarray(z_visual, jnp.float32) - jnp.asarray(target, jnp.float32)
    return jnp.mean(diff * diff)


# ---------------------------------------------------------------------------------------
# EWC (phase 4)
# ---------------------------------------------------------------------------------------

EWC_LAMBDA = 100.0


def ewc_penalty(params: Any, anchor: Any, lam: float = EWC_LAMBDA) -> Array:
    """lam * sum_i (theta_i - theta_i^P3)^2 over every leaf of two same-structure pytrees (eq. 13)."""
    sq = jax.tree.map(lambda p, a: jnp.sum((jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32)) ** 2),
                      params, anchor)
    return lam * sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))


class EwcState(NamedTuple):
    anchor: Any  # theta^P3, the parameters the LoRA leaves are pulled back to


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def ewc_gradient(anchor_params: Any = None, lam: float = EWC_LAMBDA) -> optax.GradientTransformation:
    """EWC as a gradient transformation: updates += 2 lam (theta - theta_anchor) = grad of `ewc_penalty`.

    Chain it, masked to the LoRA leaves, before the global-norm clip and the optimizer (e.g.
    optax.chain(optax.masked(ewc_gradient(lam=100.), lora), clip, optax.adamw(...)), as
    training/optim.py does): the penalty is a term of the loss, so its gradient is clipped with the
    loss's. The anchor lives in the optimizer state, not in
    a closure: it is sharded and checkpointed like the other state, resumes correctly, and
    is not baked into the compiled step as a constant. With anchor_params=None, `init`
    takes the parameters it is given, which is "Phase 3 LoRA weights captured at training
    start"; pass anchor_params to pin another tree (same structure as the params, or a
    superset of it where the params are optax.MaskedNode).
    """

    def init_fn(params):
        source = params if anchor_params is None else anchor_params
        # Copy (and keep MaskedNodes where the params are masked) so the anchor never aliases params.
        anchor = jax.tree.map(lambda p, a: p if _is_masked(p) else jnp.array(a, copy=True),
                              params, source, is_leaf=_is_masked)
        return EwcState(anchor=anchor)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ewc_gradient: the optimizer's update() was called without params; "
                             "call tx.update(grads, opt_state, params)")

        def add_pull(u, p, a):
            if _is_masked(u) or u is None:
                return u
            pull = 2.0 * lam * (jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32))
            return (u + pull).astype(u.dtype)

        updates = jax.tree.map(add_pull, updates, params, state.anchor, is_leaf=_is_masked)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
