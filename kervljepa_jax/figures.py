"""Evaluation figures (matplotlib, Agg backend, PNG) and the per-zone evidence score behind the
zone map.

- `per_class_f1_bars`: F1 per CT-RATE class, with the macro mean as a line.
- `loss_curves`: training logs (JSONL file or list of dicts with "phase", "step" and loss keys),
  one panel per curriculum phase, one curve per loss key.
- `zone_attention_map`: a [classes, zones] heatmap: which of the 32 compressor zones (apex ->
  base) each class's evidence comes from.
- `ablation_bars`: generation F1 under visual-token conditions (full / zero / shuffle / noise,
  paper Table IX), grouped per phase.
- `component_bars`: macro F1 with its CI per component ablation against the full model (Table XI).
- `zone_evidence`: a [classes, zones] matrix for the map, computed from compressor tokens and
  labels with numpy only (see its docstring).

Every plotting function returns the path it wrote. Bad input is a one-line ValueError.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from kervljepa_jax import findings

ABLATION_ORDER = ("full", "zero", "shuffle", "noise")
_NON_CURVE_KEYS = ("phase", "step", "epoch")


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) drawn by matplotlib's object-oriented API on the Agg canvas: no pyplot, so no
    global backend switch (a notebook keeps its inline backend), nothing to close, safe in threads.
    Imported at the first figure: train and evaluate import this module, and matplotlib costs ~1 s
    that a command failing on its flags should not pay."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def _names(num_rows: int, class_names: Sequence[str] | None, what: str) -> list[str]:
    names = list(findings.CLASS_NAMES if class_names is None else class_names)
    if len(names) != num_rows:
        raise ValueError(f"{what}: {num_rows} rows but {len(names)} class names; pass class_names= "
                         f"of the same length")
    return names


# ----------------------------------------------------------------------------- per-class F1


def _per_class_f1(source) -> tuple[list[str], np.ndarray]:
    """Accepts a metrics report ({"per_class": [...]}), its per_class list, {name: f1}, or [C]."""
    if isinstance(source, Mapping) and "per_class" in source:
        source = source["per_class"]
    if isinstance(source, Mapping):
        return list(source), np.asarray(list(source.values()), float)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], Mapping):
        return [row["name"] for row in source], np.asarray([row["f1"] for row in source], float)
    values = np.asarray(source, float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"per_class_f1_bars: expected a report, per-class rows, {{name: f1}} or a "
                         f"1-D array, got shape {values.shape}")
    return _names(values.size, None, "per_class_f1_bars"), values


def per_class_f1_bars(report_or_per_class, path: str, title: str = "Per-class F1") -> str:
    """Horizontal bars of F1 per class (class order top to bottom) and the macro mean."""
    names, values = _per_class_f1(report_or_per_class)
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"per_class_f1_bars: F1 values must be in [0, 1], got {values.min():.3g}.."
                         f"{values.max():.3g}")
    fig, ax = _subplots(figsize=(7, 0.3 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, values, color="tab:blue")
    ax.axvline(values.mean(), color="tab:red", linestyle="--", label=f"macro {values.mean():.3f}")
    for row, value in zip(y, values):
        ax.text(min(value + 0.01, 0.93), row, f"{value:.2f}", va="center", fontsize=7)
    ax.set(yticks=y, yticklabels=names, xlim=(0, 1), xlabel="F1", title=title)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- loss curves


def _read_log(source) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        records = []
        with open(source, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{source}:{number}: not a JSON line ({error.msg})") from None
        return records
    return list(source)


def loss_curves(source, path: str, keys: Sequence[str] | None = None) -> str:
    """One panel per phase; in each, one curve per loss key against "step".

    source: a JSONL path or a list of dicts, each with "phase", "step" and numeric values.
    keys: which values to draw; default every numeric key whose name contains "loss".
    Records missing a key are skipped for that curve (e.g. validation every N steps).
    """
    records = _read_log(source)
    for number, record in enumerate(records):
        if not isinstance(record, Mapping) or "phase" not in record or "step" not in record:
            raise ValueError(f"loss_curves: record {number} needs 'phase' and 'step' keys, got "
                             f"{sorted(record) if isinstance(record, Mapping) else type(record).__name__}")
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if "loss" in k and k not in _NON_CURVE_KEYS
                       and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        raise ValueError("loss_curves: no records with a numeric '*loss*' key; pass keys= to choose")
    phases = sorted({r["phase"] for r in records}, key=str)
    fig, axes = _subplots(1, len(phases), figsize=(4.5 * len(phases), 3.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rows = [r for r in records if r["phase"] == phase]
        for key in keys:
            points = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
        ax.set(title=f"phase {phase}", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- zone map


def zone_attention_map(matrix: np.ndarray, path: str, class_names: Sequence[str] | None = None,
                       value_label: str = "per-zone AUC", title: str = "Zone evidence per class") -> str:
    """Heatmap [classes, zones]: rows are classes, columns the compressor zones apex -> base.

    NaN cells (a class with too few positives) are left blank.
    """
    matrix = np.asarray(matrix, float)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"zone_attention_map: expected [classes, zones], got shape {matrix.shape}")
    names = _names(matrix.shape[0], class_names, "zone_attention_map")
    num_zones = matrix.shape[1]
    fig, ax = _subplots(figsize=(0.28 * num_zones + 4, 0.3 * len(names) + 1.5))
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(len(names)), labels=names, fontsize=8)
    ticks = np.arange(0, num_zones, max(1, num_zones // 8))
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.set(xlabel="zone (apex \u2192 base)", title=title)
    fig.colorbar(image, ax=ax, label=value_label)
    return _save(fig, path)


def _auc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of scores [M, C] against 0/1 labels [M, C] (Mann-Whitney U with
    mid-ranks for ties, equal to sklearn's roc_auc_score); NaN where a column has one class."""
    from scipy import stats
    ranks = stats.rankdata(scores, axis=0)
    positives = labels.sum(0)
    negatives = len(labels) - positives
    u = (ranks * labels).sum(0) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)


def zone_evidence(tokens: np.ndarray, labels: np.ndarray, folds: int = 2, seed: int = 0) -> np.ndarray:
    """How well each zone's tokens alone separate each class: [M, Z, D] x [M, C] -> [C, Z].

    Per zone z and class c, a linear score of that zone's token x_z is fitted on the other folds
    by diagonal LDA (a nearest-class-mean rule with per-dimension variances, which needs no
    iterative fitting): w = (mean_pos - mean_neg) / var, score = w . x_z. The value is the ROC AUC
    of the out-of-fold scores, so 0.5 means the zone carries no linearly readable evidence of the
    class and 1.0 a perfect separation. Cross-fitting (`folds`, seeded) keeps high-dimensional
    noise from looking like evidence, which an in-sample fit with D ~ M would. Classes with fewer
    than `folds` positives or negatives are NaN.
    """
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    if tokens.ndim != 3 or labels.ndim != 2 or labels.shape[0] != tokens.shape[0]:
        raise ValueError(f"zone_evidence: expected tokens [M, Z, D] and labels [M, C], got {tokens.shape} "
                         f"and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("zone_evidence: labels must hold 0/1 values")
    if not 2 <= folds <= tokens.shape[0]:
        raise ValueError(f"zone_evidence: folds={folds} must be in [2, M={tokens.shape[0]}]")
    labels = labels.astype(np.float64)
    fold_of = np.random.default_rng(seed).permutation(tokens.shape[0]) % folds
    evidence = np.empty((labels.shape[1], tokens.shape[1]))
    for zone in range(tokens.shape[1]):                  # one zone at a time: [M, D] in float64
        x = tokens[:, zone].astype(np.float64)
        scores = np.zeros(labels.shape)                                       # [M, C]
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            y = labels[train]
            mean_pos = y.T @ x[train] / np.maximum(y.sum(0), 1)[:, None]      # [C, D]
            mean_neg = (1 - y).T @ x[train] / np.maximum((1 - y).sum(0), 1)[:, None]
            variance = x[train].var(0)
            variance = variance + 1e-6 * variance.mean() + 1e-12              # constant dims: no 0/0
            scores[test] = x[test] @ ((mean_pos - mean_neg) / variance).T
        evidence[:, zone] = _auc_columns(scores, labels)
    too_few = (labels.sum(0) < folds) | ((1 - labels).sum(0) < folds)
    evidence[too_few] = np.nan
    return evidence


# ----------------------------------------------------------------------------- ablations


def _ablation_groups(results: Mapping) -> dict[str, dict[str, float]]:
    """{"full": f1, ...} (one group) or {phase: {"full": f1, ...}}; values are F1 or a metrics
    report with "macro_f1"."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("ablation_bars: expected {condition: f1} or {phase: {condition: f1}}")
    if all(not isinstance(v, Mapping) or "macro_f1" in v for v in results.values()):
        results = {"": results}
    groups = {}
    for phase, conditions in results.items():
        if not isinstance(conditions, Mapping) or not conditions:
            raise ValueError(f"ablation_bars: phase {phase!r} needs {{condition: f1}}, got {conditions!r:.60}")
        groups[str(phase)] = {k: float(v["macro_f1"] if isinstance(v, Mapping) else v)
                              for k, v in conditions.items()}
    return groups


def ablation_bars(results: Mapping, path: str, title: str = "Generation F1 by visual-token condition") -> str:
    """Grouped bars: per phase, macro F1 with full / zero / shuffle / noise visual tokens."""
    groups = _ablation_groups(results)
    conditions = [c for c in ABLATION_ORDER if any(c in g for g in groups.values())]
    conditions += sorted({c for g in groups.values() for c in g} - set(conditions))
    width = 0.8 / len(conditions)
    fig, ax = _subplots(figsize=(1.2 + 1.6 * len(groups) * max(1, len(conditions) / 4), 3.6))
    for i, condition in enumerate(conditions):
        x = np.arange(len(groups)) + (i - (len(conditions) - 1) / 2) * width
        values = [g.get(condition, math.nan) for g in groups.values()]
        bars = ax.bar(x, values, width, label=condition)
        ax.bar_label(bars, fmt="%.3f", fontsize=6)
    ax.set_xticks(np.arange(len(groups)), labels=[p if not p or p.startswith("phase") else f"phase {p}"
                                                 for p in groups])
    ax.set(ylabel="macro F1", title=title, ylim=(0, max(1e-3, np.nanmax(
        [v for g in groups.values() for v in g.values()] + [0])) * 1.2))
    ax.legend(fontsize=8)
    return _save(fig, path)


def component_bars(rows: Sequence[tuple[str, float, float | None, float | None]], path: str,
                   title: str = "Component ablations") -> str:
    """Horizontal bars of macro F1 with its 95% CI, one per (name, f1, low, high) row, top to bottom;
    the first row is the reference (the full model), drawn as a dashed line through every bar."""
    if not rows or any(len(r) != 4 for r in rows):
        raise ValueError("component_bars: expected rows of (name, f1, ci_low, ci_high), the full model first")
    names = [r[0] for r in rows]
    f1 = np.array([r[1] for r in rows], float)
    low = np.array([r[1] if r[2] is None else r[2] for r in rows], float)
    high = np.array([r[1] if r[3] is None else r[3] for r in rows], float)
    y = np.arange(len(rows))[::-1]
    fig, ax = _subplots(figsize=(6.0, 0.9 + 0.45 * len(rows)))
    bars = ax.barh(y, f1, xerr=np.stack([f1 - low, high - f1]), capsize=3,
                   color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=6)
    ax.axvline(f1[0], color="k", linestyle="--", linewidth=0.8)
    ax.set_yticks(y, labels=names, fontsize=8)
    ax.set(xlabel="generated-report macro F1 (95% CI)", title=title, xlim=(0, min(1.0, np.nanmax(high) * 1.15)))
    return _save(fig, path)
