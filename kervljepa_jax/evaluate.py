"""Evaluation (paper IV-C, Tables IV, VIII-X): generate reports, label them, score against ground truth.

Library: `generation_eval` (reports under every visual mode -> labels -> metrics), used by the
trainer after each generating phase; `classifier_eval` (phase 1's visual classifier).
CLI: `python -m kervljepa_jax.evaluate --workdir=DIR [--phase=4] [--split=valid]
[--ablations=zero,shuffle,noise]` loads the phase's best checkpoint from a training workdir and
writes DIR/eval/phaseN/{metrics.json, reports.csv} and the figures.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kervljepa_jax import findings, metrics as metrics_lib
from kervljepa_jax.generate import ReportGenerator
from kervljepa_jax.label import RuleLabeler

ABLATIONS = ("zero", "shuffle", "noise")


def score(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Macro F1 / precision / recall (+ the full sklearn report) of multi-hot predictions."""
    report = metrics_lib.classification_metrics(np.asarray(y_true), np.asarray(y_pred), scores)
    return {"macro_f1": report["macro_f1"], "precision": report["macro_precision"],
            "recall": report["macro_recall"], "report": report}


def collect(batches, num_examples: int) -> list[dict]:
    """Up to `num_examples` examples' batches (all if 0), as host dicts."""
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += int(np.asarray(batch["labels"]).shape[0])
        if num_examples and seen >= num_examples:
            break
    return out


def generation_eval(generator: ReportGenerator, variables: Any, batches: Sequence[dict],
                    modes: Sequence[str] = ("normal",), labeler=None, rng: jax.Array | None = None) -> dict:
    """Generate under each visual mode, label with the rule labeler, score against the batch labels.

    Returns {mode: {macro_f1, precision, recall, report, texts}} plus "labels" (ground truth) and
    "volume_names".
    """
    labeler = labeler or RuleLabeler()
    rng = jax.random.key(0) if rng is None else rng
    truth = np.concatenate([np.asarray(jax.device_get(b["labels"])) for b in batches])
    names = [n for b in batches for n in b.get("meta", {}).get("volume_name", [""] * len(b["labels"]))]
    results: dict[str, Any] = {"labels": truth, "volume_names": names}
    for mode in modes:
        texts = []
        for i, batch in enumerate(batches):
            texts += generator(variables, batch["slices"], batch["z_mm"], batch["valid"], visual_mode=mode,
                               rng=jax.random.fold_in(rng, i))
        predicted = labeler(texts)
        results[mode] = {**score(truth, predicted), "texts": texts, "predicted": predicted}
        logging.info("generation eval [%s]: macro F1 %.3f (P %.3f, R %.3f) on %d volumes", mode,
                     results[mode]["macro_f1"], results[mode]["precision"], results[mode]["recall"], len(texts))
    return results


def classifier_eval(logits_fn, variables: Any, batches: Sequence[dict]) -> dict:
    """The visual classifier's macro F1 (sigmoid > 0.5) and AUC on `batches`."""
    logits = np.concatenate([np.asarray(jax.device_get(logits_fn(variables, b))) for b in batches])
    truth = np.concatenate([np.asarray(jax.device_get(b["labels"])) for b in batches])
    probs = 1.0 / (1.0 + np.exp(-logits))
    return score(truth, (probs > 0.5).astype(int), probs)


def write_reports_csv(path: str, results: dict, modes: Sequence[str]) -> None:
    """One row per volume: name, ground-truth positives, and each mode's generated report."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["VolumeName", "true_findings", *[f"report_{m}" for m in modes]])
        for i, name in enumerate(results["volume_names"]):
            positives = "; ".join(findings.CLASS_NAMES[c] for c in np.flatnonzero(results["labels"][i]))
            writer.writerow([name, positives, *[results[m]["texts"][i] for m in modes]])


def json_ready(results: dict, modes: Sequence[str]) -> dict:
    """The JSON-serialisable part of `generation_eval`'s results."""
    out = {}
    for m in modes:
        r = results[m]
        out[m] = {"macro_f1": r["macro_f1"], "precision": r["precision"], "recall": r["recall"],
                  "per_class_f1": {c["name"]: c["f1"] for c in r["report"].get("per_class", [])}}
    return out


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))


def as_jnp(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "meta"}
