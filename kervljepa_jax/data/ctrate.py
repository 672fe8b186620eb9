"""CT-RATE as distributed: reports, labels and metadata CSVs + per-volume slice embeddings.

Layout under `data.root` (each path configurable, see `default_data_config`):
  radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN, ...
  multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 class columns
  metadata/{train,validation}_metadata.csv   VolumeName, ZSpacing, ...
  embeddings/{train,valid}/<VolumeName>.npy [N, D]  or .npz with `embeddings` [N, D] and optional `z_mm` [N]
(`<VolumeName>` may keep or drop CT-RATE's `.nii.gz` suffix.) Without `z_mm`, z_i = i * ZSpacing.

The index (rows, labels, spacing, file presence) is built and checked once at construction;
embeddings are read on access, which grain does from several threads.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import zipfile
from typing import Any, Iterable

import numpy as np
from absl import logging

from kervljepa_jax import findings
from kervljepa_jax.data import records

_NON_UTF8 = re.compile("[\udc80-\udcff]")   # bytes that failed to decode, kept by surrogateescape
_VOLUME_SUFFIXES = (".nii.gz", ".nii")
REPORT_COLUMNS = ("VolumeName", "Findings_EN")
METADATA_COLUMNS = ("VolumeName", "ZSpacing")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def resolve(root: str, path: str) -> str:
    """`path` under `root` unless it is absolute (or root is empty)."""
    if not path or os.path.isabs(path) or not root:
        return path
    return os.path.join(root, path)


def volume_stem(volume_name: str) -> str:
    for suffix in _VOLUME_SUFFIXES:
        if volume_name.endswith(suffix):
            return volume_name[: -len(suffix)]
    return volume_name


def read_csv(path: str, required: Iterable[str], flag: str) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield (row, fields) per data row (row 1 = first line after the header).

    A missing file or column raises DataError; so does a row with the wrong number of fields
    or bytes that are not UTF-8 (the row's fields are reported, not silently replaced).
    """
    if not os.path.isfile(path):
        raise records.DataError(f"{path}: file not found; set --config.data.{flag} (or data.root)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise records.DataError(f"{path}: empty file, expected a header with {list(required)}")
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise records.DataError(f"{path}: missing column(s) {missing}; the header has {header}")
        for row, values in enumerate(reader, start=1):
            if not values:
                continue
            if len(values) != len(header):
                raise records.DataError(f"{records.where(path, row)}: {len(values)} fields, header has "
                                        f"{len(header)}; fix the CSV quoting")
            yield row, dict(zip(header, values))


def non_utf8_error(path: str, row: int, fields: dict[str, str]) -> str | None:
    for column, value in fields.items():
        if _NON_UTF8.search(value):
            return (f"{records.where(path, row, fields.get('VolumeName'))}: column {column!r} is not valid "
                    "UTF-8; re-encode the CSV as UTF-8")
    return None


class _Table:
    """VolumeName -> parsed value, or -> error line for a bad row (reported when the volume is used)."""

    def __init__(self, path: str):
        self.path = path
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def add(self, row: int, fields: dict[str, str], parse) -> None:
        name = fields["VolumeName"].strip()
        if name in self.values or name in self.errors:
            self.errors[name] = (f"{records.where(self.path, row, name)}: duplicate VolumeName; "
                                 "keep one row per volume")
            self.values.pop(name, None)
            return
        error = non_utf8_error(self.path, row, fields)
        if error:
            self.errors[name] = error
            return
        try:
            self.values[name] = parse(row, name, fields)
        except records.DataError as e:
            self.errors[name] = str(e)

    def lookup(self, name: str, what: str) -> Any:
        if name in self.errors:
            raise records.DataError(self.errors[name])
        if name not in self.values:
            raise records.DataError(f"{self.path}: no row for VolumeName={name}; add its {what} row")
        return self.values[name]


def _parse_labels(path: str):
    columns = list(findings.CLASS_NAMES)

    def parse(row, name, fields):
        return records.check_labels([fields[c] for c in columns], records.where(path, row, name), columns)
    return parse


def _parse_spacing(path: str):
    def parse(row, name, fields):
        text = fields["ZSpacing"].strip()
        try:
            spacing = float(text)
        except ValueError:
            spacing = float("nan")
        if not np.isfinite(spacing) or spacing <= 0:
            raise records.DataError(f"{records.where(path, row, name)}: ZSpacing={text!r} is not a positive "
                                    "number; fix the metadata CSV")
        return spacing
    return parse


def _index_embedding_files(folder: str, flag: str) -> dict[str, str]:
    """stem (VolumeName without .nii.gz) -> file name, from one directory listing."""
    if not os.path.isdir(folder):
        raise records.DataError(f"{folder}: embeddings folder not found; set --config.data.{flag}")
    files = {}
    for name in os.listdir(folder):
        for ext in (".npy", ".npz"):
            if name.endswith(ext):
                files[volume_stem(name[: -len(ext)])] = name
    return files


class CtRateSource:
    """grain RandomAccessDataSource over one CT-RATE split; `source[i]` is a volume record."""

    def __init__(self, config, split: str):
        if split not in config.reports_csv:
            raise records.DataError(f"split {split!r}: data.reports_csv has no such split "
                                    f"({sorted(config.reports_csv)})")
        self.split = split
        self.limits = records.SliceLimits(config.embed_dim, config.max_slices, config.over_max_slices)
        self.slice_dtype = np.dtype(config.slice_dtype)
        self.skip_bad_records = bool(config.skip_bad_records)
        root = config.root
        self.reports_csv = resolve(root, config.reports_csv[split])
        self.labels_csv = resolve(root, config.labels_csv[split])
        self.metadata_csv = resolve(root, config.metadata_csv[split]) if config.metadata_csv[split] else ""
        self.embeddings_dir = resolve(root, config.embeddings_dir[split])
        self.index_skips: list[str] = []    # rows dropped while indexing (skip_bad_records), re-reported per epoch
        # index -> (size, mtime_ns) of the .npy whose slices were last found finite: the NaN/Inf scan
        # (a pass over the data) runs once per file and again only if the file changes.
        self._scanned: dict[int, tuple[int, int]] = {}
        self._steps: dict[int, np.ndarray] = {}   # n -> arange(n) float32, for z from ZSpacing
        self._entries = self._build_index(split)
        if self.index_skips:
            logging.warning("data[%s]: %d CSV rows skipped while indexing (skip_bad_records=True); "
                            "each is listed at the end of every epoch", split, len(self.index_skips))
        logging.info("data[%s]: %d CT-RATE volumes from %s", split, len(self._entries), self.reports_csv)

    def _build_index(self, split: str) -> list[dict]:
        labels = _Table(self.labels_csv)
        for row, fields in read_csv(self.labels_csv, ("VolumeName", *findings.CLASS_NAMES), f"labels_csv.{split}"):
            labels.add(row, fields, _parse_labels(self.labels_csv))
        spacing = None
        if self.metadata_csv:
            spacing = _Table(self.metadata_csv)
            for row, fields in read_csv(self.metadata_csv, METADATA_COLUMNS, f"metadata_csv.{split}"):
                spacing.add(row, fields, _parse_spacing(self.metadata_csv))
        files = _index_embedding_files(self.embeddings_dir, f"embeddings_dir.{split}")
        entries, seen = [], {}
        for row, fields in read_csv(self.reports_csv, REPORT_COLUMNS, f"reports_csv.{split}"):
            name = fields["VolumeName"].strip()
            try:
                entries.append(self._entry(row, name, fields, seen, labels, spacing, files))
            except records.DataError as e:
                if not self.skip_bad_records:
                    raise
                self.index_skips.append(str(e))
            seen.setdefault(name, row)
        return entries

    def _entry(self, row, name, fields, seen, labels, spacing, files) -> dict:
        context = records.where(self.reports_csv, row, name)
        if not name:
            raise records.DataError(f"{context}: empty VolumeName")
        if name in seen:
            raise records.DataError(f"{context}: duplicate VolumeName (first at row {seen[name]}); "
                                    "keep one row per volume")
        error = non_utf8_error(self.reports_csv, row, fields)
        if error:
            raise records.DataError(error)
        report = fields["Findings_EN"].strip()
        if not report:
            raise records.DataError(f"{context}: empty Findings_EN report; fill it or drop the row")
        stem = volume_stem(name)
        if stem not in files:
            raise records.DataError(f"{context}: no embedding file {stem}.npy/.npz in {self.embeddings_dir}; "
                                    "export it or drop the row")
        return {"volume_name": name, "row": row, "report": report,
                "labels": labels.lookup(name, "labels"),
                "z_spacing": spacing.lookup(name, "metadata") if spacing is not None else None,
                "path": os.path.join(self.embeddings_dir, files[stem])}

    def __len__(self) -> int:
        return len(self._entries)

    def texts(self) -> tuple[list[str], list[np.ndarray]]:
        """(Findings_EN, [C] labels) of every indexed volume, without reading any embedding."""
        return [e["report"] for e in self._entries], [np.asarray(e["labels"]) for e in self._entries]

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, slot: np.ndarray | None = None) -> dict:
        """Record `index`; with slot [N_max, D], a .npy is read straight into slot[:N] (the caller's
        batch row) and record['slices'] is that view: no intermediate array, no extra copy."""
        entry = self._entries[index]
        try:
            return self._load(index, entry, slot)
        except records.DataError as e:
            if not self.skip_bad_records:
                raise
            return records.bad_record(index, entry["volume_name"], str(e))

    def _load(self, index: int, entry: dict, slot: np.ndarray | None) -> dict:
        context = f"{entry['path']} (row {entry['row']} of {self.reports_csv})"
        slices, z_mm, stamp = read_embeddings(entry["path"], context, slot)
        if z_mm is None and entry["z_spacing"] is None:
            raise records.DataError(f"{context}: no z_mm in the file and no metadata_csv for ZSpacing; "
                                    "set --config.data.metadata_csv or store z_mm")
        scanned = stamp is not None and self._scanned.get(index) == stamp
        kept, z_kept, subsampled = records.check_slices(slices, z_mm, self.limits, context, check_finite=not scanned)
        if stamp is not None:
            self._scanned[index] = stamp
        if z_mm is None:
            z_kept = self._spaced_z(slices.shape[0], entry["z_spacing"], context)
            if subsampled:
                z_kept = z_kept[records.subsample_indices(slices.shape[0], self.limits.max_slices)]
        return {"volume_name": entry["volume_name"], "index": index,
                "slices": kept.astype(self.slice_dtype, copy=False),
                "z_mm": z_kept.astype(np.float32, copy=False), "labels": entry["labels"],
                "report": entry["report"], "subsampled": subsampled}

    def _spaced_z(self, n: int, spacing: float, context: str) -> np.ndarray:
        """[n] float32 z_i = i * spacing (spacing > 0: finite iff the last one is)."""
        if (n - 1) * spacing > _FLOAT32_MAX:
            raise records.DataError(f"{context}: z_mm overflows float32 ({n} slices x ZSpacing={spacing}); "
                                    "fix the metadata CSV")
        steps = self._steps.get(n)
        if steps is None:
            steps = self._steps.setdefault(n, np.arange(n, dtype=np.float32))
        return steps * np.float32(spacing)

    def __repr__(self) -> str:
        return f"CtRateSource(split={self.split!r}, n={len(self)}, reports={self.reports_csv!r})"


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple] = {}   # header bytes -> (shape, fortran_order, dtype); few distinct N


def _npy_layout(fd: int) -> tuple[tuple, int] | None:
    """((shape, fortran_order, dtype), data offset) of an open .npy; None for a format version
    this fast path does not read (np.load then does). Reads the header with one pread."""
    head = os.pread(fd, 256, 0)
    if len(head) < 10 or head[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy file (bad magic)")
    version = (head[6], head[7])
    if version not in ((1, 0), (2, 0)):
        return None
    size_len = 2 if version == (1, 0) else 4
    start = 8 + size_len
    end = start + int.from_bytes(head[8:start], "little")
    if len(head) < end:      # a long header (many dims / fields): read all of it
        head = os.pread(fd, end, 0)
        if len(head) < end:
            raise ValueError("file ends inside the .npy header")
    header = head[start:end]
    layout = _NPY_HEADERS.get(header)
    if layout is None:    # parse it once (numpy's safe literal parser), then reuse
        f = io.BytesIO(head[:end])
        np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        layout = _NPY_HEADERS.setdefault(header, read_header(f))
    return layout, end


def _read_exactly(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill out's bytes from the file at offset (preadv straight into out, no buffer in between)."""
    if not out.nbytes:
        return
    view, done = memoryview(out).cast("B"), 0
    while done < out.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends before the {out.nbytes} data bytes of a {out.shape} {out.dtype} array")
        done += n


def read_npy(path: str, slot: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """[N, D] array of a .npy file, read with one preadv straight into slot[:N] when the file
    fits it (C order, slot's dtype and width, N <= len(slot)); otherwise a new array. Also the
    file's (size, mtime_ns) as it was read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        stamp = (info.st_size, info.st_mtime_ns)
        found = _npy_layout(fd)
        if found is None or found[0][1] or found[0][2].hasobject:
            return np.load(path, allow_pickle=False), stamp
        (shape, _, dtype), offset = found
        fits = (slot is not None and len(shape) == 2 and dtype == slot.dtype and shape[1] == slot.shape[1]
                and shape[0] <= slot.shape[0])
        out = slot[: shape[0]] if fits else np.empty(shape, dtype)
        _read_exactly(fd, out, offset)
        return out, stamp
    finally:
        os.close(fd)


def read_embeddings(path: str, context: str,
                    slot: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    """[N, D] embeddings, optional [N] z_mm and (for .npy) the file's (size, mtime_ns) from .npy /
    .npz; unreadable files are DataErrors. A .npy is read into `slot` when it fits (`read_npy`).
    """
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                if "embeddings" not in archive.files:
                    raise records.DataError(f"{context}: .npz has no 'embeddings' array (has {archive.files})")
                slices = archive["embeddings"]
                z_mm = archive["z_mm"].astype(np.float32) if "z_mm" in archive.files else None
            return slices, z_mm, None
        slices, stamp = read_npy(path, slot)
        return slices, None, stamp
    except records.DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise records.DataError(f"{context}: unreadable or truncated embedding file "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                "re-export it") from None
