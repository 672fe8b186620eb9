"""The command-line helpers: list-valued `--config.a.b` overrides are held out of config_flags."""

import pytest

from kervljepa_jax import cli as cli_lib
from kervljepa_jax.training import config as config_lib


@pytest.fixture
def clean_hold():
    cli_lib._held_out.clear()
    yield
    cli_lib._held_out.clear()


def test_list_overrides_leave_argv_in_both_spellings_and_come_back_with_the_others(clean_hold):
    config = config_lib.load_phase_config(3)
    argv = ["train", "--phase=3", '--config.train.lr_multipliers=[["a", 2.0]]', "--config.train.lr=0.5",
            "--config.trainable", "['x/.*']", "--config.no_such_field=[1]"]
    held = cli_lib.hold_out_list_overrides(argv, config)
    assert held == {"train.lr_multipliers": '[["a", 2.0]]', "trainable": "['x/.*']"}
    # Scalars and unknown fields stay for config_flags (which reports an unknown field in one line).
    assert argv == ["train", "--phase=3", "--config.train.lr=0.5", "--config.no_such_field=[1]"]
    overrides = cli_lib.config_overrides(argv[1:])
    assert overrides == {"train.lr": "0.5", "no_such_field": "[1]", **held}
    config_lib.apply_overrides(config, {k: v for k, v in overrides.items() if k != "no_such_field"})
    assert config.train.lr_multipliers == [["a", 2.0]] and config.trainable == ["x/.*"] and config.train.lr == 0.5


def test_argv_without_list_overrides_is_untouched(clean_hold):
    argv = ["train", "--phase=1", "--config.train.epochs", "3", "--workdir=/tmp/w"]
    assert cli_lib.hold_out_list_overrides(argv, config_lib.load_phase_config(1)) == {}
    assert argv == ["train", "--phase=1", "--config.train.epochs", "3", "--workdir=/tmp/w"]
    assert cli_lib.held_out_overrides() == {}
