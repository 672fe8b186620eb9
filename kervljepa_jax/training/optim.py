"""The phase optimizer: one optax group per row of the phase's optimizer-group table
(`config.optimizer_groups`, training/phases.py), the EWC pull and the lr schedule in one chain.

    tx = make_optimizer(config, params, labels, steps_per_epoch)     # labels: phases.trainable_labels
    opt_state = tx.init(trainable)                                   # or tx.init(params): same state
    updates, opt_state = tx.update(grads, opt_state, trainable)

Structure (outside in):

    apply_if_finite                       a non-finite gradient skips the step and is counted
      chain(clip_by_global_norm,          over every trainable gradient; rows with ewc > 0 first get
                                          chain(masked(ewc_gradient(anchor, ewc), their leaves), clip)
            inject_hyperparams(           learning_rate = schedule(count), lr_scale (host-set)
              multi_transform({           over the optimizer label tree (`optimizer_labels`):
                frozen: set_to_zero()                                    no state
                "i":    adamw(lr * lr_scale)  [x clip(||w|| / ||g||, min, max) with a trust_ratio]
                                              [x lr_mult when it is not 1]    for table row i
              })))

EWC's gradient joins the loss's before the clip: the paper's phase-4 loss is LM + focal +
lam * sum (theta - theta_P3)^2 (eq. 13), and the clip applies to the gradient of that whole loss.
`lr_scale` lives in the optimizer state, so ReduceLROnPlateau (host side) changes it with
`set_lr_scale` between steps without recompiling, and it is checkpointed with the state. The
EWC anchor (theta_P3) is optimizer state too (losses.ewc_gradient).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kervljepa_jax import losses
from kervljepa_jax.training import phases
from kervljepa_jax.training.config import OverrideError

FROZEN = "frozen"


# ------------------------------------------------------------------------------------------------
# Labels and schedule
# ------------------------------------------------------------------------------------------------

def optimizer_labels(params: Any, labels: Any, table: Any) -> Any:
    """Refine the phase labels into optimizer groups: "frozen", or the index (a string) of the
    table row that holds a trainable leaf."""
    return jax.tree.map(lambda label, i: FROZEN if label == phases.FROZEN or i < 0 else str(i),
                        labels, phases.row_indices(labels, table))


def total_steps(train: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Optimizer steps in the phase: epochs x steps_per_epoch, capped by train.max_steps (0 = no cap)."""
    total = int(train.epochs) * int(steps_per_epoch)
    if train.max_steps:
        total = min(total, int(train.max_steps))
    return max(total, 1)


def make_schedule(train: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup to train.lr, then constant or cosine decay to lr * final_lr_fraction."""
    lr, total = float(train.lr), total_steps(train, steps_per_epoch)
    warmup = min(int(train.warmup_steps), total - 1) if total > 1 else 0
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total,
                                                  end_value=lr * float(train.final_lr_fraction))
    if train.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    raise OverrideError(f"--config.train.schedule={train.schedule!r}: use 'constant' or 'cosine'")


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------

def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def trust_ratio_scaled(inner: optax.GradientTransformation, min_scale: float = 1.0, max_scale: float = 30.0,
                       eps: float = 1e-12) -> optax.GradientTransformation:
    """LARS-like per-tensor lr multiplier: `inner`'s update x clip(||w|| / ||g||, min, max).

    The ratio uses the raw gradient g entering this transform (Adam would normalise a gradient
    scale away, so the multiplier is applied to the update). ||g|| = 0 gives the max, ||w|| = 0 the min.
    """

    def ratio(g, w):
        g_norm = jnp.linalg.norm(jnp.asarray(g, jnp.float32).ravel())
        w_norm = jnp.linalg.norm(jnp.asarray(w, jnp.float32).ravel())
        return jnp.clip(w_norm / jnp.maximum(g_norm, eps), min_scale, max_scale)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("trust_ratio_scaled: call tx.update(grads, opt_state, params)")
        ratios = jax.tree.map(ratio, updates, params)
        updates, state = inner.update(updates, state, params)
        return jax.tree.map(lambda u, r: (u * r).astype(u.dtype), updates, ratios), state

    return optax.GradientTransformation(inner.init, update_fn)


def _decay_mask(pattern: str):
    rx = re.compile(pattern)
    return lambda params: phases.map_with_path(lambda p, _: bool(rx.fullmatch(p)), params)


def _group_tx(row: dict, adamw) -> optax.GradientTransformation:
    tx = adamw()
    if row["trust_ratio"]:
        tx = trust_ratio_scaled(tx, *row["trust_ratio"])
    if row["lr_mult"] != 1.0:
        tx = optax.chain(tx, optax.scale(row["lr_mult"]))
    return tx


def _with_ewc(clip: optax.GradientTransformation, rows: list[dict], groups: Any,
              anchor: Any) -> optax.GradientTransformation:
    """EWC's pull on the leaves of each row with ewc > 0, added to the gradient before the clip
    (the penalty's gradient is part of the loss's, so it is clipped with it)."""
    for lam in sorted({row["ewc"] for row in rows if row["ewc"] > 0}):
        paths = {p for p, g in zip(phases.leaf_paths(groups), jax.tree.leaves(groups))
                 if g != FROZEN and rows[int(g)]["ewc"] == lam}
        on = lambda tree, paths=paths: phases.map_with_path(lambda p, _: p in paths, tree)  # noqa: E731
        clip = optax.chain(optax.masked(losses.ewc_gradient(anchor, lam), on), clip)
    return clip


def make_optimizer(config: ml_collections.ConfigDict, params: Any, labels: Any, steps_per_epoch: int,
                   anchor: Any = None) -> optax.GradientTransformation:
    """The phase's optimizer over `params` (full tree or the `split_params` trainable half).

    labels: phases.trainable_labels(params, config.optimizer_groups) (freeze_scheduled after a
    freeze). anchor: theta_P3 for EWC (a tree shaped like params; only its EWC rows' leaves are
    read); None = the values `init` is given.
    """
    train = config.train
    rows = phases.group_rows(config.optimizer_groups)
    groups = optimizer_labels(params, labels, rows)
    present = set(jax.tree.leaves(groups))
    if present <= {FROZEN}:
        raise OverrideError(f"--config.optimizer_groups: selects no parameter of phase {config.phase} to train; "
                            "name at least one (see kervljepa_jax/configs/phaseN.py)")
    decay_mask = _decay_mask(train.weight_decay_pattern)

    def factory(learning_rate, lr_scale):
        def adamw():
            return optax.adamw(learning_rate * lr_scale, b1=train.b1, b2=train.b2, eps=train.eps,
                               weight_decay=train.weight_decay, mask=decay_mask)

        txs = {FROZEN: optax.set_to_zero(), **{str(i): _group_tx(row, adamw) for i, row in enumerate(rows)}}
        return optax.multi_transform({g: tx for g, tx in txs.items() if g in present}, groups)

    # float32 hyperparameters (not weak-typed): a host-set lr_scale then matches the compiled step's type.
    scheduled = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
        learning_rate=make_schedule(train, steps_per_epoch), lr_scale=1.0)
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip else optax.identity()
    clip = _with_ewc(clip, rows, groups, anchor)
    return optax.apply_if_finite(optax.chain(clip, scheduled), int(train.max_consecutive_nonfinite))


# ------------------------------------------------------------------------------------------------
# State access (host side)
# ------------------------------------------------------------------------------------------------

def _hyper_state(opt_state: Any) -> Any:
    """The InjectHyperparamsState inside make_optimizer's state."""
    return opt_state.inner_state[1]


def _replace_hyper(opt_state: Any, hyper: Any) -> Any:
    clip_state, _ = opt_state.inner_state
    return opt_state._replace(inner_state=(clip_state, hyper))


def lr_scale(opt_state: Any) -> float:
    return float(_hyper_state(opt_state).hyperparams["lr_scale"])


def set_lr_scale(opt_state: Any, value: float) -> Any:
    """A new state with lr_scale = value (same dtype and sharding: no recompilation)."""
    hyper = _hyper_state(opt_state)
    old = hyper.hyperparams["lr_scale"]
    new = jnp.asarray(value, old.dtype)
    if isinstance(old, jax.Array) and old.committed:   # same placement, else jit would see a new input
        new = jax.device_put(new, old.sharding)
    return _replace_hyper(opt_state, hyper._replace(hyperparams={**hyper.hyperparams, "lr_scale": new}))


def learning_rate(opt_state: Any) -> float:
    """The lr of the last applied step: schedule value x lr_scale (what to log)."""
    hyper = _hyper_state(opt_state).hyperparams
    return float(hyper["learning_rate"]) * float(hyper["lr_scale"])


def skipped_steps(opt_state: Any) -> int:
    """Steps skipped so far because a gradient was not finite."""
    return int(opt_state.total_notfinite)


def consecutive_nonfinite(opt_state: Any) -> int:
    """Non-finite steps in a row up to the last one (0 after a finite step). Once it exceeds
    train.max_consecutive_nonfinite, apply_if_finite applies the next non-finite update."""
    return int(opt_state.notfinite_count)


def transfer_state(old_state: Any, new_tx: optax.GradientTransformation, params: Any) -> Any:
    """`new_tx.init(params)`, keeping the old state wherever it still applies.

    For a relabel inside a phase (a row's freeze_after_epoch: phase 3's LoRA after epoch 6): the step count, lr scale,
    skip counters, clip state and every optimizer group that exists in both keep their values;
    a group that became frozen loses its moments. The schedule keeps its place: optax's
    inject_hyperparams counts for a schedule in `hyperparams_states`, apart from `count`, and a
    fresh one there would restart the warmup and the decay mid-phase.
    """
    new_state = new_tx.init(params)
    old_hyper, new_hyper = _hyper_state(old_state), _hyper_state(new_state)
    old_groups, new_groups = old_hyper.inner_state.inner_states, dict(new_hyper.inner_state.inner_states)
    for group, state in old_groups.items():
        if group in new_groups and (jax.tree.structure(state) == jax.tree.structure(new_groups[group])):
            new_groups[group] = state
    inner = new_hyper.inner_state._replace(inner_states=new_groups)
    kept = dict(count=old_hyper.count, hyperparams=dict(old_hyper.hyperparams), inner_state=inner)
    if hasattr(old_hyper, "hyperparams_states"):
        kept["hyperparams_states"] = old_hyper.hyperparams_states
    hyper = new_hyper._replace(**kept)
    return new_state._replace(notfinite_count=old_state.notfinite_count, last_finite=old_state.last_finite,
                              total_notfinite=old_state.total_notfinite,
                              inner_state=(old_state.inner_state[0], hyper))


# ------------------------------------------------------------------------------------------------
# Host-side controllers: ReduceLROnPlateau, early stopping
# ------------------------------------------------------------------------------------------------

def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise OverrideError(f"--config.plateau.mode / early_stop.mode={mode!r}: use 'max' or 'min'")


def _improved(value: float, best: float | None, mode: str, threshold: float) -> bool:
    """torch's rel-threshold test (best starts at -inf / +inf): max: value > best (1 + t); min: value < best (1 - t)."""
    _check_mode(mode)
    if best is None:
        best = -math.inf if mode == "max" else math.inf
    return value > best * (1.0 + threshold) if mode == "max" else value < best * (1.0 - threshold)


# Not optax.contrib.reduce_on_plateau: that transform reads a loss inside every update (min mode
# only: negating F1 turns torch's max rule v > best (1 + t) into v > best (1 - t)), where this one
# is stepped by the host once per evaluation with validation generation F1.
@dataclasses.dataclass
class ReduceLROnPlateau:
    """torch.optim.lr_scheduler.ReduceLROnPlateau (rel threshold, no cooldown) on the lr scale.

    Call `step(metric)` once per evaluation; after more than `patience` evaluations without
    improvement the scale is multiplied by `factor` (the paper: gen F1, patience 3, x0.5). Then
    `opt_state = plateau.apply(opt_state)`. `state_dict()` goes into the checkpoint's JSON.
    """

    patience: int = 3
    factor: float = 0.5
    mode: str = "max"
    threshold: float = 1e-4
    min_scale: float = 0.0
    scale: float = 1.0
    best: float | None = None
    num_bad: int = 0

    def __post_init__(self):      # a bad mode fails when the phase starts, not at its first evaluation
        _check_mode(self.mode)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "ReduceLROnPlateau":
        return cls(patience=cfg.patience, factor=cfg.factor, mode=cfg.mode, threshold=cfg.threshold,
                   min_scale=cfg.min_scale)

    def step(self, metric: float) -> bool:
        """Record one evaluation; True when it reduced the scale."""
        metric = float(metric)
        if _improved(metric, self.best, self.mode, self.threshold):
            self.best, self.num_bad = metric, 0
            return False
        self.num_bad += 1
        if self.num_bad > self.patience:
            self.num_bad = 0
            new = max(self.scale * self.factor, self.min_scale)
            reduced, self.scale = new < self.scale, new
            return reduced
        return False

    def apply(self, opt_state: Any) -> Any:
        return set_lr_scale(opt_state, self.scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.num_bad = float(state["scale"]), state["best"], int(state["num_bad"])


@dataclasses.dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without improvement (0 = never; phase 2: 8)."""

    patience: int = 0
    mode: str = "min"
    threshold: float = 0.0
    best: float | None = None
    num_bad: int = 0

    def __post_init__(self):
        _check_mode(self.mode)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "EarlyStopping":
        return cls(patience=cfg.patience, mode=cfg.mode)

    def step(self, metric: float) -> bool:
        """Record one evaluation; True when training should stop."""
        metric = float(metric)
        if _improved(metric, self.best, self.mode, self.threshold):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        return self.should_stop()

    def should_stop(self) -> bool:
        """Whether the evaluations so far call for the stop (also after a resume from a stopped phase)."""
        return self.patience > 0 and self.num_bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.num_bad = state["best"], int(state["num_bad"])
