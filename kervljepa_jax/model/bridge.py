"""The bridge from visual tokens to the LLM and its auxiliary heads (paper III-B 2, III-B 4, III-C).

    V' [B, K, d_v]  --JEPAPredictor: LN(Linear(Dropout(V')))-->   V^ [B, K, d_llm]      (eq. 5)
    V^              --NormCalibrator: alpha * V^-->               V~ [B, K, d_llm]      (eq. 6)
    mean(V~) or V~  --JEPAHead: Linear2(GELU(LN(Linear1(.))))-->  z_v [B, 256] / [B, K, 256]  (eq. 8)
    V'              --VisualClassifier: mean / max over tokens--> logits [B, C], MIL logits [B, C]
    LLM hidden      --LLMVisualClassifier: response-masked mean--> logits [B, C]

Decisions the paper leaves open, fixed here (all configurable):

* alpha is not a trained weight: it lives in the "calibration" collection (never in "params", so
  no optimizer sees it). `calibrate_alpha` sets it at initialisation (phase 1) and the trainer
  sets it again on the current training batch every `calibration.every_steps` steps of a phase
  that trains the compressor or the predictor, the modules V^ is computed by (training/run.py
  `calibrate`; `with_alpha` writes it into a variables dict). Checkpoints carry it.
  `BridgeConfig.norm_calibration=False` (the Table XI ablation) fixes alpha at 1: the calibrator
  passes V^ through unchanged and `calibrated_alpha` returns 1 whatever the norms.
* The predictor's SVD initialisation (`svd_init_predictor_kernel`) maps the i-th visual principal
  direction onto the i-th text principal direction with the ratio of their standard deviations, then
  rescales the whole kernel to the Frobenius norm of the default init (LN follows, so only the
  geometry matters to the forward pass; the overall gain only sets the gradient scale).
* The JEPA head's hidden width (paper silent) defaults to 1024; GELU is the exact (erf) one, as
  torch.nn.GELU's default. The classifiers are single linear layers (a linear probe on mean-pooled
  tokens is how the paper measures them, V-A); the MIL twin shares the visual classifier's weights.
* LayerNorms use eps 1e-5 (torch's default) and exact two-pass variance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kervljepa_jax.findings import NUM_CLASSES
from kervljepa_jax.model.dropout import Dropout
from kervljepa_jax.sharding import constrain

CALIBRATION = "calibration"  # the flax collection holding alpha


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """Sizes of the predictor and heads; defaults are the paper's 3B setup."""

    d_visual: int = 1024
    d_llm: int = 3072
    predictor_dropout: float = 0.1
    jepa_hidden: int = 1024
    jepa_dim: int = 256
    num_classes: int = NUM_CLASSES
    # False: alpha fixed at 1, V~ = V^ (no norm calibration: the component ablation of Table XI).
    norm_calibration: bool = True
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        sizes = dict(d_visual=self.d_visual, d_llm=self.d_llm, jepa_hidden=self.jepa_hidden,
                     jepa_dim=self.jepa_dim, num_classes=self.num_classes)
        bad = {k: v for k, v in sizes.items() if v <= 0}
        if bad or not 0.0 <= self.predictor_dropout < 1.0:
            raise ValueError(f"bridge: sizes must be positive and 0 <= predictor_dropout < 1, got {bad or sizes}, "
                             f"predictor_dropout={self.predictor_dropout}")


def _torch_linear_init(fan_in: int, axes: tuple[str, ...]):
    """torch.nn.Linear's default, U(+-1/sqrt(fan_in)) for weight and bias, with logical axis names."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.with_logical_partitioning(init, axes)


def _dense(cfg: BridgeConfig, features: int, fan_in: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_torch_linear_init(fan_in, axes),
                    bias_init=_torch_linear_init(fan_in, (axes[1],)), name=name)


def _layer_norm(cfg: BridgeConfig, axis: str, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)), name=name)


def _check_last_dim(where: str, x: jax.Array, dim: int, what: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{where}: expected {what} with last dimension {dim}, got shape {x.shape}; "
                         "check BridgeConfig against the model sizes")


# ---------------------------------------------------------------------------------------
# Predictor and norm calibration
# ---------------------------------------------------------------------------------------

class JEPAPredictor(nn.Module):
    """`V' [B, K, d_v] -> V^ [B, K, d_llm]`: LN(Linear(Dropout(V'))) (eq. 5)."""

    config: BridgeConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        _check_last_dim("JEPAPredictor", tokens, cfg.d_visual, "compressor tokens V'")
        x = Dropout(cfg.predictor_dropout)(tokens, deterministic=deterministic)
        x = _dense(cfg, cfg.d_llm, cfg.d_visual, ("visual_embed", "embed"), "linear")(x)
        x = _layer_norm(cfg, "embed", "norm")(x)
        return constrain(x, ("batch", "zones", "act_embed"))


class NormCalibrator(nn.Module):
    """`V^ [..., d_llm] -> V~ = alpha * V^` with alpha in the non-trainable "calibration" collection;
    `enabled=False`: V~ = V^ (alpha still exists, so checkpoints keep one layout)."""

    init_alpha: float = 1.0
    enabled: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        alpha = self.variable(CALIBRATION, "alpha", lambda: jnp.asarray(self.init_alpha, jnp.float32))
        return tokens * alpha.value.astype(tokens.dtype) if self.enabled else tokens


def calibrated_alpha(text_norms: Any, visual_norms: Any, enabled: bool = True) -> float:
    """What the trainer sets alpha to: eq. 6 (`alpha_from_norms`), or 1 with calibration off."""
    return alpha_from_norms(text_norms, visual_norms) if enabled else 1.0


def calibrate_alpha(text_embeddings: Any, visual_tokens: Any) -> float:
    """alpha = mean ||e_text|| / mean ||V^|| (eq. 6), norms over the last axis of each.

    `text_embeddings [M, d_llm]` (rows of the LLM's input embedding table, or of embedded report
    tokens); `visual_tokens [..., d_llm]` predictor outputs V^ (before calibration).
    """
    text = np.asarray(text_embeddings, dtype=np.float64)
    visual = np.asarray(visual_tokens, dtype=np.float64)
    if text.ndim < 2 or visual.ndim < 2 or text.shape[-1] != visual.shape[-1] or not text.size or not visual.size:
        raise ValueError(f"calibrate_alpha: need text [M, D] and visual [..., D] with the same non-empty D, got "
                         f"{text.shape} and {visual.shape}")
    return alpha_from_norms(np.linalg.norm(text, axis=-1), np.linalg.norm(visual, axis=-1))


def alpha_from_norms(text_norms: Any, visual_norms: Any) -> float:
    """alpha = mean(text_norms) / mean(visual_norms): eq. 6 from the per-row norms ||e_text|| and
    ||V^|| (any shapes), so that a sharded V^ need not leave the devices, only its norms."""
    text, visual = np.asarray(text_norms, np.float64), np.asarray(visual_norms, np.float64)
    if not text.size or not visual.size:
        raise ValueError(f"calibrate_alpha: empty norms, text {text.shape}, visual {visual.shape}")
    if not (np.isfinite(text).all() and np.isfinite(visual).all()):
        raise ValueError("calibrate_alpha: NaN/inf in the embeddings; calibrate on a finite batch")
    visual_norm = visual.mean()
    if visual_norm <= 0.0:
        raise ValueError("calibrate_alpha: visual tokens have zero norm; the predictor output is degenerate")
    return float(text.mean() / visual_norm)


def with_alpha(variables: Mapping[str, Any], alpha: float, path: tuple[str, ...] = ()) -> dict:
    """A copy of `variables` with the calibration alpha at `path` (the calibrator's module path) set."""
    variables = dict(variables)
    calibration = jax.tree.map(lambda x: x, dict(variables.get(CALIBRATION, {})))
    node = calibration
    for name in path:
        node[name] = dict(node.get(name, {}))
        node = node[name]
    if "alpha" not in node:
        raise ValueError(f"with_alpha: no calibration alpha at {'/'.join(path) or '<root>'}; pass the "
                         "NormCalibrator's module path")
    node["alpha"] = jnp.asarray(alpha, jnp.float32)
    variables[CALIBRATION] = calibration
    return variables


def svd_init_predictor_kernel(text_embeddings: Any, visual: Any = None, *, d_visual: int | None = None) -> np.ndarray:
    """Predictor kernel `[d_v, d_llm]` from the principal components of text embeddings.

    `text_embeddings [M, d_llm]`; either a `visual` sample `[M', d_v]` of compressor tokens, or just
    `d_visual`. With a visual sample, visual principal direction i maps onto text principal direction
    i, scaled by sigma_text_i / sigma_visual_i (so each component's spread matches); with `d_visual`
    alone, input coordinate i maps onto text direction i with gain sigma_text_i. Components beyond
    the available rank map to zero. The kernel is finally rescaled to the Frobenius norm of the
    default U(+-1/sqrt(d_v)) init, sqrt(d_llm / 3): LN follows, so the geometry is what matters.
    """
    text = np.asarray(text_embeddings, dtype=np.float64)
    if text.ndim != 2 or text.shape[0] < 2:
        raise ValueError(f"svd_init_predictor_kernel: text_embeddings must be [M >= 2, d_llm], got {text.shape}")
    d_llm = text.shape[1]
    _, s_text, vt_text = np.linalg.svd(text - text.mean(0), full_matrices=False)
    if visual is not None:
        vis = np.asarray(visual, dtype=np.float64)
        if vis.ndim != 2 or vis.shape[0] < 2:
            raise ValueError(f"svd_init_predictor_kernel: visual must be [M' >= 2, d_v], got {vis.shape}")
        d_v = vis.shape[1]
        _, s_vis, vt_vis = np.linalg.svd(vis - vis.mean(0), full_matrices=False)
        sigma_text, sigma_vis = s_text / math.sqrt(text.shape[0] - 1), s_vis / math.sqrt(vis.shape[0] - 1)
        rank = int(min(len(sigma_text), len(sigma_vis), d_v, d_llm))
        gain = sigma_text[:rank] / np.maximum(sigma_vis[:rank], 1e-12)
        in_dirs = vt_vis[:rank]                                          # [r, d_v]
    elif d_visual is not None and d_visual > 0:
        d_v = int(d_visual)
        rank = int(min(len(s_text), d_v, d_llm))
        gain = s_text[:rank] / math.sqrt(text.shape[0] - 1)
        in_dirs = np.eye(d_v)[:rank]
    else:
        raise ValueError("svd_init_predictor_kernel: pass a visual sample [M', d_v] or d_visual")
    if rank < d_v:
        logging.warning("svd_init_predictor_kernel: only %d principal components for d_v=%d; the remaining "
                        "input directions start at zero", rank, d_v)
    kernel = in_dirs.T @ (gain[:, None] * vt_text[:rank])              # [d_v, d_llm]
    norm = np.linalg.norm(kernel)
    if not norm > 0:
        raise ValueError("svd_init_predictor_kernel: text embeddings have no variance; pass distinct texts")
    return (kernel * (math.sqrt(d_llm / 3.0) / norm)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------

class JEPAHead(nn.Module):
    """`[..., d_llm] -> [..., jepa_dim]`: Linear2(GELU(LN(Linear1(x)))) (eq. 8).

    Apply to mean(V~) [B, d_llm] for z_v, or to V~ [B, K, d_llm] for per-token embeddings (phase 1 MMD).
    """

    config: BridgeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        _check_last_dim("JEPAHead", x, cfg.d_llm, "calibrated visual tokens")
        x = _dense(cfg, cfg.jepa_hidden, cfg.d_llm, ("embed", "mlp"), "linear1")(x)
        x = nn.gelu(_layer_norm(cfg, "mlp", "norm")(x), approximate=False)
        return _dense(cfg, cfg.jepa_dim, cfg.jepa_hidden, ("mlp", "proj"), "linear2")(x)


class VisualClassifier(nn.Module):
    """`V' [B, K, d_v] -> (logits [B, C], mil_logits [B, C])`: one linear classifier applied to the
    mean over tokens and, for the MIL loss, to the max over tokens."""

    config: BridgeConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        _check_last_dim("VisualClassifier", tokens, cfg.d_visual, "compressor tokens V'")
        classify = _dense(cfg, cfg.num_classes, cfg.d_visual, ("visual_embed", "classes"), "linear")
        return classify(tokens.mean(axis=-2)), classify(tokens.max(axis=-2))


class LLMVisualClassifier(nn.Module):
    """`hidden [B, T, d_llm], response_mask [B, T] -> logits [B, C]` from last-layer LLM hidden states,
    mean-pooled over the response tokens (a row with no response token pools to zero)."""

    config: BridgeConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, response_mask: jax.Array) -> jax.Array:
        cfg = self.config
        _check_last_dim("LLMVisualClassifier", hidden, cfg.d_llm, "LLM hidden states")
        if response_mask.shape != hidden.shape[:2]:
            raise ValueError(f"LLMVisualClassifier: response_mask {response_mask.shape} must be the hidden "
                             f"states' [B, T] = {hidden.shape[:2]}")
        weights = response_mask.astype(jnp.float32)[..., None]
        pooled = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        return _dense(cfg, cfg.num_classes, cfg.d_llm, ("embed", "classes"), "linear")(pooled.astype(cfg.dtype))
