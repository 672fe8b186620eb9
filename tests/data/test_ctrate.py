"""CT-RATE source, read from the synthetic generator's CT-RATE-layout output, and every bad input."""

import csv
import os

import numpy as np
import pytest

from kervljepa_jax import findings
from kervljepa_jax.data import ctrate, default_data_config, records, synthetic

D = 16


def small_config(root: str = "", **overrides):
    config = default_data_config()
    config.root = root
    config.source = "ctrate" if root else "synthetic"
    config.embed_dim, config.max_slices = D, 40
    config.min_synthetic_slices, config.max_synthetic_slices = 8, 30
    config.num_train, config.num_valid = 10, 3
    config.slice_dtype = "float32"
    config.seed = 3
    config.update(overrides)
    return config


def write_layout(root: str, file_format: str = "npy", **overrides) -> None:
    """A small synthetic CT-RATE folder (float16 embeddings, as CT-RATE users store them)."""
    synthetic.write_ctrate_layout(root, small_config(**overrides), file_format=file_format, dtype="float16")


def csv_path(root, kind, split="train"):
    return os.path.join(root, synthetic.CTRATE_FILES[split][("reports", "labels", "metadata").index(kind)])


def edit_csv(path, fn):
    """Rewrite a CSV through fn(rows) -> rows (rows include the header)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(fn(rows))


def embedding_path(root, row, split="train"):
    return os.path.join(root, "embeddings", split, f"{split}_{row}_a_1.npy")


@pytest.fixture
def layout(tmp_path):
    write_layout(str(tmp_path))
    return str(tmp_path)


def test_reads_synthetic_layout_like_the_synthetic_source(layout):
    config = small_config(layout)
    synth = synthetic.SyntheticSource(small_config(), "train")
    source = ctrate.CtRateSource(config, "train")
    assert len(source) == 10
    for i in (0, 4, 9):
        got, want = source[i], synth[i]
        assert got["volume_name"] == want["volume_name"]
        assert got["report"] == want["report"]
        np.testing.assert_array_equal(got["labels"], want["labels"])
        # float16 on disk, z from ZSpacing in the metadata CSV.
        np.testing.assert_allclose(got["slices"], want["slices"], rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(got["z_mm"], want["z_mm"], rtol=1e-6)
        assert got["z_mm"][1] == pytest.approx(want["z_spacing"])
    assert len(ctrate.CtRateSource(config, "valid")) == 3
    # Texts without slices (phase 0, whitening, pos_weight) agree with the records.
    (reports, labels), (want_reports, want_labels) = source.texts(), synth.texts()
    assert reports == want_reports and len(reports) == 10
    np.testing.assert_array_equal(np.stack(labels), np.stack(want_labels))


def test_npz_with_z_mm_and_no_metadata(tmp_path):
    write_layout(str(tmp_path), file_format="npz")
    config = small_config(str(tmp_path))
    config.metadata_csv.train = ""
    source = ctrate.CtRateSource(config, "train")
    want = synthetic.SyntheticSource(small_config(), "train")[2]
    np.testing.assert_allclose(source[2]["z_mm"], want["z_mm"])


def test_npy_without_metadata_is_an_error(layout):
    config = small_config(layout)
    config.metadata_csv.train = ""
    with pytest.raises(records.DataError, match="ZSpacing"):
        ctrate.CtRateSource(config, "train")[0]


def test_slice_dtype_and_absolute_paths(layout):
    config = small_config(layout, slice_dtype="float16")
    config.reports_csv.train = csv_path(layout, "reports")     # absolute: used as is
    assert ctrate.CtRateSource(config, "train")[0]["slices"].dtype == np.float16


def test_volume_name_without_suffix_finds_its_file(layout):
    edit_csv(csv_path(layout, "reports"), lambda rows: [rows[0]] + [[r[0].replace(".nii.gz", ""), *r[1:]]
                                                                    for r in rows[1:]])
    edit_csv(csv_path(layout, "labels"), lambda rows: [rows[0]] + [[r[0].replace(".nii.gz", ""), *r[1:]]
                                                                   for r in rows[1:]])
    edit_csv(csv_path(layout, "metadata"), lambda rows: [rows[0]] + [[r[0].replace(".nii.gz", ""), *r[1:]]
                                                                     for r in rows[1:]])
    assert ctrate.CtRateSource(small_config(layout), "train")[1]["volume_name"] == "train_2_a_1"


@pytest.mark.parametrize("case", ["fits", "longer_than_slot", "other_dtype", "fortran", "version_2",
                                  "long_header", "no_slot"])
def test_read_npy_equals_np_load(tmp_path, case):
    """The fast .npy path (one preadv into the caller's row) reads what np.load reads, in place
    when the array fits the slot and into a new array (or through np.load) otherwise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, D)).astype(np.float16)
    slot = np.full((9, D), 5, np.float16)
    if case == "longer_than_slot":
        x = rng.normal(size=(12, D)).astype(np.float16)
    elif case == "other_dtype":
        x = x.astype(np.float32)
    elif case == "fortran":
        x = np.asfortranarray(x)
    elif case == "long_header":             # a header longer than the first pread
        x = np.zeros(3, dtype=[(f"field_{i:02d}", "<f2") for i in range(40)])
    path = str(tmp_path / "x.npy")
    with open(path, "wb") as f:
        np.lib.format.write_array(f, x, version=(2, 0) if case == "version_2" else None)
    got, stamp = ctrate.read_npy(path, None if case == "no_slot" else slot)
    np.testing.assert_array_equal(got, np.load(path))
    assert got.dtype == x.dtype and stamp == (os.path.getsize(path), os.stat(path).st_mtime_ns)
    in_place = case in ("fits", "version_2")
    assert np.shares_memory(got, slot) == in_place
    if in_place:
        assert (slot[7:] == 5).all()        # rows past N untouched (the batch pads them)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each is a one-line DataError naming the file and row, or a counted skip.

def _defect_missing_embedding(root):
    os.remove(embedding_path(root, 3))
    return csv_path(root, "reports"), "row 3", "no embedding file"


def _defect_nan(root):
    x = np.load(embedding_path(root, 3))
    x[2, 1] = np.nan
    np.save(embedding_path(root, 3), x)
    return embedding_path(root, 3), "row 3", "NaN/Inf"


def _defect_wrong_width(root):
    np.save(embedding_path(root, 3), np.zeros((12, D + 1), np.float16))
    return embedding_path(root, 3), "row 3", f"width {D + 1}"


def _defect_zero_slices(root):
    np.save(embedding_path(root, 3), np.zeros((0, D), np.float16))
    return embedding_path(root, 3), "row 3", "0 slices"


def _defect_duplicate(root):
    edit_csv(csv_path(root, "reports"), lambda rows: rows[:4] + [[rows[2][0], *rows[4][1:]]] + rows[5:])
    return csv_path(root, "reports"), "row 4", "duplicate VolumeName"


def _defect_label(root):
    def change(rows):
        rows[3][5] = "2"
        return rows
    edit_csv(csv_path(root, "labels"), change)
    return csv_path(root, "labels"), "row 3", "not 0/1"


def _defect_empty_report(root):
    def change(rows):
        rows[3][rows[0].index("Findings_EN")] = "  "
        return rows
    edit_csv(csv_path(root, "reports"), change)
    return csv_path(root, "reports"), "row 3", "empty Findings_EN"


def _defect_non_utf8(root):
    path = csv_path(root, "reports")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[3] = lines[3].replace(b"normal", b"norm\xe4l", 1).replace(b"Lung", b"L\xfcng", 1)
    assert b"\xe4" in lines[3] or b"\xfc" in lines[3]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    return path, "row 3", "not valid UTF-8"


def _defect_truncated(root):
    path = embedding_path(root, 3)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path, "row 3", "truncated"


def _defect_bad_spacing(root):
    def change(rows):
        rows[3][rows[0].index("ZSpacing")] = "-1"
        return rows
    edit_csv(csv_path(root, "metadata"), change)
    return csv_path(root, "metadata"), "row 3", "ZSpacing"


def _defect_spacing_overflow(root):
    def change(rows):
        rows[3][rows[0].index("ZSpacing")] = "1e38"     # finite, but (N - 1) x 1e38 mm is not a float32
        return rows
    edit_csv(csv_path(root, "metadata"), change)
    return embedding_path(root, 3), "row 3", "overflows float32"


DEFECTS = [_defect_missing_embedding, _defect_nan, _defect_wrong_width, _defect_zero_slices, _defect_duplicate,
           _defect_label, _defect_empty_report, _defect_non_utf8, _defect_truncated, _defect_bad_spacing,
           _defect_spacing_overflow]


def read_all(source):
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__[len("_defect_"):])
def test_bad_input_is_one_line_error_naming_file_and_row(layout, defect):
    path, row, what = defect(layout)
    with pytest.raises(records.DataError) as info:
        read_all(ctrate.CtRateSource(small_config(layout), "train"))
    message = str(info.value)
    assert "\n" not in message
    assert path in message and row in message and what in message, message


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__[len("_defect_"):])
def test_bad_input_is_a_counted_skip(layout, defect):
    path, row, what = defect(layout)
    source = ctrate.CtRateSource(small_config(layout, skip_bad_records=True), "train")
    got = read_all(source)
    bad = [r[records.BAD_KEY] for r in got if records.is_bad(r)] + source.index_skips
    assert len(bad) == 1 and path in bad[0] and what in bad[0]
    assert len([r for r in got if not records.is_bad(r)]) == 9


def test_missing_label_column(layout):
    missing = findings.CLASS_NAMES[7]
    edit_csv(csv_path(layout, "labels"), lambda rows: [[v for v, h in zip(r, rows[0]) if h != missing]
                                                       for r in rows])
    with pytest.raises(records.DataError) as info:    # a whole-file defect: never skippable
        ctrate.CtRateSource(small_config(layout, skip_bad_records=True), "train")
    assert csv_path(layout, "labels") in str(info.value) and missing in str(info.value)


def test_missing_report_column(layout):
    edit_csv(csv_path(layout, "reports"), lambda rows: [r[:3] + r[4:] for r in rows])   # drop Findings_EN
    with pytest.raises(records.DataError) as info:
        ctrate.CtRateSource(small_config(layout), "train")
    assert csv_path(layout, "reports") in str(info.value) and "Findings_EN" in str(info.value)


def test_over_max_slices_policy(layout):
    np.save(embedding_path(layout, 2), np.ones((55, D), np.float16))
    record = ctrate.CtRateSource(small_config(layout), "train")[1]
    assert record["subsampled"] and record["slices"].shape == (40, D) and record["z_mm"][-1] > record["z_mm"][-2]
    with pytest.raises(records.DataError) as info:
        ctrate.CtRateSource(small_config(layout, over_max_slices="error"), "train")[1]
    assert embedding_path(layout, 2) in str(info.value) and "row 2" in str(info.value)


def test_missing_files_name_the_flag(tmp_path):
    with pytest.raises(records.DataError, match="reports_csv|labels_csv"):
        ctrate.CtRateSource(small_config(str(tmp_path)), "train")
    write_layout(str(tmp_path))
    config = small_config(str(tmp_path))
    config.embeddings_dir.train = "nowhere"
    with pytest.raises(records.DataError, match="embeddings_dir.train"):
        ctrate.CtRateSource(config, "train")


def test_licensed_reports_parse_when_present():
    """The licensed CT-RATE sample (read by path only) goes through the same CSV reader."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                        "ctrate_labeled_reports_train.csv")
    if not os.path.isfile(path):
        pytest.skip("licensed CT-RATE sample not present")
    rows = list(ctrate.read_csv(path, ("report_text", *findings.CLASS_NAMES), "reports_csv.train"))
    assert len(rows) > 100
    for row, fields in rows:
        assert ctrate.non_utf8_error(path, row, fields) is None
        records.check_labels([fields[c] for c in findings.CLASS_NAMES], f"row {row}", list(findings.CLASS_NAMES))
