"""PCA whitening of report embeddings (paper III-B4) and the anisotropy figures that justify it.

Raw LLM text embeddings (Llama 3.2 3B layer 14, mean-pooled over a report) sit in a narrow
cone: the paper measures a mean pairwise cosine of 0.949 over CT-RATE reports, which leaves
InfoNCE a flat loss surface. Projecting onto the top 256 principal components of the 22,773
training report embeddings and scaling each to unit variance gives an isotropic 256-d space
(d' 1.36 -> 16.03, 97.3% of the variance retained). That space is the target of the JEPA
head (z_v), of InfoNCE (phase 2) and of the per-condition MMD (phase 1).

Fitting is offline host work (numpy, float64); `apply` works on numpy or jax arrays, so it
can run in the data pipeline or inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np
from absl import logging

from kervljepa_jax.data.records import DataError

FORMAT_VERSION = 1
_NPZ_KEYS = ("mean", "projection", "eigenvalues", "retained_variance", "n_samples", "eps", "format_version")


@dataclasses.dataclass(frozen=True, eq=False)
class Whitening:
    """A fitted whitening map x -> (x - mean) @ projection.

    mean [d]; projection [d, k] = eigenvectors / sqrt(eigenvalue + eps), so every output
    component has unit variance on the fitting set; eigenvalues [k] (descending, of the
    covariance with 1/(M-1)); retained_variance: sum of the top k / total variance.
    """
    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    retained_variance: float
    n_samples: int
    eps: float

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])


def fit_whitening(embeddings: Any, dim: int = 256, eps: float = 1e-6) -> Whitening:
    """Top-`dim` PCA with whitening of embeddings [M, d].

    eps is added to each eigenvalue before the 1/sqrt: it bounds the gain of a near-null
    component; for components far above eps (every one of the top 256 of real report
    embeddings) the output variance is 1 to within eps / eigenvalue.
    Eigenvector signs are fixed (largest-magnitude entry positive) so refits are reproducible.
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise ValueError(f"fit_whitening: embeddings must be [M, d], got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(d, n - 1):
        raise ValueError(f"fit_whitening: dim={dim} needs 1 <= dim <= min(d={d}, M-1={n - 1}); "
                         "fit on more embeddings or lower the dim")
    if not np.all(np.isfinite(x)):
        raise ValueError("fit_whitening: embeddings contain NaN or inf; check the embedding extraction")
    if eps < 0:
        raise ValueError(f"fit_whitening: eps must be >= 0, got {eps}")
    mean = x.mean(axis=0)
    centered = x - mean
    total_variance = float(np.sum(centered ** 2) / (n - 1))
    if d <= n:
        eigenvalues, vectors = np.linalg.eigh(centered.T @ centered / (n - 1))
        order = np.argsort(eigenvalues)[::-1][:dim]
        eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    else:  # fewer samples than dimensions: the SVD of the data is the cheaper route
        _, singular, vt = np.linalg.svd(centered, full_matrices=False)
        eigenvalues, vectors = singular[:dim] ** 2 / (n - 1), vt[:dim].T
    eigenvalues = np.maximum(eigenvalues, 0.0)
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    # A numerically null component would be rounding noise blown up to unit variance.
    if eigenvalues[-1] <= 1e-10 * max(eigenvalues[0], np.finfo(np.float64).tiny):
        raise ValueError(f"fit_whitening: component {dim} has zero variance (the embeddings span fewer than "
                         f"{dim} dimensions); lower the dim")
    return Whitening(
        mean=mean.astype(np.float32),
        projection=(vectors / np.sqrt(eigenvalues + eps)).astype(np.float32),
        eigenvalues=eigenvalues.astype(np.float32),
        retained_variance=float(eigenvalues.sum() / total_variance) if total_variance > 0 else 1.0,
        n_samples=n,
        eps=float(eps),
    )


def identity(input_dim: int, dim: int) -> Whitening:
    """No whitening (the Table XI ablation): x -> x, the raw embeddings as the target space. It
    keeps every feature, so the target space must be as wide as the embeddings (dim == input_dim)."""
    if dim != input_dim:
        raise ValueError(f"identity whitening: the target space ({dim}) must be the embeddings' width "
                         f"({input_dim}) to keep them unchanged")
    return Whitening(mean=np.zeros(input_dim, np.float32), projection=np.eye(input_dim, dtype=np.float32),
                     eigenvalues=np.ones(input_dim, np.float32), retained_variance=1.0, n_samples=0, eps=0.0)


def apply(w: Whitening, x: Any) -> Any:
    """Whiten x [..., d] -> [..., k]; numpy in, numpy out; jax in, jax out (jittable)."""
    if x.shape[-1] != w.input_dim:
        raise ValueError(f"whitening.apply: input has {x.shape[-1]} features, the whitening was fit on {w.input_dim}")
    return (x - w.mean) @ w.projection


def save(w: Whitening, path: str | os.PathLike) -> None:
    """Write the whitening to a .npz (plain arrays only: loadable with allow_pickle=False)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Written beside it and renamed: a run killed mid-write leaves no truncated whitening.npz behind
    # (the trainer loads an existing one instead of refitting). A file object keeps np.savez from
    # appending another .npz.
    with open(path + ".tmp", "wb") as f:
        np.savez(f, mean=w.mean, projection=w.projection, eigenvalues=w.eigenvalues,
                 retained_variance=np.float64(w.retained_variance), n_samples=np.int64(w.n_samples),
                 eps=np.float64(w.eps), format_version=np.int64(FORMAT_VERSION))
    os.replace(path + ".tmp", path)


# A bad whitening.npz is a workdir file, not a bug: DataError, which the trainer reports in one line.
# The trainer fits the whitening only when WORKDIR/whitening.npz is absent, so deleting it is the fix.
_REFIT = "delete it and rerun (the trainer refits it) or refit it with python -m kervljepa_jax.whiten --overwrite"


def _read_npz(path: str) -> dict[str, np.ndarray] | None:
    """Every array of the npz at `path`, read in full (a member's bad CRC shows only on reading);
    None for a single .npy array. Raises what numpy and zipfile raise on a bad file."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        return None
    with data:
        return {k: data[k] for k in data.files}


def load(path: str | os.PathLike, input_dim: int | None = None, dim: int | None = None) -> Whitening:
    """Read a whitening written by `save`; DataError naming the path and the fix on anything else
    (absent, not an npz, truncated, a corrupt member, pickled content, an older format, bad shapes)
    and, when the run's sizes are given, on a whitening of other sizes: one left in the workdir by a
    run of another LLM (`input_dim`, its width) or --config.model.jepa_dim (`dim`), which would
    otherwise fail as a shape error inside the first jitted step."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no whitening file; run the whitening CLI first (python -m kervljepa_jax.whiten)")
    try:
        arrays = _read_npz(path)
    # Not an npz, truncated (zipfile's BadZipFile is no OSError), a corrupt member, or pickled content.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        # numpy calls anything that is neither zip nor .npy "pickled data" and suggests unpickling it.
        reason = "not an .npz archive" if "pickle" in str(e) else str(e)
        raise DataError(f"{path}: unreadable whitening file ({reason}); {_REFIT}") from e
    if arrays is None:
        raise DataError(f"{path}: holds a single array, not a whitening .npz; {_REFIT}")
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{path}: not a whitening file, missing {missing}; {_REFIT}")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise DataError(f"{path}: whitening format {int(arrays['format_version'])}, this code reads "
                        f"{FORMAT_VERSION}; {_REFIT}")
    mean, projection, eigenvalues = arrays["mean"], arrays["projection"], arrays["eigenvalues"]
    if (mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]
            or eigenvalues.shape != (projection.shape[1],)):
        raise DataError(f"{path}: inconsistent shapes mean {mean.shape}, projection {projection.shape}, "
                        f"eigenvalues {eigenvalues.shape}; {_REFIT}")
    wanted = (input_dim or projection.shape[0], dim or projection.shape[1])
    if projection.shape != wanted:
        raise DataError(f"{path}: fit for {projection.shape[0]}-wide text embeddings into {projection.shape[1]} "
                        f"dims, this run needs {wanted[0]} -> {wanted[1]} (another LLM or "
                        f"--config.model.jepa_dim); {_REFIT}")
    return Whitening(mean=mean, projection=projection, eigenvalues=eigenvalues,
                     retained_variance=float(arrays["retained_variance"]), n_samples=int(arrays["n_samples"]),
                     eps=float(arrays["eps"]))


# ---------------------------------------------------------------------------------------
# Anisotropy figures (paper Table I)
# ---------------------------------------------------------------------------------------

def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pair_indices(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j when there are at most max_pairs of them, else max_pairs random pairs i != j."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=max_pairs)
    j = (i + rng.integers(1, n, size=max_pairs)) % n  # uniform over j != i
    return i, j


def anisotropy_stats(embeddings: Any, labels: Any = None, max_pairs: int = 200_000,
                     seed: int = 0) -> dict[str, float]:
    """Mean pairwise cosine and, with labels, the discriminability d' of embeddings [M, d].

    mean_cosine: exact mean of cos(x_i, x_j) over all ordered pairs i != j (computed in
      O(M d) from the sum of the unit vectors).
    d_prime (only with labels): a pair is "same" when the two label rows are identical
      (labels [M] class ids or [M, C] multi-hot; two all-normal reports are a same pair),
      "different" otherwise;
          d' = (mean cos_same - mean cos_diff) / sqrt((var cos_same + var cos_diff) / 2),
      over all pairs when M(M-1)/2 <= max_pairs, else over max_pairs random pairs. NaN (with
      a warning) when either group is empty.
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"anisotropy_stats: embeddings must be [M >= 2, d], got shape {x.shape}")
    unit = _unit_rows(x)
    n = x.shape[0]
    summed = unit.sum(axis=0)
    stats = {"mean_cosine": float((summed @ summed - np.sum(unit * unit)) / (n * (n - 1))),
             "n_embeddings": n, "input_dim": x.shape[1]}
    if labels is None:
        return stats
    labels = np.asarray(labels)
    if labels.shape[0] != n or labels.ndim not in (1, 2):
        raise ValueError(f"anisotropy_stats: labels must be [M] or [M, C] with M={n}, got shape {labels.shape}")
    label_rows = labels.reshape(n, -1)
    i, j = _pair_indices(n, max_pairs, seed)
    cosine = np.einsum("pd,pd->p", unit[i], unit[j])
    same = np.all(label_rows[i] == label_rows[j], axis=1)
    stats.update(n_pairs_same=int(same.sum()), n_pairs_diff=int((~same).sum()))
    if same.all() or not same.any():
        logging.warning("anisotropy_stats: %d same-label and %d different-label pairs; d' needs both",
                        int(same.sum()), int((~same).sum()))
        stats.update(mean_cosine_same=float("nan"), mean_cosine_diff=float("nan"), d_prime=float("nan"))
        return stats
    cos_same, cos_diff = cosine[same], cosine[~same]
    pooled_sd = np.sqrt((cos_same.var() + cos_diff.var()) / 2.0)
    stats.update(mean_cosine_same=float(cos_same.mean()), mean_cosine_diff=float(cos_diff.mean()),
                 d_prime=float((cos_same.mean() - cos_diff.mean()) / max(pooled_sd, 1e-12)))
    return stats


def report_whitening_stats(before: dict[str, float], after: dict[str, float],
                           whitening: Whitening | None = None) -> dict[str, float]:
    """One flat dict of before/after figures (from `anisotropy_stats`), logged line by line.

    Paper (Table I, Llama 3.2 3B layer 14, CT-RATE reports): mean cosine 0.949 -> ~0,
    d' 1.36 -> 16.03, 97.3% variance retained in 256 of 3072 dimensions.
    """
    report = {"mean_cosine_before": before["mean_cosine"], "mean_cosine_after": after["mean_cosine"]}
    logging.info("whitening: mean pairwise cosine %.4f -> %.4f (paper 0.949 -> ~0)",
                 before["mean_cosine"], after["mean_cosine"])
    if "d_prime" in before and "d_prime" in after:
        ratio = after["d_prime"] / before["d_prime"] if before["d_prime"] else float("nan")
        report.update(d_prime_before=before["d_prime"], d_prime_after=after["d_prime"], d_prime_ratio=ratio)
        logging.info("whitening: d' %.3f -> %.3f (x%.1f; paper 1.36 -> 16.03, x11.8)",
                     before["d_prime"], after["d_prime"], ratio)
    if whitening is not None:
        report.update(retained_variance=whitening.retained_variance, input_dim=whitening.input_dim,
                      dim=whitening.dim, n_samples=whitening.n_samples)
        logging.info("whitening: %d -> %d dims from %d embeddings, %.1f%% of the variance retained (paper 97.3%%)",
                     whitening.input_dim, whitening.dim, whitening.n_samples, 100.0 * whitening.retained_variance)
    return report


def fit_and_report(embeddings: Any, labels: Any = None, dim: int = 256, eps: float = 1e-6,
                   max_pairs: int = 200_000, seed: int = 0) -> tuple[Whitening, dict[str, float]]:
    """Fit the whitening on embeddings [M, d] and measure it: what the whitening CLI runs."""
    embeddings = np.asarray(embeddings, np.float64)
    w = fit_whitening(embeddings, dim=dim, eps=eps)
    before = anisotropy_stats(embeddings, labels, max_pairs=max_pairs, seed=seed)
    after = anisotropy_stats(apply(w, embeddings), labels, max_pairs=max_pairs, seed=seed)
    return w, report_whitening_stats(before, after, w)
