"""The paper's experiment tables from a trained workdir: `python -m kervljepa_jax.experiments`.

    python -m kervljepa_jax.experiments --table=IX --workdir=DIR     # visual-token ablations (V-B)
    python -m kervljepa_jax.experiments --table=X --workdir=DIR      # NLL, pathology vs generic (V-C)
    python -m kervljepa_jax.experiments --table=VI --workdir=DIR     # cold vs warm bridge (IV-C3)

Each reuses what the workdir holds (the phases' checkpoints, the ablations the final evaluation
already scored) and runs only what is missing, then writes DIR/experiments/table_<N>.md, laid out
like the paper's table with bootstrap 95% CIs of macro F1, and a PNG next to it.

  IX  generation under full / zeroed / shuffled / noise visual tokens, phases 3 and 4, each
      ablation against the full model on the same volumes (the first eval.ablation_examples).
  X   teacher-forced NLL of the reference reports (nats/token) under normal, zeroed and shuffled
      visual tokens, for all target tokens and split into pathology and generic words.
  VI  phase 3 trained for --epochs from the workdir's phases 1-2, once with a fresh (cold) bridge
      and once with the bridge of the workdir's finished phase 3 (warm), in DIR/experiments/VI.
Table XI (component ablations) needs a switch per component in the model and is not built yet.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shutil
import subprocess
import sys

from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, figures

FLAGS = flags.FLAGS
TABLES = ("VI", "IX", "X")


def _define_flags() -> None:
    """At `python -m` time only: a module that only imports this one keeps its own flags."""
    flags.DEFINE_enum("table", None, list(TABLES), "Which of the paper's tables to build.")
    if "workdir" not in FLAGS:       # the same flag train and evaluate define
        flags.DEFINE_string("workdir", None, "A training workdir (python -m kervljepa_jax.train --workdir=DIR).")
    flags.DEFINE_integer("epochs", 1, "Table VI: phase-3 epochs of each run (the paper compares epoch 1).")
    flags.DEFINE_integer("num_examples", 200, "Table X: validation volumes to score, whole batches (0 = all; "
                         "the paper: 200).")


MODE_NAMES = {"full": "Full visual tokens", "normal": "Full visual tokens", "zero": "Zeroed",
              "shuffle": "Shuffled (other patient)", "noise": "Random noise"}


class ExperimentError(ValueError):
    """A workdir that cannot give the table: one line, exit 1."""


def _ci(scores: dict) -> str:
    ci = scores.get("macro_f1_ci") or {}
    low, high = ci.get("low"), ci.get("high")
    return f"{scores['macro_f1']:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{scores['macro_f1']:.3f}"


def _metrics(workdir: str, phase: int) -> dict | None:
    path = os.path.join(workdir, f"phase{phase}", "metrics.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None


_RUNS: dict[str, object] = {}     # workdir -> its Run: phases 3 and 4 share the LLM load and the compiled samplers


def _evaluate(workdir: str, phase: int, **options) -> dict:
    """evaluate_phase on `phase` with `options` (EvalOptions fields), into DIR/experiments/phaseN."""
    from kervljepa_jax import evaluate, sharding
    loaded = evaluate.load_phase(workdir, phase, run=_RUNS.get(workdir))
    _RUNS[workdir] = loaded.run
    with sharding.use_mesh(loaded.run.mesh):
        return evaluate.evaluate_phase(loaded, evaluate.EvalOptions(**options),
                                       os.path.join(workdir, "experiments", f"phase{phase}"))


def _trained(workdir: str, phases) -> list[int]:
    from kervljepa_jax import evaluate
    have = [p for p in phases if p in evaluate.trained_phases(workdir)]
    if not have:
        raise ExperimentError(f"--workdir={workdir}: no trained phase among {list(phases)}; train them first "
                              f"(python -m kervljepa_jax.train --phase=all --workdir={workdir})")
    return have


# ----------------------------------------------------------------------------- Table IX


def table_ix(workdir: str) -> tuple[str, dict]:
    """Generation F1 per visual-token condition, phases 3 and 4."""
    lines = ["| Phase | Condition | Macro F1 [95% CI] | Precision | Recall | vs full | volumes |",
             "|---|---|---|---|---|---|---|"]
    bars = {}
    for phase in _trained(workdir, (3, 4)):
        metrics = _metrics(workdir, phase)
        if not metrics or not metrics.get("ablations"):
            metrics = _evaluate(workdir, phase)
        ablations = metrics["ablations"]
        first = next(iter(ablations.values()))
        lines.append(f"| {phase} | {MODE_NAMES['full']} | {first['full_macro_f1']:.3f} | | | | "
                     f"{first['num_volumes']} |")
        for mode, scores in ablations.items():
            drop = scores["macro_f1"] / scores["full_macro_f1"] - 1 if scores["full_macro_f1"] else float("nan")
            lines.append(f"| {phase} | {MODE_NAMES.get(mode, mode)} | {_ci(scores)} | {scores['precision']:.3f} | "
                         f"{scores['recall']:.3f} | {drop:+.1%} | {scores['num_volumes']} |")
        bars[f"phase{phase}"] = {"full": first["full_macro_f1"], **{m: s["macro_f1"] for m, s in ablations.items()}}
    return "\n".join(lines), bars


# ----------------------------------------------------------------------------- Table X


def table_x(workdir: str, num_examples: int) -> tuple[str, dict]:
    """Teacher-forced NLL per visual-token condition and word class, phases 3 and 4."""
    lines = ["| Phase | Condition | NLL all | NLL pathology | NLL generic | delta pathology | delta generic |",
             "|---|---|---|---|---|---|---|"]
    bars = {}
    for phase in _trained(workdir, (3, 4)):
        nll = _evaluate(workdir, phase, ablations=("zero", "shuffle"), nll=True,
                        num_examples=num_examples or None, ablation_examples=0)["nll"]
        for mode in ("normal", "zero", "shuffle"):
            row, delta = nll[mode], nll[mode].get("delta_vs_normal", {})
            fmt = lambda v: "" if v is None else f"{v:+.4f}"  # noqa: E731
            lines.append(f"| {phase} | {MODE_NAMES[mode]} | {row['all']:.4f} | {row['pathology']:.4f} | "
                         f"{row['generic']:.4f} | {fmt(delta.get('pathology'))} | {fmt(delta.get('generic'))} |")
        bars[f"phase{phase} pathology"] = {m: nll[m]["pathology"] for m in ("normal", "zero", "shuffle")}
        bars[f"phase{phase} generic"] = {m: nll[m]["generic"] for m in ("normal", "zero", "shuffle")}
        lines.append(f"| {phase} | tokens | {nll['tokens']['all']} | {nll['tokens']['pathology']} | "
                     f"{nll['tokens']['generic']} | | |")
    return "\n".join(lines), bars


# ----------------------------------------------------------------------------- Table VI


# What a rerun of phase 3 must share with the workdir's own: its profile, data and LLM.
SETUP_KEYS = ("data.source", "data.root", "data.tokenizer_path", "data.embed_dim", "data.num_visual_tokens",
              "model.llm_path", "model.preset", "model.injection_layers", "model.whiten_layer", "model.whiten_texts",
              "model.jepa_dim", "model.xattn_gate", "model.xattn_gate_init", "model.lora.rank", "model.lora.alpha")


def same_setup(workdir: str) -> list[str]:
    """`--config=configs/phase3.py:PROFILE --config.a.b=v ...` reproducing the setup the workdir's
    phase 3 was trained with (its saved config)."""
    from kervljepa_jax import evaluate
    from kervljepa_jax.training import config as config_lib
    saved = evaluate.saved_config(workdir, 3)
    args = [f"--config={config_lib.CONFIGS_DIR / 'phase3.py'}:{saved.get('profile', 'default')}"]
    for key in SETUP_KEYS:
        value = saved
        for name in key.split("."):
            value = value.get(name) if isinstance(value, dict) else None
        if value not in (None, "", []):
            args.append(f"--config.{key}={json.dumps(value) if isinstance(value, list) else value}")
    return args


def _phase3_run(workdir: str, out: str, epochs: int, warm: bool) -> dict:
    """Phase 3 for `epochs` from the workdir's base LLM, whitening and phases 1-2, in `out`."""
    if not os.path.isfile(os.path.join(out, "report.json")):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for item in ("base_llm", "whitening.npz", "phase1", "phase2"):   # base_llm: a stand-in's only
            src = os.path.join(workdir, item)
            if os.path.exists(src):
                (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(out, item))
        cmd = [sys.executable, "-m", "kervljepa_jax.train", "--phase=3", f"--workdir={out}",
               *same_setup(workdir), f"--config.train.epochs={epochs}", f"--config.train.eval_every_epochs={epochs}"]
        if warm:
            cmd.append(f"--warm_bridge_from={os.path.join(workdir, 'phase3', 'checkpoints')}")
        logging.info("table VI: %s", " ".join(cmd[3:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise ExperimentError(f"table VI: phase 3 in {out} failed: {last}")
    return json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))["phase3"]


def table_vi(workdir: str, epochs: int) -> tuple[str, dict]:
    _trained(workdir, (3,))                              # the warm bridge comes from a finished phase 3
    for phase in (1, 2):
        _trained(workdir, (phase,))
    base = os.path.join(workdir, "experiments", "VI")
    runs = {name: _phase3_run(workdir, os.path.join(base, name), epochs, name == "warm") for name in ("cold", "warm")}
    lines = [f"| Phase 3 start | Macro F1 [95% CI] after {epochs} epoch(s) | Precision | Recall | volumes |",
             "|---|---|---|---|---|"]
    for name, scores in runs.items():
        lines.append(f"| {name} bridge | {_ci(scores)} | {scores['precision']:.3f} | {scores['recall']:.3f} | "
                     f"{scores['num_volumes']} |")
    return "\n".join(lines), {f"epoch {epochs}": {n: s["macro_f1"] for n, s in runs.items()}}


# ----------------------------------------------------------------------------- main


TITLES = {"VI": "Table VI: cold vs warm bridge, phase 3", "IX": "Table IX: generation F1 by visual-token condition",
          "X": "Table X: teacher-forced NLL by visual-token condition"}


def build(table: str, workdir: str, epochs: int = 1, num_examples: int = 0) -> str:
    """Build `table` from `workdir`; returns the markdown file written."""
    if table == "IX":
        body, bars = table_ix(workdir)
    elif table == "X":
        body, bars = table_x(workdir, num_examples)
    else:
        body, bars = table_vi(workdir, epochs)
    out = os.path.join(workdir, "experiments")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"table_{table}.md")
    png = figures.ablation_bars(bars, os.path.join(out, f"table_{table}.png"), title=TITLES[table])
    if table == "X":       # the bars are NLLs, not F1s
        logging.info("table X: the PNG's y axis reads nats/token")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {TITLES[table]}\n\nFrom `{workdir}`.\n\n{body}\n\n![{TITLES[table]}]({os.path.basename(png)})\n")
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli_lib.fail("experiments", f"unexpected arguments {argv[1:]}; flags are --table, --workdir", 2)
    if not FLAGS.table or not FLAGS.workdir:
        cli_lib.fail("experiments", "--table and --workdir are required (e.g. --table=IX --workdir=DIR)", 2)
    if not os.path.isdir(FLAGS.workdir):
        cli_lib.fail("experiments", f"--workdir={FLAGS.workdir} does not exist; train first", 2)
    if FLAGS.epochs < 1 or FLAGS.num_examples < 0:
        cli_lib.fail("experiments", "--epochs must be >= 1 and --num_examples >= 0", 2)
    from kervljepa_jax import evaluate, hf
    from kervljepa_jax.data.records import DataError
    from kervljepa_jax.model.llama import ModelConfigError
    from kervljepa_jax.training import checkpoint, config as config_lib
    from kervljepa_jax.training.pretrain import TrainError
    user_errors = (ExperimentError, evaluate.EvalError, TrainError, DataError, config_lib.OverrideError,
                   checkpoint.CheckpointError, hf.HFLoadError, ModelConfigError)
    # Orbax narrates every restore at INFO; its warnings stay.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= std_logging.WARNING)
    try:
        path = build(FLAGS.table, FLAGS.workdir, FLAGS.epochs, FLAGS.num_examples)
    except user_errors as e:
        cli_lib.fail("experiments", str(e).splitlines()[0])
    print(open(path, encoding="utf-8").read())


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("experiments"))
