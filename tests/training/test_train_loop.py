"""train.py's phase loop in process on a tiny run (issue 25): a save on a step already saved, resume
after phase 3's LoRA freeze, a stop after too many non-finite steps, one metrics.jsonl record per
step after a resume, early stopping, and which errors reach the user as one line."""

import logging
import sys

import pytest

from kervljepa_jax import train
from kervljepa_jax.training import checkpoint as ckpt_lib
from kervljepa_jax.training import run as run_lib


def test_orbax_info_is_filtered_and_its_warnings_kept():
    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "m", (), None)
    orbax = "/x/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not train.without_orbax_info(record(orbax, logging.INFO))
    assert train.without_orbax_info(record(orbax, logging.WARNING))
    assert train.without_orbax_info(record(orbax, logging.ERROR))
    assert train.without_orbax_info(record("/x/kervljepa_jax/train.py", logging.INFO))


@pytest.fixture
def main_flags(tmp_path, monkeypatch):
    argv = ["train", "--phase=1", f"--workdir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    train.FLAGS(argv)
    yield
    train.FLAGS.unparse_flags()


def test_main_shows_a_bugs_traceback_and_a_user_errors_one_line(main_flags, monkeypatch, capsys):
    """25.8: only the project's own error types become one line."""
    def raising(error):
        def run_curriculum(*args, **kwargs):
            raise error
        return run_curriculum
    monkeypatch.setattr(train, "run_curriculum", raising(KeyError("internal")))
    with pytest.raises(KeyError, match="internal"):
        train.main(["train"])
    monkeypatch.setattr(train, "run_curriculum", raising(ValueError("internal")))
    with pytest.raises(ValueError, match="internal"):
        train.main(["train"])
    for error in (run_lib.TrainError("a user mistake\nmore"), ckpt_lib.CheckpointError("a full disk")):
        monkeypatch.setattr(train, "run_curriculum", raising(error))
        with pytest.raises(SystemExit) as exit_info:
            train.main(["train"])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"train: {str(error).splitlines()[0]}"]
