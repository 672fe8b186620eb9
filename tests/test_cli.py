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
    argv = ["train", "--phase=3", '--config.model.injection_layers=[0, 1]', "--config.train.lr=0.5",
            "--config.optimizer_groups", "['x/.*']", "--config.no_such_field=[1]"]
    held = cli_lib.hold_out_list_overrides(argv, config)
    assert held == {"model.injection_layers": '[0, 1]', "optimizer_groups": "['x/.*']"}
    # Scalars and unknown fields stay for config_flags (which reports an unknown field in one line).
    assert argv == ["train", "--phase=3", "--config.train.lr=0.5", "--config.no_such_field=[1]"]
    overrides = cli_lib.config_overrides(argv[1:])
    assert overrides == {"train.lr": "0.5", "no_such_field": "[1]", **held}
    config_lib.apply_overrides(config, {k: v for k, v in overrides.items() if k != "no_such_field"})
    assert config.model.injection_layers == [0, 1] and config.optimizer_groups == ["x/.*"] and config.train.lr == 0.5


def test_argv_without_list_overrides_is_untouched(clean_hold):
    argv = ["train", "--phase=1", "--config.train.epochs", "3", "--workdir=/tmp/w"]
    assert cli_lib.hold_out_list_overrides(argv, config_lib.load_phase_config(1)) == {}
    assert argv == ["train", "--phase=1", "--config.train.epochs", "3", "--workdir=/tmp/w"]
    assert cli_lib.held_out_overrides() == {}


def test_a_missing_config_file_fails_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_lib.check_config_file("train", ["--phase=all", "--config=configs/nope.py:paper"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train: --config=configs/nope.py:paper: no such file 'configs/nope.py'; use configs/phaseN.py[:paper]"]
    cli_lib.check_config_file("train", ["--config", str(config_lib.CONFIGS_DIR / "phase1.py") + ":paper"])
    cli_lib.check_config_file("train", ["--phase=1"])                      # no --config: nothing to check


def test_output_folders_are_made_up_front_or_fail_naming_the_flag(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cli_lib.ensure_folder("train", "workdir", str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir()
    cli_lib.ensure_parent("label", "output", str(tmp_path / "out" / "labels.csv"))
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / "labels.csv").exists()
    cases = [(cli_lib.ensure_folder, "workdir", a_file, "is a file"),
             (cli_lib.ensure_folder, "workdir", a_file / "run", "cannot create"),
             (cli_lib.ensure_parent, "output", a_file / "sub" / "labels.csv", "cannot create")]
    for check, flag, path, text in cases:
        with pytest.raises(SystemExit) as exit_info:
            check("prog", flag, str(path))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"prog: --{flag}={path}"), err
        assert text in err[0]
    cli_lib.ensure_folder("train", "workdir", "gs://bucket/run")           # remote: left to Orbax


def test_distributed_settings_from_flags_or_environment_or_none():
    from kervljepa_jax.cli import distributed_settings
    assert distributed_settings(environ={}) == {}              # JAX detects SLURM / MPI / TPU itself
    want = {"coordinator_address": "host:1234", "num_processes": 2, "process_id": 0}
    assert distributed_settings("host:1234", 2, 0, environ={}) == want
    env = {"KERVLJEPA_COORDINATOR": "host:1234", "KERVLJEPA_NUM_PROCESSES": "2", "KERVLJEPA_PROCESS_ID": "1"}
    assert distributed_settings(environ=env) == {**want, "process_id": 1}
    assert distributed_settings(process_id=0, environ=env) == want                # a flag wins
    with pytest.raises(ValueError, match="missing --num_processes, --process_id"):
        distributed_settings("host:1234", environ={})
    with pytest.raises(ValueError, match=r"--process_id=2: must be in \[0, 2\)"):
        distributed_settings("host:1234", 2, 2, environ={})
