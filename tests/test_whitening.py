"""PCA whitening against sklearn, its save/load, and the anisotropy figures on synthetic embeddings."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from kervljepa_jax import whitening


def _anisotropic(n=1000, d=64, n_classes=5, seed=0, sample_seed=None):
    """LLM-like embeddings: a large common direction (the cone), a few high-variance nuisance
    directions that do not depend on the class (they drown the class signal in cosine space),
    a 4-d class structure, and small isotropic noise."""
    rng = np.random.default_rng(seed)  # the distribution
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    common, nuisance, class_dirs = basis[:, 0], basis[:, 1:4], basis[:, 4:8]
    centers = rng.normal(size=(n_classes, 4))
    centers *= 2.5 / np.linalg.norm(centers, axis=1, keepdims=True)
    if sample_seed is not None:  # another draw from the same distribution
        rng = np.random.default_rng(sample_seed)
    labels = rng.integers(0, n_classes, size=n)
    x = (40.0 * common + (6.0 * rng.normal(size=(n, 3))) @ nuisance.T
         + centers[labels] @ class_dirs.T + 0.3 * rng.normal(size=(n, d)))
    return x.astype(np.float32), labels


def _aligned(ours, ref):
    """Flip each of our components to the sign sklearn chose."""
    signs = np.sign(np.sum(ours * ref, axis=0))
    return ours * signs


@pytest.mark.parametrize("n,d", [(400, 32), (20, 50)])  # covariance route and SVD route (M < d)
def test_fit_matches_sklearn_pca_whiten(n, d):
    x = np.random.default_rng(1).normal(size=(n, d)) @ np.diag(np.linspace(5.0, 0.5, d))
    k = 10
    w = whitening.fit_whitening(x, dim=k, eps=0.0)
    pca = PCA(n_components=k, whiten=True, svd_solver="full").fit(x)
    ref = pca.transform(x)
    ours = whitening.apply(w, x)
    np.testing.assert_allclose(_aligned(ours, ref), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w.eigenvalues, pca.explained_variance_, rtol=1e-5)
    assert w.retained_variance == pytest.approx(pca.explained_variance_ratio_.sum(), rel=1e-6)
    # unit variance per component, uncorrelated components
    np.testing.assert_allclose(np.cov(ours, rowvar=False), np.eye(k), atol=1e-4)


def test_apply_works_on_jax_arrays_inside_jit_and_batched_shapes():
    x, _ = _anisotropic(n=300, d=32)
    w = whitening.fit_whitening(x, dim=8)
    out = jax.jit(lambda v: whitening.apply(w, v))(jnp.asarray(x[:12].reshape(3, 4, 32)))
    assert out.shape == (3, 4, 8)
    np.testing.assert_allclose(np.asarray(out).reshape(12, 8), whitening.apply(w, x[:12]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="32"):
        whitening.apply(w, np.zeros((2, 31)))


def test_fit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="dim=256"):
        whitening.fit_whitening(np.zeros((100, 64)), dim=256)
    with pytest.raises(ValueError, match=r"\[M, d\]"):
        whitening.fit_whitening(np.zeros(10), dim=2)
    bad = np.ones((10, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        whitening.fit_whitening(bad, dim=2)
    with pytest.raises(ValueError, match="zero variance"):
        whitening.fit_whitening(np.outer(np.arange(10.0), np.ones(4)), dim=2, eps=0.0)


def test_save_load_roundtrip_and_loud_failures(tmp_path):
    x, _ = _anisotropic(n=200, d=16)
    w = whitening.fit_whitening(x, dim=4)
    path = tmp_path / "work" / "whitening.npz"
    whitening.save(w, path)
    loaded = whitening.load(path)
    for field in ("mean", "projection", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(w, field))
    assert (loaded.retained_variance, loaded.n_samples, loaded.eps) == (w.retained_variance, 200, w.eps)
    np.testing.assert_array_equal(whitening.apply(loaded, x), whitening.apply(w, x))

    with pytest.raises(ValueError, match="no whitening file"):
        whitening.load(tmp_path / "absent.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, mean=w.mean)
    with pytest.raises(ValueError, match="missing"):
        whitening.load(partial)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{k: np.array([{"a": 1}], dtype=object) for k in ("mean", "projection")})
    with pytest.raises(ValueError, match="pickled.npz"):
        whitening.load(pickled)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="garbage.npz"):
        whitening.load(garbage)


def test_mean_cosine_is_exact_mean_over_pairs():
    x = np.random.default_rng(2).normal(size=(30, 5)) + 1.0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    expected = (cos.sum() - np.trace(cos)) / (30 * 29)
    assert whitening.anisotropy_stats(x)["mean_cosine"] == pytest.approx(expected, rel=1e-10)


def test_d_prime_definition_on_all_pairs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6))
    labels = (rng.random((40, 3)) < 0.3).astype(int)  # multi-hot: same = identical rows
    stats = whitening.anisotropy_stats(x, labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    same, diff = [], []
    for i in range(40):
        for j in range(i + 1, 40):
            (same if np.array_equal(labels[i], labels[j]) else diff).append(unit[i] @ unit[j])
    expected = (np.mean(same) - np.mean(diff)) / np.sqrt((np.var(same) + np.var(diff)) / 2)
    assert stats["d_prime"] == pytest.approx(expected, rel=1e-10)
    assert (stats["n_pairs_same"], stats["n_pairs_diff"]) == (len(same), len(diff))


def test_d_prime_sampled_pairs_close_to_exact():
    x, labels = _anisotropic(n=600, d=32)
    x = whitening.apply(whitening.fit_whitening(x, dim=8), x)  # a d' well away from 0
    exact = whitening.anisotropy_stats(x, labels, max_pairs=10**6)
    sampled = whitening.anisotropy_stats(x, labels, max_pairs=20_000, seed=1)
    assert sampled["n_pairs_same"] + sampled["n_pairs_diff"] == 20_000
    assert sampled["d_prime"] == pytest.approx(exact["d_prime"], rel=0.1)


def test_d_prime_is_nan_without_both_pair_kinds():
    stats = whitening.anisotropy_stats(np.random.default_rng(4).normal(size=(10, 3)), np.zeros(10))
    assert np.isnan(stats["d_prime"])


def test_whitening_removes_the_cone_and_raises_d_prime():
    x, labels = _anisotropic()
    w, report = whitening.fit_and_report(x, labels, dim=8)
    assert report["mean_cosine_before"] > 0.9           # the cone (paper: 0.949)
    assert abs(report["mean_cosine_after"]) < 0.01       # isotropic after whitening
    assert report["d_prime_before"] < 0.5
    assert report["d_prime_after"] > 5 * report["d_prime_before"]
    assert 0.9 < report["retained_variance"] < 1.0
    assert (report["input_dim"], report["dim"], report["n_samples"]) == (64, 8, 1000)
    # The same whitening applied to held-out embeddings of the same distribution stays isotropic.
    held_out, held_labels = _anisotropic(n=500, sample_seed=9)
    after = whitening.anisotropy_stats(whitening.apply(w, held_out), held_labels)
    assert abs(after["mean_cosine"]) < 0.05
    assert after["d_prime"] > 5 * report["d_prime_before"]


def test_report_logs_and_flattens(caplog):
    caplog.set_level(logging.INFO)
    before = {"mean_cosine": 0.949, "d_prime": 1.36}
    after = {"mean_cosine": 0.001, "d_prime": 16.03}
    report = whitening.report_whitening_stats(before, after)
    assert report["d_prime_ratio"] == pytest.approx(16.03 / 1.36)
    assert report["mean_cosine_before"] == 0.949 and "retained_variance" not in report
    logged = caplog.text
    assert "0.9490 -> 0.0010" in logged and "1.360 -> 16.030" in logged


def test_a_bad_whitening_file_is_a_data_error_naming_it_and_the_fix(tmp_path):
    """Every way WORKDIR/whitening.npz can be bad reaches the trainer as DataError (one line there,
    not a traceback) naming the file and the fix: truncated, a corrupt member, an older format,
    fit for another LLM width or jepa_dim."""
    from kervljepa_jax.data.records import DataError
    x, _ = _anisotropic(n=200, d=16)
    good = tmp_path / "whitening.npz"
    whitening.save(whitening.fit_whitening(x, dim=4), good)
    assert not (tmp_path / "whitening.npz.tmp").exists()
    raw = good.read_bytes()
    truncated, corrupt, old = tmp_path / "truncated.npz", tmp_path / "corrupt.npz", tmp_path / "old.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[200] ^= 0xFF            # inside the first member's data: its CRC no longer matches
    corrupt.write_bytes(bytes(flipped))
    with np.load(good) as data:
        np.savez(old, **{**{k: data[k] for k in data.files}, "format_version": np.int64(0)})
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    for path, problem in ((truncated, "unreadable"), (corrupt, "unreadable"), (old, "format 0"),
                          (garbage, r"unreadable whitening file \(not an .npz archive\)")):
        with pytest.raises(DataError, match=problem) as raised:
            whitening.load(path)
        message = str(raised.value)
        assert str(path) in message and "delete it and rerun" in message and "\n" not in message
    assert whitening.load(good, input_dim=16, dim=4).dim == 4
    for sizes, needed in (({"input_dim": 64}, "needs 64 -> 4"), ({"dim": 8}, "needs 16 -> 8")):
        with pytest.raises(DataError, match=needed):
            whitening.load(good, **sizes)


def test_identity_whitening_leaves_the_embeddings_as_they_are():
    """The Table XI ablation (--config.model.whiten=false): targets are the raw embeddings."""
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) + 3.0
    w = whitening.identity(8, 8)
    np.testing.assert_array_equal(whitening.apply(w, x), x)
    assert w.dim == w.input_dim == 8
    with pytest.raises(ValueError, match="must be the embeddings' width"):
        whitening.identity(8, 4)
