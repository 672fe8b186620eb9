"""Linear probe: planted signal vs noise, determinism, explicit skips, equality with sklearn's own
cross_val_predict, and mean pooling over valid slices."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kervljepa_jax import findings, probe

NAMES = ["a", "b", "c", "d"]


def _data(m=240, f=16, classes=4, signal=3.0, seed=0):
    """Labels with prevalence 0.2-0.5; class c shifts feature c by `signal` (0 = pure noise)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((m, classes)) < np.linspace(0.2, 0.5, classes)).astype(np.int8)
    features = rng.standard_normal((m, f))
    features[:, :classes] += signal * labels
    features[:, -1] *= 1e4                # a huge-scale noise column: harmless only if standardised
    return features, labels


@pytest.fixture(scope="module")
def planted():
    features, labels = _data()
    return features, labels, probe.linear_probe(features, labels, class_names=NAMES)


def test_planted_signal_gives_high_f1(planted):
    _, _, result = planted
    assert result["n_classes_scored"] == 4 and result["skipped"] == {}
    assert result["macro_f1"] > 0.85 and result["macro_auc"] > 0.95
    assert min(result["per_class_f1"].values()) > 0.75
    assert result["macro_f1"] == pytest.approx(np.mean(list(result["per_class_f1"].values())))


def test_noise_gives_chance():
    features, labels = _data(signal=0.0, seed=1)
    result = probe.linear_probe(features, labels, class_names=NAMES)
    assert abs(result["macro_auc"] - 0.5) < 0.08
    # A coin flip that says "yes" half the time scores F1 = 2p * 0.5 / (p + 0.5) at prevalence p.
    prevalence = labels.mean(0)
    chance = np.mean(prevalence / (prevalence + 0.5))
    assert abs(result["macro_f1"] - chance) < 0.1, (result["macro_f1"], chance)


def test_deterministic_by_seed(planted):
    features, labels, result = planted
    assert probe.linear_probe(features, labels, class_names=NAMES, seed=0) == result
    other = probe.linear_probe(features, labels, class_names=NAMES, seed=1)
    assert other["seed"] == 1 and other["per_class_auc"] != result["per_class_auc"]


def test_equals_sklearn_cross_val_predict(planted):
    features, labels, result = planted
    y = labels[:, 2]
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                               random_state=0))
    probability = cross_val_predict(model, features, y, method="predict_proba",
                                    cv=StratifiedKFold(5, shuffle=True, random_state=0))[:, 1]
    assert result["per_class_f1"]["c"] == pytest.approx(skm.f1_score(y, probability > 0.5))
    assert result["per_class_auc"]["c"] == pytest.approx(skm.roc_auc_score(y, probability))


def test_rare_classes_are_reported_not_crashed():
    features, labels = _data(m=60)
    labels[:, 1] = 0
    labels[:3, 1] = 1                                          # 3 positives < 5 folds
    labels[:, 3] = 1                                           # no negatives at all
    result = probe.linear_probe(features, labels, class_names=NAMES)
    assert set(result["skipped"]) == {"b", "d"}
    assert "3 positives / 57 negatives, fewer than folds=5" == result["skipped"]["b"]
    assert result["per_class_f1"]["b"] is None and result["per_class_auc"]["d"] is None
    assert result["n_classes_scored"] == 2
    assert result["macro_f1"] == pytest.approx(np.mean([result["per_class_f1"][n] for n in ("a", "c")]))
    empty = probe.linear_probe(features, np.zeros((60, 2), np.int8))
    assert empty["macro_f1"] is None and empty["n_classes_scored"] == 0


def test_default_names_are_the_ct_rate_classes():
    features, labels = _data(m=60, f=24, classes=18, signal=2.0)
    labels[:, 5:] = 0                                          # only 5 classes scoreable: stays quick
    result = probe.linear_probe(features, labels, folds=3)
    assert list(result["per_class_f1"]) == list(findings.CLASS_NAMES)
    assert result["n_classes_scored"] == 5 and len(result["skipped"]) == 13


def test_mean_pool_and_stages():
    rng = np.random.default_rng(0)
    slices = rng.standard_normal((3, 7, 5)).astype(np.float32)
    valid = np.array([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1, 0]], bool)
    pooled = probe.mean_pool(slices, valid)
    expected = np.stack([slices[i][valid[i]].mean(0) for i in range(3)])
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    np.testing.assert_allclose(probe.mean_pool(slices), slices.mean(1), rtol=1e-6)
    features, labels = _data(m=100, classes=2)
    tokens = np.repeat(features[:, None], 4, axis=1)           # 4 identical tokens: pool = features
    results = probe.probe_stages({"raw": features, "tokens": tokens}, labels, class_names=NAMES[:2])
    assert results["raw"] == results["tokens"]


@pytest.mark.parametrize("call, message", [
    (lambda: probe.mean_pool(np.zeros((2, 3))), "expected slices [M, N, D], got shape (2, 3)"),
    (lambda: probe.mean_pool(np.zeros((2, 3, 4)), np.ones((2, 4))), "valid (2, 4) must be [M, N] = (2, 3)"),
    (lambda: probe.mean_pool(np.zeros((2, 3, 4)), np.array([[1, 0, 0], [0, 0, 0]])), "volume(s) [1]"),
    (lambda: probe.linear_probe(np.zeros((5, 3)), np.zeros((4, 2))), "labels [M, C], got (5, 3) and (4, 2)"),
    (lambda: probe.linear_probe(np.zeros((5, 3)), np.full((5, 2), 2)), "0/1"),
    (lambda: probe.linear_probe(np.full((5, 3), np.nan), np.zeros((5, 2))), "15 NaN/inf"),
    (lambda: probe.linear_probe(np.zeros((5, 3)), np.zeros((5, 2)), folds=1), "folds=1"),
    (lambda: probe.linear_probe(np.zeros((5, 3)), np.zeros((5, 2)), class_names=["a"]), "1 class names for 2"),
])
def test_errors_are_one_line(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_parallel_classes_give_the_same_result(planted):
    features, labels, result = planted
    assert probe.linear_probe(features, labels, class_names=NAMES, n_jobs=2) == result
