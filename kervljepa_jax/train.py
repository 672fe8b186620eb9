"""The four-phase curriculum (paper III-C, IV-B): `python -m kervljepa_jax.train`.

    python -m kervljepa_jax.train --phase=all --workdir=/tmp/kervljepa        # embedded default
    python -m kervljepa_jax.train --phase=3 --workdir=DIR --config=configs/phase3.py:paper \\
        --config.model.llm_path=/models/Llama-3.2-3B-Instruct --config.data.root=/data/ct-rate

With no data flags it runs the synthetic CT-RATE stand-in and the tiny preset. The tiny decoder
stands in for Llama 3.2 3B, which arrives knowing English: when no `model.llm_path` is given, the
packaged stand-in (`stand_in.py`, pretrained once outside the curriculum) is copied to
WORKDIR/base_llm as a HF Llama folder, or with `model.stand_in=phase0` a "phase 0" pretrains one
there on the training reports (text only); every later phase loads it exactly like a real
checkpoint (training/run.py).

Per phase N (WORKDIR/phaseN): resume from its latest checkpoint if any, else start from
--init_from or the best checkpoint of phase N-1 (phase 1: the base LLM + fresh bridge, with SVD
query/predictor init and alpha calibration); train with the phase table; evaluate; keep the best
and latest checkpoints; write metrics.jsonl + TensorBoard events. The phase ends early after
`early_stop.patience` evaluations without improvement (phase 2), and stops with an error after
`train.max_consecutive_nonfinite` skipped non-finite steps in a row. `--phase=all` runs 1-4, then
writes WORKDIR/report.json and the figures.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, evaluate, figures, sharding
from kervljepa_jax.data.records import DataError
from kervljepa_jax.hf import HFLoadError
from kervljepa_jax.model import bridge as bridge_lib
from kervljepa_jax.model import compressor as compressor_lib
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import checkpoint as ckpt_lib
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import feature_cache, optim, phases, run as run_lib, step as step_lib
# The shared run state lives in training/run.py; `train.Run` etc. stay the notebook-level names.
from kervljepa_jax.training.run import Run, TrainError, alpha_of, calibrate, fresh_params, restored_variables

FLAGS = flags.FLAGS
try:  # config_flags applies --config.a.b=v right here, at definition: a missing field fails now
    cli_lib.define_run_flags()
except (KeyError, AttributeError) as _error:
    cli_lib.bad_config_field(cli_lib.program_name(), sys.argv, _error)



# ----------------------------------------------------------------------------- configs


def phase_config(phase: int, arg: str | None, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """configs/phase{phase}.py:{arg} with the command line's `--config.a.b=v` overrides."""
    return config_lib.validate(config_lib.apply_overrides(config_lib.load_phase_config(phase, arg), overrides))


# ----------------------------------------------------------------------------- one phase


def no_previous_phase(phase: int, workdir: str) -> str:
    return (f"phase {phase}: no checkpoint of phase {phase - 1} in {workdir}; run phase {phase - 1} first or pass "
            "--init_from=PATH")


def starting_variables(run: Run, config, phase: int, init_from: str) -> dict:
    """--init_from, else the best checkpoint of phase N-1, else (phase 1) a fresh bridge."""
    if init_from:
        params, meta = ckpt_lib.restore_params(init_from, run.abstract_params, base=run.llm_params)
        return restored_variables(params, meta.get("alpha"))
    if phase > 1:
        prev_config = run.configs.get(phase - 1) or config_lib.load_phase_config(phase - 1, config.profile)
        prev = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, prev_config, phase - 1, read_only=True)
        restored = prev.restore_best(run.abstract_params, base=run.llm_params)
        prev.close()
        if restored is None:
            raise TrainError(no_previous_phase(phase, run.workdir))
        return restored_variables(restored.params, restored.alpha)
    first = next(iter(run.pipeline(config, "train", shuffle=False).epoch(0)))
    template = fresh_params(run.vcfg, run.llm_params, first, run.text_rows, int(config.train.seed))
    return calibrate(vlm_lib.VLM(run.vcfg), template, first, run.text_rows)


def text_table(run: Run, config, pipe):
    """`pipe`'s split's cached text targets when a weighted loss term of the phase reads them, else
    None (the default's LM-only phases 3-4 embed no text)."""
    if not step_lib.reads_text_targets(config.phase, dict(config.loss_weights)):
        return None
    return run.targets.table(pipe)


def validate(run: Run, config, variables: dict, eval_step, modes=("normal",)) -> dict:
    """Validation metrics of the phase: the loss, and the F1 of what `eval.score` names (the visual
    classifier's, or the generated reports')."""
    pipe = run.pipeline(config, "valid", shuffle=False)
    batches = evaluate.collect(pipe.epoch(0, feature_cache.join(pipe, text_table(run, config, pipe))),
                               int(config.eval.num_examples))
    terms = [sharding.as_host_f32(eval_step(variables["params"], variables["calibration"], evaluate.as_jnp(b),
                                            run.targets.consts()))
             for b in batches]
    out = {"val_loss": float(np.mean([t["loss"] for t in terms]))}
    if config.eval.score == "classifier":
        scored = evaluate.classifier_eval(run.classifier_logits(), variables, [evaluate.as_jnp(b) for b in batches])
        out["val_macro_f1"] = scored["macro_f1"]
    else:
        results = evaluate.generation_eval(run.report_generator(config), variables, batches, modes,
                                           labeler=evaluate.config_labeler(config))
        out["val_gen_f1"] = results["normal"]["macro_f1"]
        out["generation"] = results
    return out


def validation_metrics(config) -> tuple[str, ...]:
    """The scalars `validate` returns for the phase: what early stopping and model selection may watch."""
    return ("val_loss", config_lib.EVAL_SCORES[config.eval.score])


def early_stopping(config, phase: int) -> optim.EarlyStopping:
    """The phase's early stopping (phase 2: patience 8 on the validation loss, as the paper). A metric
    the phase never computes would never stop it, so it fails now rather than being ignored."""
    stopper = optim.EarlyStopping.from_config(config.early_stop)
    metric = config.early_stop.metric
    if stopper.patience > 0 and metric not in validation_metrics(config):
        raise TrainError(f"--config.early_stop.metric={metric!r}: phase {phase} validates "
                         f"{list(validation_metrics(config))}; choose one, or turn it off with "
                         "--config.early_stop.patience=0")
    return stopper


def host_state(epoch: int, iterator: Any, plateau, stopper, best: dict, lora_frozen: bool) -> dict:
    """The checkpoint's host item: what a resume needs beyond the arrays. `lora_frozen` says which
    optimizer the saved opt_state belongs to (phase 3 rebuilds it when LoRA freezes)."""
    return {"epoch": epoch, "iterator": iterator, "plateau": plateau.state_dict(),
            "early_stop": stopper.state_dict(), "best": best, "lora_frozen": lora_frozen}


def freeze_lora(config, labels, trainable, frozen, opt_state, steps_per_epoch: int):
    """Phase 3's LoRA freeze (paper: after epoch 6): LoRA joins the frozen half and the optimizer is
    rebuilt over the rest, its state kept wherever it still applies. -> labels, trainable, frozen, tx, opt_state."""
    labels = phases.freeze_scheduled(labels, config.optimizer_groups)
    trainable, frozen = phases.split_params(phases.merge_params(trainable, frozen), labels)
    tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch)
    return labels, trainable, frozen, tx, optim.transfer_state(opt_state, tx, trainable)


# Test hook (tests/training/test_resume.py): with KERVLJEPA_TEST_BATCH_LOG set, every step appends its
# batch's record indices (this process's rows) to WORKDIR/batches.jsonl: the order of the batches
# seen, which a resumed run must repeat. A replayed step appends again; its last line counts.
BATCH_LOG = "KERVLJEPA_TEST_BATCH_LOG"


def log_batch(workdir: str, phase: int, step: int, batch: dict) -> None:
    if os.environ.get(BATCH_LOG) and jax.process_index() == 0:
        with open(os.path.join(workdir, "batches.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": phase, "step": step,
                                "records": np.asarray(batch["record_index"]).tolist()}) + "\n")


def optimizer(config, params, labels, host: dict, steps_per_epoch: int, opt_state=None):
    """The phase's optimizer as the host state `host` of a checkpoint left it (LoRA frozen or not;
    {} at the start), over `params`: -> labels, trainable, frozen, tx, opt_state (`opt_state`, else
    a fresh one). The trainable leaves are copies: the step donates them, and a restored leaf may
    be the run's own base LLM array (a checkpoint leaves those to it)."""
    if host.get("lora_frozen", False):
        labels = phases.freeze_scheduled(labels, config.optimizer_groups)
    trainable, frozen = phases.split_params(params, labels)
    trainable = jax.tree.map(jnp.copy, trainable)
    tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch)
    return labels, trainable, frozen, tx, jax.jit(tx.init)(trainable) if opt_state is None else opt_state


def base_llm_record(run: Run, config, params, labels) -> dict:
    """The `frozen` record of the phase's checkpoints: the leaves frozen all phase long (the LoRA
    freeze aside: frozen LoRA was trained) that equal the run's base LLM, left out of every step."""
    frozen = jax.tree.map(lambda label: label == phases.FROZEN, labels)
    folder = config.model.llm_path or os.path.join(os.path.abspath(run.workdir), "base_llm")
    return ckpt_lib.frozen_record(params, ckpt_lib.base_leaves(params, frozen, run.llm_params), folder)


def compile_train_step(run: Run, phase: int, tx, weights: dict):
    return jax.jit(step_lib.make_train_step(phase, vlm_lib.VLM(run.vcfg, deterministic=False), run.targets.encoder,
                                            tx, weights), donate_argnums=(0, 2))


def stop_if_diverged(config, phase: int, step: int, streak: int, ckpt: ckpt_lib.PhaseCheckpointer) -> None:
    """Stop the phase after train.max_consecutive_nonfinite skipped (non-finite) steps in a row:
    one more and optax's apply_if_finite would apply the non-finite update. Skipped steps leave the
    params as they were, so the checkpoints on disk stay good; the in-flight save is let finish."""
    limit = int(config.train.max_consecutive_nonfinite)
    if streak and streak >= limit:
        ckpt.wait()
        raise TrainError(f"phase {phase} stopped at step {step}: {streak} non-finite gradients in a row "
                         f"(--config.train.max_consecutive_nonfinite={limit}); the last good checkpoint is in "
                         f"{ckpt.directory}; lower --config.train.lr or check the data, then rerun")


def trainable_labels(params, config, phase: int):
    try:
        return phases.trainable_labels(params, config.optimizer_groups, phase)
    except ValueError as e:    # a pattern that is no regex, or matches nothing: the user's list
        raise TrainError(f"--config.optimizer_groups: {e}") from e


def train_phase(run: Run, config, phase: int, init_from: str = "", warm_bridge_from: str = "") -> dict:
    t0 = time.time()
    config.phase = phase
    stopper = early_stopping(config, phase)
    train_pipe = run.pipeline(config, "train")
    run.targets.prepare(config, train_pipe)
    steps_per_epoch = train_pipe.steps_per_epoch()
    if steps_per_epoch < 1:
        raise TrainError(f"phase {phase}: data.batch_size={config.data.batch_size} exceeds the training set; "
                         "lower --config.train.batch_size")
    total = optim.total_steps(config.train, steps_per_epoch)
    variables = starting_variables(run, config, phase, init_from)
    if warm_bridge_from:
        params, n = ckpt_lib.restore_bridge(warm_bridge_from, variables["params"])
        variables = {**variables, "params": params}
        logging.info("warm bridge: restored %d tensors from %s", n, warm_bridge_from)
    variables = run.place(variables)
    labels = trainable_labels(variables["params"], config, phase)
    logging.info("phase %d trainable set:\n%s", phase, phases.trainable_table(variables["params"], labels,
                                                                              config.optimizer_groups))
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, config, phase)
    frozen_source = base_llm_record(run, config, variables["params"], labels)
    rng = jax.random.key(int(config.train.seed) + 100 * phase)
    step, epoch, iterator_state, plateau = 0, 0, None, optim.ReduceLROnPlateau.from_config(config.plateau)
    best, lora_frozen, params = {}, False, variables["params"]
    # The optimizer the saved state belongs to is the restored step's own (phase 3: before or after
    # the LoRA freeze), read from that step's host state: a damaged newer step is skipped with its.
    restored = ckpt.restore_latest(
        run.abstract_params, lambda host: optimizer(config, params, labels, host, steps_per_epoch)[-1],
        base=run.llm_params)
    host = restored.host if restored is not None else {}
    if restored is not None:
        params, lora_frozen = run.place({**variables, "params": restored.params})["params"], bool(
            host.get("lora_frozen", False))
    labels, trainable, frozen, tx, opt_state = optimizer(config, params, labels, host, steps_per_epoch,
                                                         restored.opt_state if restored is not None else None)
    if restored is not None:
        step, rng = restored.step, (restored.rng if restored.rng is not None else rng)
        # The checkpoint's alpha, recalibrations included, on the devices as `run.place` put it.
        variables = run.place(bridge_lib.with_alpha(variables, restored.alpha or alpha_of(variables),
                                                    vlm_lib.CALIBRATOR_PATH))
        epoch, iterator_state = restored.host.get("epoch", 0), restored.host.get("iterator")
        plateau.load_state_dict(restored.host.get("plateau", plateau.state_dict()))
        stopper.load_state_dict(restored.host.get("early_stop", stopper.state_dict()))
        best = restored.host.get("best", {})
        logging.info("phase %d: resumed at step %d (epoch %d) from %s", phase, step, epoch, ckpt.directory)
    run.log.drop_after(phase, step)     # the steps past the checkpoint run (and are logged) again

    # The step's per-record inputs computed once (the text targets per run, V' per phase), joined
    # to each of this process's batches by record_index.
    visual = feature_cache.compressor_tokens(config, run.vcfg.compressor, phases.merge_params(trainable, frozen),
                                             labels, train_pipe)
    join = feature_cache.join(train_pipe, text_table(run, config, train_pipe), visual)
    weights = dict(config.loss_weights)
    eval_model = vlm_lib.VLM(run.vcfg)
    recalibrate_every = run_lib.recalibration_interval(config, variables["params"], labels)
    train_step = compile_train_step(run, phase, tx, weights)
    eval_step = jax.jit(step_lib.make_eval_step(phase, eval_model, run.targets.encoder, weights))
    epochs = int(config.train.epochs)
    bar = tqdm.tqdm(total=total, initial=step, desc=f"phase {phase}", disable=jax.process_index() != 0)
    last_metrics: dict = {}
    while step < total and epoch < epochs and not stopper.should_stop():
        if 0 < phases.freeze_epoch(config.optimizer_groups) <= epoch and not lora_frozen:
            labels, trainable, frozen, tx, opt_state = freeze_lora(config, labels, trainable, frozen, opt_state,
                                                                   steps_per_epoch)
            lora_frozen, train_step = True, compile_train_step(run, phase, tx, weights)
            logging.info("phase %d: LoRA frozen after epoch %d (one recompilation)", phase, epoch)
        iterator = train_pipe.restore(iterator_state, join) if iterator_state else train_pipe.epoch(epoch, join)
        iterator_state = None
        t_epoch, n_steps = time.time(), 0
        for batch in iterator:
            rng, key = jax.random.split(rng)
            host_batch = evaluate.as_jnp(batch)
            log_batch(run.workdir, phase, step + 1, batch)
            trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, variables["calibration"],
                                                       host_batch, key, run.targets.consts())
            ckpt_lib.kill_point(phase, "step", step + 1)
            step += 1
            n_steps += 1
            if recalibrate_every and step % recalibrate_every == 0:   # before a save at this step
                calibrated = calibrate(eval_model, {"params": phases.merge_params(trainable, frozen),
                                                    "calibration": variables["calibration"]}, host_batch, run.text_rows)
                variables = {**variables, "calibration": jax.device_put(calibrated["calibration"], run.replicated)}
            streak = optim.consecutive_nonfinite(opt_state)   # a host sync per step, to stop in time
            if step % int(config.train.log_every) == 0 or step == total or streak:   # every skipped step
                last_metrics = {k: float(v) for k, v in sharding.as_host_f32(metrics).items()}
                last_metrics["lr"] = optim.learning_rate(opt_state)
                last_metrics["skipped_steps"] = optim.skipped_steps(opt_state)
                last_metrics["alpha"] = alpha_of(variables)
                run.log.write(phase, step, last_metrics)
                rate = n_steps * int(config.train.batch_size) / max(time.time() - t_epoch, 1e-6)
                bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", vol_s=f"{rate:.1f}")
            bar.update(1)
            stop_if_diverged(config, phase, step, streak, ckpt)
            if ckpt.should_save(step):
                ckpt.save(step, params=phases.merge_params(trainable, frozen), opt_state=opt_state, rng=rng,
                          alpha=alpha_of(variables), config=config, frozen=frozen_source,
                          host=host_state(epoch, iterator.get_state(), plateau, stopper, best, lora_frozen))
            if step >= total:
                break
        epoch += 1
        variables = {**variables, "params": phases.merge_params(trainable, frozen)}
        if epoch % int(config.train.eval_every_epochs) == 0 or step >= total or epoch >= epochs:
            val = validate(run, config, variables, eval_step)
            scalars = {k: v for k, v in val.items() if isinstance(v, float)}
            run.log.write(phase, step, scalars)
            logging.info("phase %d epoch %d step %d: %s", phase, epoch, step, json.dumps(scalars))
            if config.plateau.enabled and config.plateau.metric in scalars and plateau.step(scalars[config.plateau.metric]):
                opt_state = plateau.apply(opt_state)
                logging.info("phase %d: plateau, lr scale now %.3g", phase, optim.lr_scale(opt_state))
            if stopper.patience and stopper.step(scalars[config.early_stop.metric]):
                logging.info("phase %d: early stop after epoch %d (step %d): %s has not improved for %d evaluations "
                             "(best %s)", phase, epoch, step, config.early_stop.metric, stopper.num_bad, stopper.best)
            metric_name = config.checkpoint.best_metric
            if metric_name in scalars:
                best.setdefault("history", []).append(scalars[metric_name])
            ckpt.save(step, params=variables["params"], opt_state=opt_state, rng=rng, alpha=alpha_of(variables),
                      config=config, metrics=scalars if metric_name in scalars else None, frozen=frozen_source,
                      host=host_state(epoch, None, plateau, stopper, best, lora_frozen))
    bar.close()
    ckpt.wait()
    ckpt.close()
    result = {"steps": step, "wall_seconds": time.time() - t0, "train": last_metrics}
    return result


# ----------------------------------------------------------------------------- final evaluation


def final_evaluation(run: Run, config, phase: int, ablations: tuple[str, ...]) -> dict:
    """The phase's best checkpoint on the validation split, evaluated as `python -m kervljepa_jax.evaluate`
    does (metrics.json, reports.csv and figures in WORKDIR/phaseN); returns the headline numbers."""
    loaded = evaluate.restore_phase(run, config, phase)
    options = evaluate.EvalOptions(ablations=ablations if config.eval.score == "generation" else ())
    payload = evaluate.evaluate_phase(loaded, options, os.path.join(run.workdir, f"phase{phase}"))
    return evaluate.headline_numbers(payload)


# ----------------------------------------------------------------------------- main


def check_scores(config) -> None:
    """eval.score needs what it reads (generated reports need a phase that trains the decoder), and
    the metrics that select and stop must be ones validation computes: else a KeyError at the first
    save, or an early stop that never fires."""
    phase = int(config.phase)
    if config.eval.score == "generation" and "lm" not in step_lib.LOSS_TERMS[phase]:
        raise TrainError(f"--config.eval.score=generation: phase {phase} trains no language path; "
                         "score its visual classifier (eval.score=classifier)")
    computed = validation_metrics(config)
    if config.checkpoint.best_metric not in computed:
        raise TrainError(f"--config.checkpoint.best_metric={config.checkpoint.best_metric!r}: phase {phase} "
                         f"validates {list(computed)} (eval.score={config.eval.score!r}); choose one")


def check_before_set_up(config, workdir: str, init_from: str) -> None:
    """What can be known wrong from the config alone, before minutes of set-up and compilation: the
    mesh and batch, the preset, the compressor's sizes, the loss weights, the labeler's paths, and a
    checkpoint (resumed or --init_from) of another model."""
    run_lib.check_layout(config)
    llama_lib.preset(config.model.preset)
    compressor_lib.CompressorConfig(d_visual=int(config.model.d_visual), num_zones=int(config.model.num_visual_tokens))
    step_lib.check_loss_weights(int(config.phase), dict(config.loss_weights))
    check_scores(config)
    if evaluate.labeler_problem(config):
        raise TrainError(evaluate.labeler_problem(config))
    if init_from:
        ckpt_lib.check_same_model(init_from, config, f"--init_from={init_from}")
    if ckpt_lib.has_checkpoint(workdir, int(config.phase)):
        ckpt_lib.check_same_model(ckpt_lib.phase_directory(workdir, int(config.phase)), config, f"--workdir={workdir}")


def run_curriculum(phases_to_run: list[int], workdir: str, arg: str | None, overrides: dict[str, str],
                   explicit_config=None, init_from: str = "", warm_bridge_from: str = "") -> dict:
    configs = {p: explicit_config if explicit_config is not None else phase_config(p, arg, overrides)
               for p in phases_to_run}
    for config in configs.values():
        if {"train.batch_size", "data.batch_size"} & set(overrides) and "train.batch_per_device" not in overrides:
            config.train.batch_per_device = 0       # a global batch given on the command line wins
        config_lib.resolve_batch(config, jax.device_count())
        check_before_set_up(config, workdir, init_from if config is configs[phases_to_run[0]] else "")
    first = phases_to_run[0]
    if first > 1 and not init_from and not ckpt_lib.has_checkpoint(workdir, first - 1):
        raise TrainError(no_previous_phase(first, workdir))   # before minutes of set-up, not after
    t0 = time.time()          # wall_seconds is the whole job: tokenizer, phase 0, whitening, phases, evaluations
    run = Run(configs[phases_to_run[0]], workdir)
    run.configs = configs
    report: dict[str, Any] = {"setup_seconds": time.time() - t0}
    for p in phases_to_run:
        config = configs[p]
        config.data.workdir = workdir
        with sharding.use_mesh(run.mesh):  # logical constraints resolve on the mesh while tracing
            result = train_phase(run, config, p, init_from if p == phases_to_run[0] else "",
                                 warm_bridge_from if p == 3 else "")
            evaluation = final_evaluation(run, config, p, evaluate.ABLATIONS)
        report[f"phase{p}"] = {**evaluation, "wall_seconds": result["wall_seconds"], "steps": result["steps"]}
        ckpt_lib.kill_point(p, "end", result["steps"])
        logging.info("phase %d done: %s", p, json.dumps({k: v for k, v in report[f'phase{p}'].items()
                                                          if not isinstance(v, dict)}))
    report["wall_seconds"] = time.time() - t0
    if jax.process_index() == 0:
        evaluate.write_json(os.path.join(workdir, "report.json"), report)
        write_figures(workdir, report)
    return report


def write_figures(workdir: str, report: dict) -> None:
    try:
        figures.loss_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curves.png"))
        abl = {name: evaluate.ablation_bar_values(r["ablations"]) for name, r in report.items()
               if isinstance(r, dict) and r.get("ablations")}
        if abl:
            figures.ablation_bars(abl, os.path.join(workdir, "ablations.png"))
    except ValueError as e:  # a figure must never lose a finished run
        logging.warning("figures: %s", e)


# The user's mistakes and faults, each raised with a one-line message that names the flag or file;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (TrainError, DataError, config_lib.OverrideError, ckpt_lib.CheckpointError, evaluate.EvalError,
               HFLoadError, llama_lib.ModelConfigError)


def without_orbax_info(record: pylogging.LogRecord) -> bool:
    """absl log filter: Orbax narrates every save at INFO; drop that, keep its warnings and errors."""
    return "orbax" not in record.pathname or record.levelno >= pylogging.WARNING


def _fail(message: str) -> None:
    cli_lib.fail("train", message, 2)


def check_flags(config_path: str, overrides: dict[str, str]) -> None:
    """Flag mistakes that would otherwise surface after minutes of set-up, or never."""
    if FLAGS.warm_bridge_from and FLAGS.phase not in ("3", "all"):
        _fail(f"--warm_bridge_from applies to phase 3 only (--phase={FLAGS.phase}); drop it or run --phase=3")
    for name in ("init_from", "warm_bridge_from"):
        path = FLAGS[name].value
        if path and cli_lib.is_local(path) and not os.path.exists(path):
            _fail(f"--{name}={path}: no such checkpoint folder; pass a phaseN/checkpoints folder or one step in it")
    for key in ("model.llm_path", "data.tokenizer_path", "data.root"):
        path = overrides.get(key, "")
        if path and cli_lib.is_local(path) and not os.path.exists(path):
            _fail(f"--config.{key}={path}: not found; pass an existing local path")
    if FLAGS.phase != "all" and config_path:
        phase = int(FLAGS.config.phase)
        if phase != int(FLAGS.phase):
            _fail(f"--config={config_path} is the phase {phase} config but --phase={FLAGS.phase}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --phase, --workdir, --config, ...")
    if not FLAGS.workdir:
        _fail("--workdir is required: where checkpoints, logs and report.json go")
    config_path = cli_lib.config_file_argument(sys.argv[1:])
    overrides = cli_lib.config_overrides(sys.argv[1:])
    check_flags(config_path, overrides)
    cli_lib.ensure_folder("train", "workdir", FLAGS.workdir)
    if FLAGS.distributed:
        cli_lib.initialize_distributed("train", FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.get_absl_handler().addFilter(without_orbax_info)     # keep the log about training
    arg = config_path.split(":", 1)[1] if ":" in config_path else None
    phases_to_run = [1, 2, 3, 4] if FLAGS.phase == "all" else [int(FLAGS.phase)]
    explicit = FLAGS.config if FLAGS.phase != "all" and config_path else None
    try:
        if explicit is not None:       # config_flags applied the other overrides to it
            config_lib.validate(config_lib.apply_overrides(explicit, cli_lib.held_out_overrides()))
        report = run_curriculum(phases_to_run, FLAGS.workdir, arg, overrides, explicit, FLAGS.init_from,
                                FLAGS.warm_bridge_from)
    except USER_ERRORS as e:
        cli_lib.fail("train", str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps({k: v for k, v in report.items()}, default=str)[:2000])


if __name__ == "__main__":
    app.run(main, flags_parser=cli_lib.flags_parser("train"))
