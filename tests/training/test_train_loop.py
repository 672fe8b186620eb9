"""train.py's phase loop in process on a tiny run (issue 25): a save on a step already saved, resume
after phase 3's LoRA freeze, a stop after too many non-finite steps, one metrics.jsonl record per
step after a resume, early stopping, and which errors reach the user as one line."""

import copy
import json
import logging
import shutil
import sys

import pytest

from kervljepa_jax import train
from kervljepa_jax.training import checkpoint as ckpt_lib
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import run as run_lib
from kervljepa_jax.training.metric_log import MetricLog

TINY = {"data.num_train": "24", "data.num_valid": "8", "data.min_synthetic_slices": "40",
        "data.max_synthetic_slices": "60", "data.max_slices": "60", "model.pretrain_steps": "3",
        "model.pretrain_batch_size": "4", "model.pretrain_seq_len": "64", "eval.max_new_tokens": "4",
        "eval.num_examples": "8", "model.stand_in": "phase0", "checkpoint.async_save": "false"}


def _config(phase, workdir, **extra):
    config = config_lib.apply_overrides(config_lib.load_phase_config(phase),
                                        {**TINY, **{k: str(v) for k, v in extra.items()}})
    config.data.workdir = str(workdir)
    return config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A Run with a phase-0 base LLM and a 3-step phase 1 in its workdir."""
    workdir = tmp_path_factory.mktemp("base")
    run = run_lib.Run(_config(1, workdir), str(workdir))
    with train.sharding.use_mesh(run.mesh):
        train.train_phase(run, _config(1, workdir, **{"train.max_steps": 3}), 1)
    return run


@pytest.fixture
def run(base, tmp_path):
    """The base run in a fresh workdir of its own (base LLM, whitening and phase 1 copied)."""
    for item in ("base_llm", "whitening.npz", "phase1"):
        src = f"{base.workdir}/{item}"
        (shutil.copytree if item != "whitening.npz" else shutil.copy)(src, tmp_path / item)
    forked = copy.copy(base)
    forked.workdir, forked.log = str(tmp_path), MetricLog(str(tmp_path))
    return forked


def _train(run, phase, **extra):
    config = _config(phase, run.workdir, **extra)
    with train.sharding.use_mesh(run.mesh):
        return train.train_phase(run, config, phase, init_from=f"{run.workdir}/phase1" if phase == 3 else "")


def _records(run, phase):
    return [r for r in map(json.loads, open(f"{run.workdir}/metrics.jsonl")) if r["phase"] == phase]


@pytest.mark.slow       # ~40 s on 2 cores
def test_phase3_resumes_after_its_lora_freeze(run):
    """Saved every epoch end twice over (every_steps = the 3 steps of an epoch: 25.1), LoRA frozen
    after epoch 1; a longer rerun restores onto the frozen optimizer (25.2)."""
    args = {"optimizer_groups[1].freeze_after_epoch": 1, "checkpoint.every_steps": 3, "train.eval_every_epochs": 2}
    assert _train(run, 3, **args, **{"train.epochs": 2})["steps"] == 6
    host = ckpt_lib.PhaseCheckpointer(run.workdir, 3, read_only=True).latest_host()
    assert host["lora_frozen"] and host["epoch"] == 2
    assert _train(run, 3, **args, **{"train.epochs": 3})["steps"] == 9


@pytest.mark.slow       # ~32 s on 2 cores
def test_resume_logs_each_replayed_step_once(run):
    """A crash after step 4 with the last checkpoint at step 2: steps 3-4 run again (25.5)."""
    args = {"checkpoint.every_steps": 2, "train.max_steps": 4, "train.log_every": 1, "train.batch_size": 8,
            "train.eval_every_epochs": 2}
    _train(run, 2, **args)
    folder = ckpt_lib.phase_directory(run.workdir, 2)
    shutil.rmtree(folder / "4")
    _train(run, 2, **args)
    kinds = [(r["step"], "loss" in r) for r in _records(run, 2)]
    assert sorted(kinds) == [(1, True), (2, True), (3, True), (4, False), (4, True)], kinds


def test_nonfinite_steps_stop_the_phase_at_the_limit(run):
    """Two non-finite steps in a row with train.max_consecutive_nonfinite=2: the phase stops at the
    second, each skipped step is in metrics.jsonl, the last checkpoint stays (25.3)."""
    args = {"train.max_steps": 2, "train.batch_size": 8, "train.max_consecutive_nonfinite": 2}
    _train(run, 2, **args)
    args["train.max_steps"] = 6
    with pytest.raises(run_lib.TrainError, match=r"^phase 2 stopped at step 4: 2 non-finite gradients in a row "
                                                 r"\(--config.train.max_consecutive_nonfinite=2\)") as err:
        _train(run, 2, **args, **{"loss_weights.infonce": "nan"})
    assert "\n" not in str(err.value)
    skipped = [(r["step"], r["skipped_steps"]) for r in _records(run, 2) if r["step"] > 2]
    assert skipped == [(3, 1), (4, 2)]
    assert ckpt_lib.PhaseCheckpointer(run.workdir, 2, read_only=True).all_steps() == [2]


def test_early_stopping_counts_evaluations_without_improvement(run, caplog):
    """lr 0: every evaluation equals the first, so patience 2 stops after the third (25.7)."""
    args = {"train.lr": 0, "train.epochs": 8, "train.eval_every_epochs": 1, "early_stop.patience": 2}
    caplog.set_level(logging.INFO)
    assert _train(run, 2, **args)["steps"] == 3            # 1 step an epoch (24 volumes, batch 16)
    assert "phase 2: early stop after epoch 3 (step 3): val_loss has not improved for 2 evaluations" in caplog.text
    assert _train(run, 2, **args)["steps"] == 3            # a rerun resumes into the stop, trains nothing
    with pytest.raises(run_lib.TrainError, match="--config.early_stop.metric='val_gen_f1': phase 2 validates"):
        _train(run, 2, **{**args, "early_stop.metric": "val_gen_f1"})


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


def test_alpha_is_recalibrated_every_n_steps_and_resumed_exactly(run):
    """Phase 2 (compressor and predictor train) with calibration.every_steps=2: alpha at steps 2 and 4
    is eq. 6 on that step's batch with that step's params, saved with the checkpoint; a crash after
    step 4 with the last checkpoint at step 2 resumes with step 2's alpha and recalibrates to the same
    step-4 alpha."""
    args = {"calibration.every_steps": 2, "checkpoint.every_steps": 2, "train.max_steps": 4,
            "train.batch_size": 8, "train.log_every": 1, "train.eval_every_epochs": 2}
    _train(run, 2, **args)
    folder = ckpt_lib.phase_directory(run.workdir, 2)
    start = ckpt_lib.restore_params(f"{run.workdir}/phase1", run.abstract_params, run.llm_params)[1]["alpha"]
    saved = {s: ckpt_lib.restore_params(folder / str(s), run.abstract_params, run.llm_params) for s in (2, 4)}
    alphas = {s: meta["alpha"] for s, (_, meta) in saved.items()}
    assert len({start, alphas[2], alphas[4]}) == 3, (start, alphas)
    logged = {r["step"]: r["alpha"] for r in _records(run, 2) if "alpha" in r}
    assert logged == {1: start, 2: alphas[2], 3: alphas[2], 4: alphas[4]}
    config = _config(2, run.workdir, **args)
    batches = run.pipeline(config, "train").epoch(0)
    second = [train.evaluate.as_jnp(b) for _, b in zip(range(2), batches)][1]
    with train.sharding.use_mesh(run.mesh):
        expected = run_lib.calibrate(train.vlm_lib.VLM(run.vcfg), run_lib.restored_variables(saved[2][0], start),
                                     second, run.text_rows)
    assert run_lib.alpha_of(expected) == pytest.approx(alphas[2], rel=1e-6)

    shutil.rmtree(folder / "4")
    _train(run, 2, **args)
    logged = {r["step"]: r["alpha"] for r in _records(run, 2) if "alpha" in r}
    assert logged[3] == alphas[2]                         # the resumed alpha, exactly
    resumed = ckpt_lib.restore_params(folder / "4", run.abstract_params, run.llm_params)[1]["alpha"]
    assert resumed == pytest.approx(alphas[4], rel=1e-6)


def test_paper_whitening_is_fitted_on_the_training_reports(run):
    """model.whiten_texts="reports" (the paper profile's): the whitening's mean is that of the
    training reports' embeddings as a raw-text phase's batches carry them, and its report says so;
    too few reports for the whitening's width is one line naming the flag, before any is embedded."""
    import numpy as np

    from kervljepa_jax.data import pipeline as pipeline_lib

    # 160 reports: a 64-component whitening needs more than 64 texts spanning 64 dimensions.
    reports = _config(4, run.workdir, **{"model.whiten_texts": "reports", "data.num_train": 160})
    w, stats, raw = run.targets.fit_whitening(reports, run.pipeline(reports, "train"))
    assert raw is None and stats["texts"] == "reports" and stats["num_texts"] == 160
    assert {"d_prime_before", "d_prime_after", "mean_cosine_before"} <= set(stats)
    raw_text = pipeline_lib.Pipeline(reports.data, "train", run.tokenizer)         # phase 4: text_mode raw
    report_rows = run.targets.embedded_rows(raw_text)["target"]
    np.testing.assert_allclose(w.mean, report_rows.mean(0), rtol=1e-5, atol=1e-6)
    assert config_lib.load_phase_config(1, "paper").model.whiten_texts == "reports"
    assert config_lib.load_phase_config(1).model.whiten_texts == "targets"
    with pytest.raises(run_lib.TrainError, match="--config.model.whiten_texts='words'"):
        words = _config(1, run.workdir, **{"model.whiten_texts": "words"})
        run.targets.fit_whitening(words, run.pipeline(words, "train"))
    with pytest.raises(run_lib.TrainError, match="^--config.model.whiten_texts=reports: 24 training reports cannot "
                                                 "fit a 64-dimensional whitening"):
        few = _config(1, run.workdir, **{"model.whiten_texts": "reports"})
        run.targets.fit_whitening(few, run.pipeline(few, "train"))


def test_a_trained_step_leaves_the_base_llm_out_and_restores_it_whole(base):
    """25.7 on a real phase 1: every base LLM leaf the phase leaves frozen is named in the step's
    `frozen` record, not saved; restore puts the run's base LLM back in, bitwise; a base LLM that
    changed since is one line naming the folder it came from."""
    import jax
    import numpy as np

    from kervljepa_jax.training import phases

    step_dir = ckpt_lib.resolve_step_dir(f"{base.workdir}/phase1")
    record = ckpt_lib.read_json(step_dir / ckpt_lib.FROZEN)
    left_out = set(record["digests"])
    llm = {f"llm/{p}" for p in phases.leaf_paths(base.llm_params)}
    assert left_out == {p for p in llm if "lora_" not in p}      # LoRA comes from the seed: saved
    assert record["folder"] == f"{base.workdir}/base_llm"
    assert not left_out & set(ckpt_lib._stored_shapes(step_dir / ckpt_lib.PARAMS))
    params, _ = ckpt_lib.restore_params(step_dir, base.abstract_params, base.llm_params)
    flat = dict(zip(phases.leaf_paths(params), jax.tree.leaves(params)))
    for path, leaf in zip(phases.leaf_paths(base.llm_params), jax.tree.leaves(base.llm_params)):
        assert np.asarray(flat[f"llm/{path}"]).tobytes() == np.asarray(leaf).tobytes(), path
    changed = jax.tree.map(lambda x: x, base.llm_params)
    changed["model"]["norm"]["weight"] = changed["model"]["norm"]["weight"] + 1
    with pytest.raises(ckpt_lib.CheckpointError, match=f"{step_dir}: its frozen weights come from the base LLM "
                       f"{base.workdir}/base_llm, but 1 of those"):
        ckpt_lib.restore_params(step_dir, base.abstract_params, changed)
