"""The volume record every source yields, its validation, and the bad-record policy.

A record is a plain dict (it crosses grain worker processes by pickling):
  volume_name  str
  index        int            position in its source (drives per-sample randomness)
  slices       [N, D]         float16/float32 slice embeddings, finite, 1 <= N <= max_slices
  z_mm         [N] float32    physical z of every slice (apex first)
  labels       [C] int32      0/1 abnormality labels, C = findings.NUM_CLASSES
  report       str            Findings_EN, verbatim
A source that meets a bad record either raises `DataError` (one line naming the file and row)
or, with `skip_bad_records`, returns `bad_record(...)`; the pipeline counts those and reports
them at the end of the epoch. Nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
from absl import logging

BAD_KEY = "bad_record"
OVER_MAX_POLICIES = ("subsample", "error")
# float16 bit patterns of Inf/NaN (exponent all ones): 0x7C00-0x7FFF (+) and 0xFC00-0xFFFF (-).
_F16_POS_NONFINITE = np.int16(0x7C00)
_F16_NEG_NONFINITE = np.uint16(0xFC00)


class DataError(ValueError):
    """A bad input record or file; the message is one line naming the file/row and the fix."""


@dataclasses.dataclass(frozen=True)
class SliceLimits:
    """What a volume's slice array must satisfy."""
    embed_dim: int
    max_slices: int
    over_max_slices: str = "subsample"   # subsample | error

    def __post_init__(self):
        if self.over_max_slices not in OVER_MAX_POLICIES:
            raise DataError(f"data.over_max_slices={self.over_max_slices!r}: use one of {OVER_MAX_POLICIES}")
        if self.embed_dim <= 0 or self.max_slices <= 0:
            raise DataError(f"data.embed_dim={self.embed_dim}, data.max_slices={self.max_slices}: both must be > 0")


def where(file: str, row: int | None = None, volume: str | None = None) -> str:
    """'file row R (VolumeName=V)' prefix for error lines; rows count data lines from 1."""
    parts = [str(file)]
    if row is not None:
        parts.append(f"row {row}")
    if volume:
        parts.append(f"(VolumeName={volume})")
    return " ".join(parts)


def all_finite(x: np.ndarray) -> bool:
    """Fast finiteness check for large float arrays (float16 via its exponent bits)."""
    if x.dtype == np.float16:
        # Two max-reductions over the raw bits, no temporary (float16 arithmetic is slow in numpy):
        # as int16, +Inf/NaN are the largest values; as uint16, -Inf/NaN are.
        bits = np.ascontiguousarray(x).view(np.uint16)
        return bool(bits.view(np.int16).max(initial=0) < _F16_POS_NONFINITE
                    and bits.max(initial=0) < _F16_NEG_NONFINITE)
    # A sum is cheap and non-finite iff some element is (or the sum overflowed: then check fully).
    if np.isfinite(x.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(x).all())


def subsample_indices(n: int, max_slices: int) -> np.ndarray:
    """Uniform subsample of n slices down to max_slices, keeping the first and the last."""
    return np.round(np.linspace(0, n - 1, max_slices)).astype(np.int64)


def check_slices(slices: Any, z_mm: np.ndarray | None, limits: SliceLimits,
                 context: str, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Validate [N, D] slices (+ optional z_mm [N]); apply the over-max policy.

    Returns (slices, z_mm, subsampled). Raises DataError naming `context` on any defect.
    check_finite=False skips the NaN/Inf scan of the slices (for a file already scanned, unchanged).
    """
    if not isinstance(slices, np.ndarray) or slices.dtype.kind != "f":
        raise DataError(f"{context}: slice embeddings must be a float array, got "
                        f"{getattr(slices, 'dtype', type(slices).__name__)}; re-export them as float16/float32")
    if slices.ndim != 2:
        raise DataError(f"{context}: slice embeddings must be [N, D], got shape {slices.shape}")
    n, d = slices.shape
    if d != limits.embed_dim:
        raise DataError(f"{context}: embedding width {d} != data.embed_dim={limits.embed_dim}; "
                        "use the matching embeddings or set --config.data.embed_dim")
    if n == 0:
        raise DataError(f"{context}: 0 slices; remove the volume or re-export its embeddings")
    if z_mm is not None and z_mm.shape != (n,):
        raise DataError(f"{context}: z_mm has shape {z_mm.shape}, expected ({n},) to match the slices")
    if check_finite and not all_finite(slices):
        raise DataError(f"{context}: NaN/Inf in slice embeddings; re-export the volume")
    if z_mm is not None and not np.isfinite(z_mm).all():
        raise DataError(f"{context}: NaN/Inf in z_mm; re-export the volume")
    if n > limits.max_slices:
        if limits.over_max_slices == "error":
            raise DataError(f"{context}: {n} slices > data.max_slices={limits.max_slices}; raise max_slices "
                            "or set --config.data.over_max_slices=subsample")
        keep = subsample_indices(n, limits.max_slices)
        return slices[keep], (None if z_mm is None else z_mm[keep]), True
    return slices, z_mm, False


def check_labels(values: list[str], context: str, columns: list[str]) -> np.ndarray:
    """Parse 0/1 label strings ("1", "0", "1.0") into int32 [C]; anything else is a DataError."""
    out = np.zeros(len(values), np.int32)
    for i, (value, column) in enumerate(zip(values, columns)):
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if number not in (0.0, 1.0):
            raise DataError(f"{context}: label {column!r} = {text!r} is not 0/1; fix the labels CSV")
        out[i] = int(number)
    return out


def bad_record(index: int, volume_name: str, message: str) -> dict:
    """A stand-in for a skipped record (skip_bad_records=True); the pipeline counts it."""
    return {BAD_KEY: message, "index": index, "volume_name": volume_name}


def is_bad(record: dict) -> bool:
    return BAD_KEY in record


class EpochReport:
    """Counts of skipped / subsampled / truncated records within one epoch, logged at its end."""

    def __init__(self):
        self.skipped: list[str] = []
        self.counts: collections.Counter = collections.Counter()

    def skip(self, message: str) -> None:
        self.skipped.append(message)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def as_dict(self) -> dict:
        return {"skipped": len(self.skipped), **dict(self.counts)}

    def log(self, epoch: int, split: str) -> None:
        """One summary line, then each skipped record on its own line (nothing dropped silently)."""
        logging.warning("data[%s] epoch %d: %d bad records skipped, %s", split, epoch, len(self.skipped),
                        ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "no other events")
        for message in self.skipped:
            logging.warning("data[%s] epoch %d skipped: %s", split, epoch, message)
