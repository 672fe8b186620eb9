"""What the training tests share: the tiny run's configs (24 synthetic volumes, a 3-step phase 0)
and one Run on them per session (its set-up, a phase-0 base LLM, takes the most time)."""

import pytest

from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import run as run_lib

TINY = {"data.num_train": "24", "data.num_valid": "8", "data.min_synthetic_slices": "40",
        "data.max_synthetic_slices": "60", "data.max_slices": "60", "model.pretrain_steps": "3",
        "model.pretrain_batch_size": "4", "model.pretrain_seq_len": "64", "eval.max_new_tokens": "4",
        "model.stand_in": "phase0"}


@pytest.fixture(scope="session")
def tiny_config():
    """(phase=3, **overrides) -> the phase's config on the tiny run."""
    def make(phase=3, **extra):
        return config_lib.apply_overrides(config_lib.load_phase_config(phase), {**TINY, **extra})
    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config):
    return run_lib.Run(tiny_config(), str(tmp_path_factory.mktemp("run")))
