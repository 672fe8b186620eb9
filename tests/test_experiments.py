"""The paper's tables from a workdir: Table IX laid out from the final evaluation's ablations (no
model run), and one-line errors; Tables VI and X run models and are exercised on the default run
(tests/test_train.py, slow)."""

import json
import os
import subprocess
import sys

from kervljepa_jax import experiments


def _scores(f1, n=128):
    return {"macro_f1": f1, "precision": f1 + 0.01, "recall": f1 - 0.01, "num_volumes": n, "full_macro_f1": 0.8,
            "macro_f1_ci": {"macro_f1": f1, "low": f1 - 0.02, "high": f1 + 0.02}}


def _workdir(tmp_path):
    for phase in (3, 4):
        (tmp_path / f"phase{phase}" / "checkpoints" / "16").mkdir(parents=True)
        metrics = {"ablations": {"zero": _scores(0.2), "shuffle": _scores(0.3), "noise": _scores(0.25)}}
        (tmp_path / f"phase{phase}" / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_table_ix_is_laid_out_from_the_saved_ablations(tmp_path):
    path = experiments.build("IX", str(_workdir(tmp_path)))
    text = open(path).read()
    assert "| 3 | Zeroed | 0.200 [0.180, 0.220] | 0.210 | 0.190 | -75.0% | 128 |" in text
    assert "| 4 | Shuffled (other patient) | 0.300 [0.280, 0.320]" in text
    assert os.path.isfile(tmp_path / "experiments" / "table_IX.png")


def test_a_workdir_without_the_phases_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.experiments", "--table=IX", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "no trained phase among [3, 4]" in lines[0], out.stderr
