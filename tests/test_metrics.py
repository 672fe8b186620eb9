"""Metrics vs scikit-learn and a hand computation; bootstrap CI vs a plain resampling loop;
threshold tuning vs a brute-force search; one-line errors."""

import numpy as np
import pytest
from sklearn import metrics as skm

from kervljepa_jax import findings, metrics


def _noisy_labels(n, seed, flip=0.2, num_classes=18):
    """Ground truth with varied prevalence, predictions = truth with `flip` of entries flipped,
    scores that rank positives higher on average."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.05, 0.5, num_classes)
    truth = (rng.random((n, num_classes)) < prevalence).astype(np.int8)
    pred = np.where(rng.random((n, num_classes)) < flip, 1 - truth, truth).astype(np.int8)
    scores = np.clip(0.3 * truth + 0.35 + 0.25 * rng.standard_normal((n, num_classes)), 0, 1)
    return truth, pred, scores


@pytest.fixture(scope="module")
def data():
    truth, pred, scores = _noisy_labels(120, seed=1)
    truth[:, 3] = 0                      # a class nobody has and nobody predicts: F1 0, AUC None
    pred[:, 3] = 0
    return truth, pred, scores


def test_macro_micro_precision_recall_match_sklearn(data):
    truth, pred, _ = data
    report = metrics.classification_metrics(truth, pred)
    for average in ("macro", "micro"):
        p, r, f, _ = skm.precision_recall_fscore_support(truth, pred, average=average, zero_division=0)
        assert report[f"{average}_precision"] == pytest.approx(p)
        assert report[f"{average}_recall"] == pytest.approx(r)
        assert report[f"{average}_f1"] == pytest.approx(f)
    f1 = skm.f1_score(truth, pred, average=None, zero_division=0)
    assert [row["f1"] for row in report["per_class"]] == pytest.approx(f1.tolist())
    assert [row["name"] for row in report["per_class"]] == list(findings.CLASS_NAMES)
    assert [row["support"] for row in report["per_class"]] == truth.sum(0).tolist()
    assert [row["predicted"] for row in report["per_class"]] == pred.sum(0).tolist()
    assert report["per_class"][3]["f1"] == 0.0
    assert "macro_auc" not in report and "auc" not in report["per_class"][0]


def test_hand_computed_two_classes():
    truth = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])
    pred = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    # class 0: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2.  class 1: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3.
    # micro: tp 2, fp 2, fn 1 -> P 1/2, R 2/3, F1 4/7.
    report = metrics.classification_metrics(truth, pred)
    assert report["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert report["macro_precision"] == pytest.approx(0.5)
    assert report["macro_recall"] == pytest.approx(0.75)
    assert report["micro_precision"] == pytest.approx(0.5)
    assert report["micro_recall"] == pytest.approx(2 / 3)
    assert report["micro_f1"] == pytest.approx(4 / 7)
    assert [row["name"] for row in report["per_class"]] == ["class_0", "class_1"]
    assert [row["support"] for row in report["per_class"]] == [2, 1]


def test_auc_only_with_scores_and_only_where_both_labels_exist(data):
    truth, pred, scores = data
    report = metrics.classification_metrics(truth, pred, scores)
    aucs = [row["auc"] for row in report["per_class"]]
    assert aucs[3] is None                                    # no positives: undefined, not 0.5
    expected = [skm.roc_auc_score(truth[:, c], scores[:, c]) for c in range(18) if c != 3]
    assert [a for a in aucs if a is not None] == pytest.approx(expected)
    assert report["macro_auc"] == pytest.approx(np.mean(expected))
    # A class everybody has is undefined too; perfect scores give 1.
    all_positive = np.ones((5, 2), np.int8)
    all_positive[0, 1] = 0
    assert metrics.per_class_auc(all_positive, np.linspace(0, 1, 10).reshape(5, 2)) == [None, 1.0]


def test_bootstrap_matches_a_plain_resampling_loop(data):
    truth, pred, _ = data
    ci = metrics.bootstrap_macro_f1_ci(truth, pred, n_resamples=200, seed=7)
    rng = np.random.default_rng(7)                          # the same draws, scored by sklearn
    stats = []
    for _ in range(200):
        rows = rng.integers(0, len(truth), len(truth))
        stats.append(skm.f1_score(truth[rows], pred[rows], average="macro", zero_division=0))
    assert ci["low"] == pytest.approx(np.quantile(stats, 0.025))
    assert ci["high"] == pytest.approx(np.quantile(stats, 0.975))
    assert ci["macro_f1"] == pytest.approx(metrics.classification_metrics(truth, pred)["macro_f1"])
    assert ci["low"] <= ci["macro_f1"] <= ci["high"]
    assert metrics.bootstrap_macro_f1_ci(truth, pred, n_resamples=200, seed=7) == ci


def test_bootstrap_ci_shrinks_with_n():
    widths = {}
    for n in (100, 1600):
        truth, pred, _ = _noisy_labels(n, seed=n)
        ci = metrics.bootstrap_macro_f1_ci(truth, pred, n_resamples=500, seed=0)
        assert ci["low"] <= ci["macro_f1"] <= ci["high"]
        widths[n] = ci["high"] - ci["low"]
    # 16x the volumes: about a quarter of the width (1/sqrt(16)); allow generous slack.
    assert widths[1600] < 0.5 * widths[100]


def test_threshold_tuning_improves_f1_and_is_flagged(data):
    truth, pred, scores = data
    scores = scores * 0.6            # squash: 0.5 is now too high a cut for most classes
    default = metrics.classification_metrics(truth, (scores > 0.5).astype(np.int8))
    tuned = metrics.tune_thresholds(truth, scores)
    assert tuned["tuned_on_eval_set"] is True
    assert tuned["macro_f1"] > default["macro_f1"] + 0.05
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    for c, name in enumerate(findings.CLASS_NAMES):      # brute force: the best grid F1 per class
        best = max(skm.f1_score(truth[:, c], scores[:, c] > t, zero_division=0) for t in grid)
        assert tuned["per_class_f1"][name] == pytest.approx(best)
        assert tuned["thresholds"][name] in grid
    # Ties go to the threshold nearest 0.5: the empty class is "solved" by any cut, keeps 0.5.
    assert tuned["thresholds"][findings.CLASS_NAMES[3]] == 0.5


def test_evaluation_report_keeps_tuned_numbers_apart(data):
    truth, pred, scores = data
    report = metrics.evaluation_report(truth, pred, scores * 0.6, n_resamples=100)
    plain = metrics.classification_metrics(truth, pred, scores * 0.6)
    assert report["macro_f1"] == pytest.approx(plain["macro_f1"])
    assert report["threshold_tuned"]["tuned_on_eval_set"] is True
    assert report["macro_f1_ci"]["n_resamples"] == 100
    assert "threshold_tuned" not in metrics.evaluation_report(truth, pred, n_resamples=10)
    table = metrics.format_table(report)
    assert all(name in table for name in findings.CLASS_NAMES)
    assert table.splitlines()[-1].startswith("macro") and "AUC" in table.splitlines()[0]


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.classification_metrics(np.zeros((4, 18)), np.zeros((4, 17))), "y_pred (4, 17)"),
    (lambda: metrics.classification_metrics(np.zeros(4), np.zeros(4)), "[N, C]"),
    (lambda: metrics.classification_metrics(np.zeros((0, 18)), np.zeros((0, 18))), "no samples"),
    (lambda: metrics.classification_metrics(np.zeros((4, 18)), np.zeros((4, 18)), np.zeros((3, 18))),
     "scores (3, 18)"),
    (lambda: metrics.classification_metrics(np.zeros((4, 2)), np.zeros((4, 2)), class_names=["a"]),
     "1 class names for 2 columns"),
    (lambda: metrics.classification_metrics(np.zeros((4, 2)), np.full((4, 2), 0.7)), "0/1"),
    (lambda: metrics.classification_metrics(np.full((4, 2), 2), np.zeros((4, 2))), "0/1"),
    (lambda: metrics.per_class_auc(np.zeros((4, 2)), np.full((4, 2), np.nan)), "8 NaN/inf"),
    (lambda: metrics.bootstrap_macro_f1_ci(np.zeros((4, 2)), np.zeros((4, 2)), confidence=95), "confidence"),
    (lambda: metrics.tune_thresholds(np.zeros((4, 2)), np.zeros((5, 2))), "scores (5, 2)"),
])
def test_errors_are_one_line(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)
