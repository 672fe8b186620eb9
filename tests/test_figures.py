"""Figures are real PNGs of plausible size; bad input is a one-line error; zone_evidence finds
the zone a planted signal lives in and sees nothing in noise."""

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg
from sklearn import metrics as skm

from kervljepa_jax import figures, findings, metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_width=300, min_height=150):
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert width < 5000 and height < 5000, (width, height)
    assert pixels[..., :3].std() > 0.01                   # something was drawn, not a blank canvas
    return width, height


def _one_line_error(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def _planted(m=400, zones=8, dim=16, planted=((0, 2), (5, 6), (9, 2)), strength=2.0, seed=0):
    """Noise tokens; class c's positives get +strength (d' = 2: best AUC ~0.92) along one
    random direction in zone z."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((m, 18)) < 0.3).astype(np.int8)
    tokens = rng.standard_normal((m, zones, dim)).astype(np.float32)
    for c, z in planted:
        direction = rng.standard_normal(dim)
        tokens[:, z] += strength * labels[:, c, None] * direction / np.linalg.norm(direction)
    return tokens, labels


def test_per_class_f1_bars_from_report_rows_dict_and_array(tmp_path):
    rng = np.random.default_rng(0)
    truth = (rng.random((50, 18)) < 0.3).astype(np.int8)
    pred = np.where(rng.random((50, 18)) < 0.2, 1 - truth, truth)
    report = metrics.classification_metrics(truth, pred)
    path = figures.per_class_f1_bars(report, str(tmp_path / "sub" / "f1.png"))
    assert path.endswith("f1.png")
    width, height = _check_png(path)
    assert height > 300                                     # 18 labelled rows
    f1 = {row["name"]: row["f1"] for row in report["per_class"]}
    _check_png(figures.per_class_f1_bars(report["per_class"], str(tmp_path / "rows.png")))
    _check_png(figures.per_class_f1_bars(f1, str(tmp_path / "dict.png")))
    _check_png(figures.per_class_f1_bars(np.array(list(f1.values())), str(tmp_path / "array.png")))
    _one_line_error(lambda: figures.per_class_f1_bars(np.zeros(17), str(tmp_path / "x.png")),
                    "17 rows but 18 class names")
    _one_line_error(lambda: figures.per_class_f1_bars(np.zeros((18, 2)), str(tmp_path / "x.png")), "1-D")
    _one_line_error(lambda: figures.per_class_f1_bars({"a": 1.5}, str(tmp_path / "x.png")), "[0, 1]")


def test_loss_curves_one_panel_per_phase(tmp_path):
    records = [{"phase": phase, "step": step, "loss": 2.0 / (step + 1) + phase, "lr": 1e-4}
               for phase in (1, 2, 3) for step in range(0, 100, 5)]
    records += [{"phase": 3, "step": step, "val_loss": 1.5} for step in (0, 50)]
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    wide, _ = _check_png(figures.loss_curves(str(jsonl), str(tmp_path / "loss.png")))
    narrow, _ = _check_png(figures.loss_curves([r for r in records if r["phase"] == 1],
                                               str(tmp_path / "one.png")), min_width=200)
    assert wide > 2 * narrow                              # three panels side by side vs one
    _one_line_error(lambda: figures.loss_curves([{"step": 1, "loss": 1.0}], str(tmp_path / "x.png")),
                    "record 0 needs 'phase' and 'step'")
    _one_line_error(lambda: figures.loss_curves([{"phase": 1, "step": 1, "lr": 1.0}], str(tmp_path / "x.png")),
                    "no records with a numeric '*loss*' key")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"phase": 1, "step": 0, "loss": 1}\n{oops\n')
    _one_line_error(lambda: figures.loss_curves(str(bad), str(tmp_path / "x.png")), "bad.jsonl:2")


def test_zone_attention_map(tmp_path):
    matrix = np.random.default_rng(0).random((18, 32))
    matrix[4] = np.nan                                     # a class without enough positives
    width, height = _check_png(figures.zone_attention_map(matrix, str(tmp_path / "zones.png")))
    assert width > 400 and height > 300
    _one_line_error(lambda: figures.zone_attention_map(np.zeros((17, 32)), str(tmp_path / "x.png")),
                    "17 rows but 18 class names")
    _one_line_error(lambda: figures.zone_attention_map(np.zeros(32), str(tmp_path / "x.png")),
                    "expected [classes, zones], got shape (32,)")


def test_ablation_bars_per_phase_flat_and_from_reports(tmp_path):
    per_phase = {"3": {"full": 0.45, "zero": 0.19, "shuffle": 0.25, "noise": 0.24},
                 "4": {"full": 0.41, "zero": 0.22, "shuffle": 0.23, "noise": 0.23}}
    _check_png(figures.ablation_bars(per_phase, str(tmp_path / "ablation.png")))
    flat = {"full": {"macro_f1": 0.4}, "zero": {"macro_f1": 0.2}}
    _check_png(figures.ablation_bars(flat, str(tmp_path / "flat.png")), min_width=150)
    _one_line_error(lambda: figures.ablation_bars({}, str(tmp_path / "x.png")), "expected {condition: f1}")
    _one_line_error(lambda: figures.ablation_bars({"3": {"full": 0.4}, "4": 0.3}, str(tmp_path / "x.png")),
                    "phase '4' needs {condition: f1}")


def test_component_bars_draw_each_ablation_with_its_ci(tmp_path):
    rows = [("Full model", 0.82, 0.80, 0.84), ("no zone constraint", 0.75, 0.72, 0.78), ("no EWC", 0.81, None, None)]
    _, height = _check_png(figures.component_bars(rows, str(tmp_path / "xi.png")))
    _, taller = _check_png(figures.component_bars(rows * 3, str(tmp_path / "xi9.png")))
    assert taller > height                                  # one bar a row
    _one_line_error(lambda: figures.component_bars([], str(tmp_path / "x.png")), "expected rows of")
    _one_line_error(lambda: figures.component_bars([("a", 0.5)], str(tmp_path / "x.png")), "expected rows of")


def test_zone_evidence_finds_the_planted_zone():
    planted = {0: 2, 5: 6, 9: 2}
    tokens, labels = _planted(planted=tuple(planted.items()))
    evidence = figures.zone_evidence(tokens, labels)
    assert evidence.shape == (18, 8)
    for c, z in planted.items():
        assert evidence[c].argmax() == z
        assert evidence[c, z] > 0.8
    # Everything else is noise: out-of-fold AUC stays near chance (in-sample it would not).
    mask = np.ones_like(evidence, bool)
    for c, z in planted.items():
        mask[c, z] = False
    assert abs(np.nanmean(evidence[mask]) - 0.5) < 0.02
    assert np.nanmax(evidence[mask]) < 0.65
    assert np.array_equal(evidence, figures.zone_evidence(tokens, labels), equal_nan=True)


def test_zone_evidence_auc_matches_sklearn_and_rare_classes_are_nan():
    rng = np.random.default_rng(3)
    scores = np.round(rng.standard_normal((60, 4)), 1)     # rounded: ties exercise the mid-ranks
    labels = (rng.random((60, 4)) < 0.4).astype(np.int8)
    expected = [skm.roc_auc_score(labels[:, c], scores[:, c]) for c in range(4)]
    assert figures._auc_columns(scores, labels.astype(float)) == pytest.approx(expected)
    tokens, labels = _planted(m=60, zones=3, planted=((0, 1),))
    labels[:, 7] = 0
    labels[0, 7] = 1                                         # one positive: fewer than 2 folds
    evidence = figures.zone_evidence(tokens, labels)
    assert np.isnan(evidence[7]).all() and not np.isnan(evidence[0]).any()
    _one_line_error(lambda: figures.zone_evidence(tokens[:, 0], labels), "tokens [M, Z, D]")
    _one_line_error(lambda: figures.zone_evidence(tokens, labels[:-1]), "labels [M, C]")
    _one_line_error(lambda: figures.zone_evidence(tokens, labels * 2), "0/1")


def test_zone_map_of_evidence_end_to_end(tmp_path):
    tokens, labels = _planted(zones=32, m=200)
    path = figures.zone_attention_map(figures.zone_evidence(tokens, labels), str(tmp_path / "map.png"),
                                      class_names=findings.CLASS_NAMES)
    _check_png(path)


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    """A notebook's inline backend survives a figure: drawing never imports pyplot nor switches backend."""
    script = ("import sys, matplotlib; matplotlib.use('svg'); from kervljepa_jax import figures; "
              f"figures.ablation_bars({{'full': 0.8, 'zero': 0.1}}, {str(tmp_path / 'a.png')!r}); "
              "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "False"]
    _check_png(tmp_path / "a.png", min_width=100, min_height=100)
