"""The paper's tables from a workdir: Table IX laid out from the final evaluation's ablations (no
model run), Table XI from finished ablation runs (resumed, no model run) and end to end on a small
run (slow), and one-line errors; Tables VI and X run models and are exercised on the default run
(tests/test_train.py, slow)."""

import json
import os
import subprocess
import sys

import pytest

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


def test_a_train_flag_without_its_dashes_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.experiments", "--table=VI", f"--workdir={tmp_path}",
                          "--train_flag=config.data.num_train=512"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--train_flag=config.data.num_train=512" in lines[0], out.stderr


def _finished_xi(tmp_path, names):
    """A workdir of four trained phases (phase 4 scored 0.8) whose XI runs `names` finished, each
    scoring 0.8 - 0.1 * (its place + 1)."""
    for phase in (1, 2):
        (tmp_path / f"phase{phase}" / "checkpoints" / "16").mkdir(parents=True)
    _workdir(tmp_path)
    (tmp_path / "phase4" / "metrics.json").write_text(json.dumps(_scores(0.8, 512)))
    for i, name in enumerate(names):
        run = tmp_path / "experiments" / "XI" / name
        run.mkdir(parents=True)
        (run / "report.json").write_text(json.dumps({"phase4": _scores(0.7 - 0.1 * i, 512)}))
    return tmp_path


def test_table_xi_lays_out_each_ablation_against_the_full_model(tmp_path):
    path = experiments.build("XI", str(_finished_xi(tmp_path, ["zones", "ewc"])), components=("zones", "ewc"))
    lines = open(path).read().splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0].startswith("| Configuration | Retrained from | Macro F1 [95% CI] | delta vs full |")
    assert rows[1] == "| Full model |  | 0.800 [0.780, 0.820] |  | 0.810 | 0.790 | 512 |"
    assert rows[2] == ("| w/o zone constraint (queries attend to all slices) | phase 1 | 0.700 [0.680, 0.720] | "
                       "-0.100 | 0.710 | 0.690 | 512 |")
    assert rows[3].startswith("| w/o EWC (lambda = 0) | phase 4 | 0.600 [0.580, 0.620] | -0.200 |")
    assert len(rows) == 4 and os.path.isfile(tmp_path / "experiments" / "table_XI.png")


def test_table_xi_needs_known_components_and_a_scored_phase_4(tmp_path):
    workdir = _finished_xi(tmp_path, [])
    with pytest.raises(experiments.ExperimentError, match="unknown 'dropout'"):
        experiments.table_xi(str(workdir), components=("zones", "dropout"))
    (workdir / "phase4" / "metrics.json").unlink()
    with pytest.raises(experiments.ExperimentError, match="phase 4 has no final evaluation"):
        experiments.table_xi(str(workdir), components=("ewc",))


def test_each_component_has_a_switch_the_config_knows():
    """Every XI override names an existing field and changes it in the first phase the rerun trains
    (a typo, or a switch that is already off there, would make the row a rerun of the full model)."""
    from kervljepa_jax.training import config as config_lib
    for name, (_, first, overrides) in experiments.COMPONENTS.items():
        config = config_lib.load_phase_config(first)
        before = {key: config_lib.field_value(config, key) for key in overrides}
        config_lib.apply_overrides(config, overrides)
        for key, value in before.items():
            assert value is not config_lib.MISSING and config_lib.field_value(config, key) != value, (name, key)


@pytest.mark.slow
def test_table_xi_retrains_each_ablation_from_its_first_phase(tmp_path, monkeypatch):
    """A 2-step-a-phase run; XI reruns no whitening (from phase 1, no whitening.npz), no adapters (from
    the workdir's phase 2) and no EWC (from the short full rerun's phase 3), each with its switch."""
    from tests.test_train import SMALL, _run
    workdir = tmp_path / "run"
    out = _run(["--phase=all", *SMALL], workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setenv("XLA_FLAGS", "")                         # one device, as the CLI runs it
    path = experiments.build("XI", str(workdir), phase3_epochs=1, components=("whitening", "xattn", "ewc"),
                             train_args=SMALL)
    rows = [line for line in open(path).read().splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and rows[1].startswith("| Full model |") and "trained phase 3 for 1 epoch" in open(path).read()
    xi = workdir / "experiments" / "XI"
    assert not (xi / "whitening" / "whitening.npz").exists() and (xi / "xattn" / "whitening.npz").is_file()
    from kervljepa_jax import evaluate
    saved = lambda name, phase: evaluate.saved_config(str(xi / name), phase)  # noqa: E731
    assert saved("whitening", 1)["model"]["whiten"] is False
    assert saved("xattn", 3)["model"]["xattn_adapters"] is False and saved("xattn", 2)["model"]["xattn_adapters"]
    from ml_collections import ConfigDict

    from kervljepa_jax.training import config as config_lib
    for key in experiments.switch_overrides("ewc"):               # lambda, wherever the config holds it
        lam = lambda name: config_lib.field_value(ConfigDict(saved(name, 4)), key)  # noqa: E731
        assert lam("ewc") == 0 and lam("full") > 0, key
    assert saved("ewc", 3)["train"]["epochs"] == 1                  # phase 3 of the short full rerun
