"""`python -m kervljepa_jax.whiten`: fits and saves the whitening training then loads, measures it,
keeps an existing one, and fails in one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from kervljepa_jax import whiten, whitening
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training.run import Run, TrainError

SMALL = {"data.num_train": "24", "data.num_valid": "8", "data.min_synthetic_slices": "40",
         "data.max_synthetic_slices": "60", "data.max_slices": "60"}


def _config():
    return config_lib.apply_overrides(config_lib.load_phase_config(1), SMALL)


def test_whiten_writes_what_training_loads(tmp_path):
    stats = whiten.whiten(_config(), str(tmp_path))
    path = tmp_path / "whitening.npz"
    assert stats["path"] == str(path) and path.is_file()
    assert stats["mean_cosine_after"] < 0.05 < stats["mean_cosine_before"]
    assert np.isfinite([stats["d_prime_before"], stats["d_prime_after"]]).all()
    assert 0.0 < stats["retained_variance"] <= 1.0 + 1e-9
    fitted = whitening.load(str(path))
    run = Run(_config(), str(tmp_path))
    run.targets.prepare(_config(), run.pipeline(_config(), "train"))     # loads it, does not refit
    np.testing.assert_array_equal(np.asarray(run.targets.whitening["projection"]),
                                  fitted.projection.astype(np.float32))
    with pytest.raises(TrainError, match="--overwrite"):
        whiten.whiten(_config(), str(tmp_path))
    before = os.path.getmtime(path)
    whiten.whiten(_config(), str(tmp_path), overwrite=True)
    assert os.path.getmtime(path) >= before


def test_cli_errors_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in [(["--config.model.nope=1"], "no field 'nope'"), ([], "--workdir is required"),
                          ([f"--workdir={a_file}"], "is a file; pass a folder"),
                          ([f"--workdir={tmp_path}", "--config=configs/nope.py"], "no such file")]:
        done = subprocess.run([sys.executable, "-m", "kervljepa_jax.whiten", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr[-500:]
