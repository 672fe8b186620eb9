"""Multi-label classification metrics for the 18 CT-RATE classes (scikit-learn underneath).

- `classification_metrics`: macro / micro F1, precision, recall, a per-class table and, when
  scores are given, per-class and macro ROC AUC.
- `bootstrap_macro_f1_ci`: a percentile bootstrap (resampling volumes) 95% CI of macro F1.
- `tune_thresholds`: per-class threshold search. Tuned on the set it is scored on, so the
  result is an optimistic upper bound (the paper's 0.448); it is returned separately and
  flagged `"tuned_on_eval_set": True`, never mixed into the default-threshold numbers.

Arrays: y_true, y_pred int/bool [N, C]; scores float [N, C]. Classes with no positive and no
predicted positive get F1 = 0 (scikit-learn's zero_division=0), as the CT-RATE tables do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# sklearn (with scipy, ~2 s) is imported in the functions that score: train and evaluate import this
# module, and a command that fails on its flags should not wait for it.

from kervljepa_jax import findings


def _check_binary(array: np.ndarray, what: str) -> None:
    # A probability array passed as predictions would otherwise be floored to all-0 by astype.
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{what} must hold 0/1 (or bool) values; threshold scores first "
                         f"(found e.g. {array[~np.isin(array, (0, 1))].flat[0]!r})")


def _check(y_true: np.ndarray, other: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Same [N, C] shape, N > 0, y_true 0/1; `other` 0/1 too unless it is "scores" (then finite)."""
    y_true, other = np.asarray(y_true), np.asarray(other)
    if y_true.ndim != 2 or other.shape != y_true.shape:
        raise ValueError(f"y_true {y_true.shape} and {what} {other.shape} must both be [N, C]")
    if y_true.shape[0] == 0:
        raise ValueError("no samples to score")
    _check_binary(y_true, "y_true")
    if what == "scores":
        if not np.isfinite(other).all():
            raise ValueError(f"scores hold {int((~np.isfinite(other)).sum())} NaN/inf values")
    else:
        _check_binary(other, what)
    return y_true.astype(np.int8), other


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        class_names = findings.CLASS_NAMES if num_classes == findings.NUM_CLASSES else \
            [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} columns")
    return list(class_names)


def per_class_auc(y_true: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """ROC AUC per column; None where a column holds a single class (AUC undefined)."""
    from sklearn import metrics as skm
    y_true, scores = _check(y_true, scores, "scores")
    return [float(skm.roc_auc_score(y_true[:, c], scores[:, c])) if 0 < y_true[:, c].sum() < len(y_true)
            else None for c in range(y_true.shape[1])]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None,
                           class_names: Sequence[str] | None = None) -> dict:
    """Macro/micro F1, precision, recall, per-class table, AUC where scores exist.

    Returns {"macro_f1", "macro_precision", "macro_recall", "micro_f1", "micro_precision",
    "micro_recall", "per_class": [{"name", "support", "predicted", "precision", "recall",
    "f1", ["auc"]}], ["macro_auc"]}.
    """
    from sklearn import metrics as skm
    y_true, y_pred = _check(y_true, y_pred, "y_pred")
    y_pred = y_pred.astype(np.int8)
    names = _class_names(y_true.shape[1], class_names)
    out = {}
    for average in ("macro", "micro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    table = [{"name": name, "support": int(support[c]), "predicted": int(y_pred[:, c].sum()),
              "precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c])}
             for c, name in enumerate(names)]
    if scores is not None:
        aucs = per_class_auc(y_true, scores)
        for row, auc in zip(table, aucs):
            row["auc"] = auc
        defined = [a for a in aucs if a is not None]
        out["macro_auc"] = float(np.mean(defined)) if defined else None
    out["per_class"] = table
    return out


def _macro_f1_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Macro F1 from count arrays [..., C] (zero_division=0)."""
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return f1.mean(-1)


def bootstrap_macro_f1_ci(y_true: np.ndarray, y_pred: np.ndarray, *, n_resamples: int = 1000,
                          confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap over volumes: {"macro_f1", "low", "high", "confidence", "n_resamples"}."""
    y_true, y_pred = _check(y_true, y_pred, "y_pred")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    # Per-sample count contributions; a resample's counts are their weighted sums.
    tp_s, fp_s, fn_s = (y_true & y_pred), (~y_true & y_pred), (y_true & ~y_pred)
    stats = []
    for start in range(0, n_resamples, 256):
        count = min(256, n_resamples - start)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(count)])
        stats.append(_macro_f1_counts(weights @ tp_s, weights @ fp_s, weights @ fn_s))
    stats = np.concatenate(stats)
    alpha = (1 - confidence) / 2
    full = float(_macro_f1_counts(tp_s.sum(0), fp_s.sum(0), fn_s.sum(0)))
    return {"macro_f1": full, "low": float(np.quantile(stats, alpha)),
            "high": float(np.quantile(stats, 1 - alpha)), "confidence": confidence,
            "n_resamples": n_resamples}


def tune_thresholds(y_true: np.ndarray, scores: np.ndarray, grid: Sequence[float] | None = None,
                    class_names: Sequence[str] | None = None) -> dict:
    """Per-class threshold maximising that class's F1 ON THIS SET (a leaky upper bound).

    grid: candidate thresholds (default 0.01..0.99 step 0.01); ties go to the threshold
    closest to 0.5. Returns {"tuned_on_eval_set": True, "thresholds", "macro_f1",
    "per_class_f1", "macro_precision", "macro_recall"}.
    """
    y_true, scores = _check(y_true, scores, "scores")
    names = _class_names(y_true.shape[1], class_names)
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2) if grid is None else np.asarray(grid, float)
    # Try candidates in order of distance from 0.5 so that argmax's first hit breaks ties there.
    grid = grid[np.argsort(np.abs(grid - 0.5), kind="stable")]
    predicted = scores[None, :, :] > grid[:, None, None]                       # [G, N, C]
    positives = y_true.astype(bool)[None]
    tp = (predicted & positives).sum(1)
    fp = (predicted & ~positives).sum(1)
    fn = (~predicted & positives).sum(1)
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)  # [G, C]
    best = f1.argmax(0)
    thresholds = grid[best]
    y_pred = (scores > thresholds[None]).astype(np.int8)
    tuned = classification_metrics(y_true, y_pred, class_names=names)
    return {"tuned_on_eval_set": True,
            "thresholds": {name: float(t) for name, t in zip(names, thresholds)},
            "macro_f1": tuned["macro_f1"], "macro_precision": tuned["macro_precision"],
            "macro_recall": tuned["macro_recall"],
            "per_class_f1": {row["name"]: row["f1"] for row in tuned["per_class"]}}


def evaluation_report(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None, *,
                      class_names: Sequence[str] | None = None, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
    """Everything at once; the threshold-tuned numbers sit under their own flagged key."""
    out = classification_metrics(y_true, y_pred, scores, class_names)
    out["macro_f1_ci"] = bootstrap_macro_f1_ci(y_true, y_pred, n_resamples=n_resamples, seed=seed)
    if scores is not None:
        out["threshold_tuned"] = tune_thresholds(y_true, scores, class_names=class_names)
    return out


def format_table(report: dict) -> str:
    """The per-class table as aligned text (for logs and benchmark output)."""
    has_auc = any("auc" in row for row in report["per_class"])
    lines = [f"{'class':36s} {'n':>5s} {'P':>6s} {'R':>6s} {'F1':>6s}" + (f" {'AUC':>6s}" if has_auc else "")]
    for row in report["per_class"]:
        auc = row.get("auc")
        lines.append(f"{row['name']:36s} {row['support']:5d} {row['precision']:6.3f} {row['recall']:6.3f} "
                     f"{row['f1']:6.3f}" + (f" {auc:6.3f}" if auc is not None else ("      -" if has_auc else "")))
    lines.append(f"{'macro':36s} {'':5s} {report['macro_precision']:6.3f} {report['macro_recall']:6.3f} "
                 f"{report['macro_f1']:6.3f}")
    return "\n".join(lines)
