"""Phase configs: the embedded profile table, typed command-line overrides, JSON round trips."""

import json

import pytest

from kervljepa_jax.training import config as config_lib


def _phase(phase, overrides=None):
    return config_lib.apply_overrides(config_lib.load_phase_config(phase), overrides or {})


def test_command_line_overrides_are_typed_and_checked():
    pairs = config_lib.command_line_overrides(["--phase=3", "--config.train.lr=0.5", "--config.train.epochs", "7",
                                               "--config.data.skip_bad_records=true",
                                               "--config.optimizer_groups=['predictor/.*']"])
    assert pairs == {"train.lr": "0.5", "train.epochs": "7", "data.skip_bad_records": "true",
                     "optimizer_groups": "['predictor/.*']"}
    config = _phase(3, pairs)
    assert config.train.lr == 0.5 and config.train.epochs == 7 and config.data.skip_bad_records is True
    assert list(config.optimizer_groups) == ["predictor/.*"] and config.phase == 3
    with pytest.raises(config_lib.OverrideError, match="train.no_such_field"):
        _phase(2, {"train.no_such_field": "1"})
    with pytest.raises(config_lib.OverrideError, match="no field 'nope'"):
        _phase(2, {"nope.lr": "1"})
    with pytest.raises(config_lib.OverrideError, match="not a bool"):
        _phase(2, {"data.skip_bad_records": "maybe"})
    with pytest.raises(config_lib.OverrideError, match="float"):
        _phase(2, {"train.lr": "fast"})
    with pytest.raises(config_lib.OverrideError, match="list"):
        _phase(3, {"optimizer_groups": "30.0"})


def test_override_spans_cover_both_spellings_and_a_dangling_flag():
    argv = ["--config.train.lr=0.5", "--phase=3", "--config.train.epochs", "7", "--config.optimizer_groups"]
    assert config_lib.override_spans(argv) == [("train.lr", "0.5", 0, 1), ("train.epochs", "7", 2, 4),
                                               ("optimizer_groups", "", 4, 5)]


def test_field_value_walks_dotted_keys():
    config = _phase(3)
    assert config_lib.field_value(config, "train.lr") == config.train.lr
    assert config_lib.field_value(config, "train.nope") is config_lib.MISSING
    assert config_lib.field_value(config, "train.lr.deeper") is config_lib.MISSING
    assert config_lib.field_value(config, "optimizer_groups[1].freeze_after_epoch") == 0    # the default's LoRA
    assert config_lib.field_value(config, "optimizer_groups[99].lr_mult") is config_lib.MISSING


def test_one_field_of_one_optimizer_group_is_overridable():
    config = _phase(3, {"optimizer_groups[1].freeze_after_epoch": "26", "optimizer_groups[0].lr_mult": "2"})
    assert config.optimizer_groups[1]["freeze_after_epoch"] == 26 and config.optimizer_groups[0]["lr_mult"] == 2.0
    with pytest.raises(config_lib.OverrideError, match=r"^--config.optimizer_groups\[1\].lr: no field 'lr'"):
        _phase(3, {"optimizer_groups[1].lr": "2"})
    bad = _phase(3, {"optimizer_groups[1].lr_mult": "-1"})
    with pytest.raises(config_lib.OverrideError, match=r"^--config.optimizer_groups\[1\]: lr_mult=-1.0 must be >= 0"):
        config_lib.validate(bad)


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_every_phase_config_survives_its_json_round_trip(phase):
    # Checkpoints store the config as JSON and evaluation rebuilds the run from it, so a tuple inside a
    # list (which JSON turns into a list) would make the restored config differ from the trained one.
    config = _phase(phase).to_dict()
    assert json.loads(json.dumps(config)) == config


def test_list_overrides_are_stored_as_json_lists():
    config = _phase(3, {"optimizer_groups": "[{'pattern': 'predictor/.*', 'trust_ratio': (1.0, 30.0)}]"})
    assert config.optimizer_groups == [{"pattern": "predictor/.*", "trust_ratio": [1.0, 30.0]}]
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
