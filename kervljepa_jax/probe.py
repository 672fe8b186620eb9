"""Linear probe (paper Table VIII): how much pathology information a representation keeps.

Per class, 5-fold stratified cross-validated logistic regression on one feature vector per
volume (mean-pooled raw slices, compressor tokens, or each phase's tokens). Standardisation is
fitted inside each training fold (a Pipeline), class_weight="balanced" so rare classes are not
ignored, and the held-out predictions of all folds are pooled: F1 at probability 0.5 and ROC AUC
over every volume, each scored once by a model that never saw it.

A class with fewer positives (or negatives) than folds cannot be stratified; it is skipped and
listed under "skipped" with the reason, and the macro numbers average the classes scored.

  result = linear_probe(mean_pool(slices, valid), labels)      # [M, D], [M, 18]
  result["macro_f1"], result["per_class_f1"], result["skipped"]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kervljepa_jax import findings


def mean_pool(slices: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """[M, N, D] (+ valid [M, N] bool) -> [M, D]: mean over the valid slices (or tokens) of each
    volume, float64. Without `valid`, all N count (e.g. the 32 compressor tokens)."""
    slices = np.asarray(slices, np.float64)
    if slices.ndim != 3:
        raise ValueError(f"mean_pool: expected slices [M, N, D], got shape {slices.shape}")
    if valid is None:
        return slices.mean(1)
    valid = np.asarray(valid)
    if valid.shape != slices.shape[:2]:
        raise ValueError(f"mean_pool: valid {valid.shape} must be [M, N] = {slices.shape[:2]}")
    counts = valid.astype(bool).sum(1)
    if (counts == 0).any():
        raise ValueError(f"mean_pool: volume(s) {np.flatnonzero(counts == 0)[:5].tolist()} have no valid "
                         f"slice; drop them before probing")
    return np.einsum("mn,mnd->md", valid.astype(np.float64), slices) / counts[:, None]


def _probe_class(features: np.ndarray, y: np.ndarray, folds: int, seed: int, c_reg: float,
                 max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (probability, prediction) for one class: [M], [M]."""
    # sklearn is imported here and in linear_probe: evaluate imports this module for every run.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probability = np.zeros(len(y))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(features, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=c_reg, class_weight="balanced", max_iter=max_iter, random_state=seed))
        model.fit(features[train], y[train])
        probability[test] = model.predict_proba(features[test])[:, 1]
    return probability, (probability > 0.5).astype(np.int8)


def linear_probe(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, *,
                 class_names: Sequence[str] | None = None, c_reg: float = 1.0,
                 max_iter: int = 2000, n_jobs: int | None = None) -> dict:
    """5-fold CV logistic-regression probe: features [M, F], labels 0/1 [M, C].

    Returns {"macro_f1", "macro_auc", "per_class_f1": {name: f1 | None}, "per_class_auc":
    {name: auc | None}, "skipped": {name: reason}, "n_classes_scored", "n_samples", "folds",
    "seed"}. Skipped classes are None in the per-class dicts and left out of the macro means;
    macro numbers are None when no class could be scored. Deterministic given `seed` (also with
    n_jobs: classes are fitted in parallel processes, -1 = all cores; at 2,984 x 1,024 one core
    takes ~4 minutes for 18 classes).
    """
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"linear_probe: expected features [M, F] and labels [M, C], got {features.shape} "
                         f"and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("linear_probe: labels must hold 0/1 values")
    if not np.isfinite(features).all():
        raise ValueError(f"linear_probe: features hold {int((~np.isfinite(features)).sum())} NaN/inf values")
    if folds < 2:
        raise ValueError(f"linear_probe: folds={folds} must be at least 2")
    names = list(findings.CLASS_NAMES if class_names is None and labels.shape[1] == findings.NUM_CLASSES
                 else class_names or [f"class_{i}" for i in range(labels.shape[1])])
    if len(names) != labels.shape[1]:
        raise ValueError(f"linear_probe: {len(names)} class names for {labels.shape[1]} label columns")
    per_f1, per_auc, skipped, todo = {}, {}, {}, []
    for c, name in enumerate(names):
        positives = int(labels[:, c].sum())
        negatives = len(labels) - positives
        if min(positives, negatives) < folds:
            per_f1[name] = per_auc[name] = None
            skipped[name] = f"{positives} positives / {negatives} negatives, fewer than folds={folds}"
        else:
            todo.append((c, name))
    import joblib
    from sklearn import metrics as skm
    outputs = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_probe_class)(features, labels[:, c].astype(np.int8), folds, seed, c_reg, max_iter)
        for c, _ in todo)
    for (c, name), (probability, predicted) in zip(todo, outputs):
        per_f1[name] = float(skm.f1_score(labels[:, c], predicted, zero_division=0))
        per_auc[name] = float(skm.roc_auc_score(labels[:, c], probability))
    per_f1, per_auc = {n: per_f1[n] for n in names}, {n: per_auc[n] for n in names}   # column order
    scored = [name for name in names if name not in skipped]
    return {"macro_f1": float(np.mean([per_f1[n] for n in scored])) if scored else None,
            "macro_auc": float(np.mean([per_auc[n] for n in scored])) if scored else None,
            "per_class_f1": per_f1, "per_class_auc": per_auc, "skipped": skipped,
            "n_classes_scored": len(scored), "n_samples": len(features), "folds": folds, "seed": seed}


def probe_stages(stages: Mapping[str, np.ndarray], labels: np.ndarray, folds: int = 5, seed: int = 0,
                 **kwargs) -> dict[str, dict]:
    """Table VIII: {stage name: features [M, F] or tokens [M, T, D] (mean-pooled)} -> {stage: probe}."""
    results = {}
    for stage, features in stages.items():
        features = np.asarray(features)
        results[stage] = linear_probe(mean_pool(features) if features.ndim == 3 else features, labels,
                                      folds, seed, **kwargs)
    return results
