"""Record validation: slice checks, the over-max policy, label parsing, epoch reports."""

import numpy as np
import pytest

from kervljepa_jax.data import records

LIMITS = records.SliceLimits(embed_dim=8, max_slices=10, over_max_slices="subsample")


def _slices(n=6, d=8, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, d)).astype(dtype)


def _one_line_error(fn, *needles):
    with pytest.raises(records.DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_good_slices_pass_unchanged():
    x, z = _slices(), np.arange(6, dtype=np.float32)
    out, z_out, subsampled = records.check_slices(x, z, LIMITS, "vol.npy")
    assert out is x and z_out is z and not subsampled


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_slices_are_errors(dtype, bad):
    x = _slices(dtype=dtype)
    x[3, 5] = bad
    _one_line_error(lambda: records.check_slices(x, None, LIMITS, "vol.npy row 4"), "vol.npy row 4", "NaN/Inf")


def test_all_finite_survives_sum_overflow():
    # The float32 sum overflows to inf though every element is finite: must still pass.
    x = np.full((4, 8), 3e38, np.float32)
    assert records.all_finite(x)
    x[1, 1] = np.nan
    assert not records.all_finite(x)


def test_float16_exponent_check_matches_isfinite():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**16, size=5000, dtype=np.uint16).view(np.float16)
    for chunk in np.split(bits, 100):
        assert records.all_finite(chunk) == bool(np.isfinite(chunk).all())


def test_float16_check_on_every_bit_pattern():
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = [records.all_finite(np.array([[0.0, p], [1.0, -2.0]], np.float16)) for p in patterns]
    np.testing.assert_array_equal(got, np.isfinite(patterns))
    strided = np.zeros((4, 6), np.float16)
    strided[1, 1] = np.inf
    assert records.all_finite(strided[::2, ::2]) and not records.all_finite(strided[1::2, 1::2])


def test_wrong_width_zero_slices_and_bad_shapes():
    _one_line_error(lambda: records.check_slices(_slices(d=7), None, LIMITS, "a.npy"), "a.npy", "width 7")
    _one_line_error(lambda: records.check_slices(_slices(n=0), None, LIMITS, "b.npy"), "b.npy", "0 slices")
    _one_line_error(lambda: records.check_slices(np.zeros(8, np.float32), None, LIMITS, "c.npy"), "[N, D]")
    _one_line_error(lambda: records.check_slices(np.zeros((3, 8), np.int32), None, LIMITS, "d.npy"), "float")
    _one_line_error(lambda: records.check_slices(_slices(), np.zeros(5, np.float32), LIMITS, "e.npy"), "z_mm")


def test_over_max_subsample_keeps_ends_uniformly():
    x = np.arange(25 * 8, dtype=np.float32).reshape(25, 8)
    z = np.arange(25, dtype=np.float32) * 2.0
    out, z_out, subsampled = records.check_slices(x, z, LIMITS, "big.npy")
    assert subsampled and out.shape == (10, 8) and z_out.shape == (10,)
    assert z_out[0] == 0 and z_out[-1] == 48
    steps = np.diff(z_out)
    assert steps.min() >= 4 and steps.max() <= 6          # uniform: 24/9 slices apart, rounded
    np.testing.assert_array_equal(out[:, 0] / 8, z_out / 2)


def test_over_max_error_policy():
    limits = records.SliceLimits(8, 10, "error")
    _one_line_error(lambda: records.check_slices(_slices(n=11), None, limits, "big.npy"), "big.npy", "11 slices")


def test_bad_policy_name():
    with pytest.raises(records.DataError, match="over_max_slices"):
        records.SliceLimits(8, 10, "drop")


@pytest.mark.parametrize("value", ["2", "yes", "", "-1", "0.5", "nan"])
def test_labels_not_binary(value):
    columns = ["a", "b", "c"]
    _one_line_error(lambda: records.check_labels(["1", value, "0"], "labels.csv row 3", columns),
                    "labels.csv row 3", "'b'")


def test_labels_parse():
    out = records.check_labels(["1", "0", "1.0", " 0 "], "x", list("abcd"))
    np.testing.assert_array_equal(out, [1, 0, 1, 0])
    assert out.dtype == np.int32


def test_epoch_report_counts_and_logs(caplog):
    report = records.EpochReport()
    report.skip("f.csv row 2: bad")
    report.count("subsampled_slices", 2)
    report.count("subsampled_slices")
    assert report.as_dict() == {"skipped": 1, "subsampled_slices": 3}
    bad = records.bad_record(4, "v", "oops")
    assert records.is_bad(bad) and not records.is_bad({"index": 1})
    with caplog.at_level("WARNING"):
        report.log(epoch=3, split="train")
    assert "1 bad records skipped" in caplog.text and "f.csv row 2: bad" in caplog.text
