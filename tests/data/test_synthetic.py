"""Synthetic CT-RATE: determinism, CT-RATE-like labels and reports, z-confined learnable signal, CLI."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from kervljepa_jax import findings
from kervljepa_jax.data import ctrate, default_data_config, records, synthetic


def config(**overrides):
    c = default_data_config()
    c.embed_dim, c.max_slices = 32, 300
    c.min_synthetic_slices, c.max_synthetic_slices = 60, 200
    c.num_train, c.num_valid = 20, 10
    c.slice_dtype = "float32"
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def texts():
    return [synthetic.sample_volume_text(0, "train", i) for i in range(1200)]


def test_records_are_deterministic_and_split_seed_dependent():
    a, b = synthetic.SyntheticSource(config(), "train"), synthetic.SyntheticSource(config(), "train")
    r1, r2 = a[5], b[5]
    np.testing.assert_array_equal(r1["slices"], r2["slices"])
    assert r1["report"] == r2["report"] and r1["volume_name"] == "train_6_a_1.nii.gz"
    other_seed = synthetic.SyntheticSource(config(seed=1), "train")[5]
    valid = synthetic.SyntheticSource(config(), "valid")[5]
    assert other_seed["report"] != r1["report"] or other_seed["slices"].shape != r1["slices"].shape
    assert not np.array_equal(valid["slices"][:10], r1["slices"][:10])
    with pytest.raises(IndexError):
        a[20]
    reports, labels = a.texts()                     # the same texts, without making slices
    assert len(reports) == len(labels) == 20 and reports[5] == r1["report"]
    np.testing.assert_array_equal(labels[5], r1["labels"])


def test_records_are_made_once_read_only_and_not_pickled(monkeypatch):
    import pickle
    source = synthetic.SyntheticSource(config(), "train")
    first = source[3]
    made = []
    monkeypatch.setattr(source, "_make", lambda i: made.append(i))   # a second read must not make it again
    again = source[3]
    assert made == [] and again is not first and again["slices"] is first["slices"]
    with pytest.raises(ValueError, match="read-only"):
        again["slices"][0, 0] = 1.0                                   # the memo cannot be corrupted
    again["report"] = "changed"                                       # a record is a copy of the memo's dict
    assert source[3]["report"] == first["report"]
    monkeypatch.undo()
    copy = pickle.loads(pickle.dumps(source))                        # grain worker processes start empty
    assert copy._memo == {} and copy._memo_bytes == 0
    np.testing.assert_array_equal(copy[3]["slices"], first["slices"])
    small = synthetic.SyntheticSource(config(), "train")
    monkeypatch.setattr(small, "MEMO_BYTES", first["slices"].nbytes)   # room for one volume only
    small[3], small[4]
    assert list(small._memo) == [3]
    np.testing.assert_array_equal(small[4]["slices"], source[4]["slices"])


def test_record_format_and_geometry():
    source = synthetic.SyntheticSource(config(slice_dtype="float16"), "valid")
    spacings, lengths = set(), set()
    for i in range(len(source)):
        r = source[i]
        n = r["slices"].shape[0]
        assert 60 <= n <= 200 and r["slices"].shape[1] == 32 and r["slices"].dtype == np.float16
        assert r["labels"].shape == (findings.NUM_CLASSES,) and set(np.unique(r["labels"])) <= {0, 1}
        np.testing.assert_allclose(np.diff(r["z_mm"]), r["z_spacing"], rtol=1e-5)
        assert records.all_finite(r["slices"]) and r["report"]
        spacings.add(r["z_spacing"])
        lengths.add(n)
    assert len(spacings) > 2 and len(lengths) > 5


def test_over_max_policy_applies():
    source = synthetic.SyntheticSource(config(max_slices=50), "train")
    r = source[0]
    assert r["slices"].shape[0] == 50 and r["subsampled"]
    with pytest.raises(records.DataError, match="max_slices"):
        synthetic.SyntheticSource(config(max_slices=50, over_max_slices="error"), "train")[0]
    with pytest.raises(records.DataError, match="min_synthetic_slices"):
        synthetic.SyntheticSource(config(min_synthetic_slices=0), "train")


def test_label_statistics_are_ct_rate_like(texts):
    labels = np.stack([t["labels"] for t in texts])
    normal = (labels.sum(1) == 0).mean()
    assert 0.33 <= normal <= 0.42
    prevalence = np.array([f.prevalence for f in findings.FINDINGS])
    np.testing.assert_allclose(labels.mean(0), prevalence, atol=0.05)
    for i, j, lift in findings.CO_OCCURRENCE:
        observed = (labels[:, i] * labels[:, j]).mean() / (labels[:, i].mean() * labels[:, j].mean())
        assert observed > 1.0 + 0.3 * (lift - 1.0), (i, j, lift, observed)


def test_reports_are_mostly_normal_and_agree_with_labels(texts):
    normal_chars = total_chars = 0
    for t in texts[:500]:
        assert findings.labels_from_indices(findings.report_findings(t["report"])) == t["labels"].tolist()
        for sentence in findings.split_sentences(t["report"]):
            total_chars += len(sentence)
            normal_chars += len(sentence) * (not findings.sentence_findings(sentence))
    assert 0.84 <= normal_chars / total_chars <= 0.95


def test_normal_anatomy_prose_asserts_nothing():
    for section in synthetic.SECTIONS:
        for sentence in section.normal:
            assert not findings.sentence_findings(sentence), sentence
    assert not findings.sentence_findings(synthetic.IMPRESSION_NORMAL)


def test_reports_vary_and_negate_absent_findings(texts):
    reports = {t["report"] for t in texts}
    assert len(reports) == len(texts)
    negated = sum(bool(findings.sentence_mentions(s)) and not findings.sentence_findings(s)
                  for t in texts[:200] for s in findings.split_sentences(t["report"]))
    assert negated > 200


def test_finding_sentence_never_asserts_a_negative_class():
    rng = random.Random(0)
    for c in range(findings.NUM_CLASSES):
        for _ in range(20):
            sentence = synthetic.finding_sentence(c, frozenset({c}), rng)
            assert findings.sentence_findings(sentence) == {c}, sentence


def test_signal_is_confined_to_the_class_z_range():
    n, d = 200, 32
    u = np.linspace(0, 1, n)
    rng = np.random.default_rng(7)
    for c in range(findings.NUM_CLASSES):
        labels = np.zeros(findings.NUM_CLASSES, np.int32)
        labels[c] = 1
        lo, hi = findings.FINDINGS[c].z_range
        strengths = []
        for _ in range(20):
            signal = synthetic.lesion_signal(labels, n, d, rng)
            along = signal @ synthetic.world(d).classes[c]
            inside = (u >= lo) & (u <= hi)
            assert np.all(signal[~inside] == 0), c                 # nothing outside the z-range
            assert along[inside].max() > 0.5 and (along[inside] == 0).any() or hi - lo < 0.2
            strengths.append(along.max())
        assert max(strengths) > 1.5 * min(strengths)              # lesion strength varies


def test_class_directions_share_components_across_zones():
    groups = np.array(synthetic.shared_groups())
    classes = synthetic.world(256).classes
    cosine = classes @ classes.T
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    off_diagonal = ~np.eye(len(groups), dtype=bool)
    assert same[off_diagonal].any()
    assert cosine[same & off_diagonal].min() > 0.7 > 0.25 > np.abs(cosine[~same & off_diagonal]).max()
    # Classes that share a direction sit in (almost) disjoint parts of the volume.
    z = [findings.FINDINGS[c].z_range for c in range(findings.NUM_CLASSES)]
    for i, j in zip(*np.nonzero(same & off_diagonal)):
        assert synthetic._overlap(z[i], z[j]) <= synthetic.MAX_SHARED_OVERLAP


def _features(source):
    zone, pooled, labels = [], [], []
    for i in range(len(source)):
        r = source[i]
        x, n = r["slices"], r["slices"].shape[0]
        bounds = np.floor(np.arange(33) * n / 32).astype(int)     # the compressor's zones
        zone.append(np.concatenate([x[bounds[k]:bounds[k + 1]].mean(0) for k in range(32)]))
        pooled.append(x.mean(0))
        labels.append(r["labels"])
    return np.array(zone), np.array(pooled), np.array(labels)


def _ridge_f1(train, valid, which, average="macro"):
    """Macro F1 of a closed-form ridge probe (all classes at once), lambda picked on a train split."""
    def fit(x, y, lam):
        mu, sd = x.mean(0), x.std(0) + 1e-6
        xs = np.c_[(x - mu) / sd, np.ones(len(x))]
        w = np.linalg.solve(xs.T @ xs + lam * np.eye(xs.shape[1]), xs.T @ y)
        return lambda v: (np.c_[(v - mu) / sd, np.ones(len(v))] @ w > 0.5).astype(int)

    def f1(y, p, average="macro"):
        return f1_score(y, p, average=average, zero_division=0)
    x, y = train[which], train[2]
    cut = len(x) * 3 // 4
    lam = max((1.0, 10.0, 100.0, 1000.0), key=lambda l: f1(y[cut:], fit(x[:cut], y[:cut], l)(x[cut:])))
    return f1(valid[2], fit(x, y, lam)(valid[which]), average)


@pytest.fixture(scope="module")
def probe_data():
    c = config(num_train=1500, num_valid=300, min_synthetic_slices=80, max_synthetic_slices=240)
    return _features(synthetic.SyntheticSource(c, "train")), _features(synthetic.SyntheticSource(c, "valid"))


def test_learnable_from_zones_and_not_trivial(probe_data):
    train, valid = probe_data
    zone_f1, global_f1 = _ridge_f1(train, valid, 0, None), _ridge_f1(train, valid, 1, None)
    assert zone_f1.mean() >= 0.8, zone_f1           # a linear read-out of the 32 zones already gets far
    assert zone_f1.mean() < 0.95, zone_f1           # not trivial: noise and weak lesions cost
    assert global_f1.mean() < zone_f1.mean() - 0.1, (zone_f1, global_f1)   # pooling loses the zones
    # Classes sharing a direction, or with look-alikes elsewhere, are told apart by where they are.
    zonal = np.isin(np.arange(findings.NUM_CLASSES), synthetic.LOOKALIKE_CLASSES)
    zonal |= np.array(synthetic.shared_groups()) >= 0
    assert zonal.sum() >= 8
    assert global_f1[zonal].mean() < zone_f1[zonal].mean() - 0.12, (zone_f1[zonal], global_f1[zonal])


def test_lookalikes_stay_outside_their_class_z_range():
    rng = np.random.default_rng(3)
    drawn = [synthetic.lookalikes(rng) for _ in range(2000)]
    assert 0.35 < np.mean([len(d) > 0 for d in drawn]) < 0.43     # Poisson(0.5): P(>= 1) = 0.39
    classes = set()
    for c, start, end, strength in (x for d in drawn for x in d):
        lo, hi = findings.FINDINGS[c].z_range
        assert 0 <= start < end <= 1 and 0.5 <= strength <= 1.5
        assert end <= lo - synthetic.LOOKALIKE_GAP or start >= hi + synthetic.LOOKALIKE_GAP, (c, start, end)
        classes.add(c)
    assert classes == set(synthetic.LOOKALIKE_CLASSES) and len(classes) >= 8
    # The signal follows the drawn intervals: zero outside them.
    u = np.linspace(0, 1, 300)
    state = np.random.default_rng(5)                  # a seed that draws two
    signal = synthetic.lookalike_signal(300, 32, np.random.default_rng(5))
    inside = np.zeros(300, bool)
    for _, start, end, _ in synthetic.lookalikes(state):
        inside |= (u >= start) & (u <= end)
    assert inside.any() and np.all(signal[~inside] == 0)


def test_signal_strength_scales_difficulty():
    c = config(num_train=300, num_valid=150, signal_strength=0.3)
    weak_train = _features(synthetic.SyntheticSource(c, "train"))
    weak_valid = _features(synthetic.SyntheticSource(c, "valid"))
    c.signal_strength = 1.0
    train, valid = _features(synthetic.SyntheticSource(c, "train")), _features(synthetic.SyntheticSource(c, "valid"))
    assert _ridge_f1(weak_train, weak_valid, 0) < _ridge_f1(train, valid, 0) - 0.2


def test_write_layout_and_cli(tmp_path):
    out = str(tmp_path / "ct")
    result = subprocess.run(
        [sys.executable, "-m", "kervljepa_jax.data.synthetic", f"--out={out}", "--num_volumes=3", "--num_valid=2",
         "--seed=4", "--embed_dim=8", "--min_slices=5", "--max_slices=9"],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr
    for split, n in (("train", 3), ("valid", 2)):
        for rel in synthetic.CTRATE_FILES[split]:
            assert os.path.isfile(os.path.join(out, rel))
        files = sorted(os.listdir(os.path.join(out, "embeddings", split)))
        assert len(files) == n and all(f.endswith(".npy") for f in files)
        x = np.load(os.path.join(out, "embeddings", split, files[0]))
        assert x.dtype == np.float16 and x.shape[1] == 8 and 5 <= x.shape[0] <= 9
    # The CT-RATE source reads it back as the synthetic source's records (float16 on disk).
    ct = ctrate.CtRateSource(config(source="ctrate", root=out, embed_dim=8, max_slices=9), "train")
    synth = synthetic.SyntheticSource(config(seed=4, embed_dim=8, max_slices=9, num_train=3,
                                             min_synthetic_slices=5, max_synthetic_slices=9), "train")
    assert len(ct) == 3
    for i in range(3):
        a, b = ct[i], synth[i]
        assert a["volume_name"] == b["volume_name"] and a["report"] == b["report"]
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(a["slices"], b["slices"].astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(a["z_mm"], b["z_mm"], rtol=1e-6)
    missing = subprocess.run([sys.executable, "-m", "kervljepa_jax.data.synthetic"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "--out" in missing.stderr
