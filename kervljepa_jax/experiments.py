"""The paper's experiment tables from a trained workdir: `python -m kervljepa_jax.experiments`.

    python -m kervljepa_jax.experiments --table=IX --workdir=DIR     # visual-token ablations (V-B)
    python -m kervljepa_jax.experiments --table=X --workdir=DIR      # NLL, pathology vs generic (V-C)
    python -m kervljepa_jax.experiments --table=VI --workdir=DIR     # cold vs warm bridge (IV-C3)
    python -m kervljepa_jax.experiments --table=XI --workdir=DIR     # component ablations (V-D)

Each reuses what the workdir holds (the phases' checkpoints, the ablations the final evaluation
already scored) and runs only what is missing, then writes DIR/experiments/table_<N>.md, laid out
like the paper's table with bootstrap 95% CIs of macro F1, and a PNG next to it.

  IX  generation under full / zeroed / shuffled / noise visual tokens, phases 3 and 4, each
      ablation against the full model on the same volumes (the first eval.ablation_examples).
  X   teacher-forced NLL of the reference reports (nats/token) under normal, zeroed and shuffled
      visual tokens, for all target tokens and split into pathology and generic words.
  VI  phase 3 trained for --epochs from the workdir's phases 1-2, once with a fresh (cold) bridge
      and once with the bridge of the workdir's finished phase 3 (warm), in DIR/experiments/VI.
  XI  each component removed by its config switch (COMPONENTS: zone constraint, norm calibration,
      whitening, cross-attention adapters, positive-findings-only text, EWC) and trained from the
      earliest phase it changes through phase 4, in DIR/experiments/XI/<name>, from copies of the
      workdir's base LLM, whitening and earlier phases; scored by phase 4's final evaluation and
      set against the workdir's phase 4. --phase3_epochs=N shortens every rerun's phase 3 and then
      retrains the full model the same way (XI/full) as the reference row; --components picks rows.
      A rerun left unfinished resumes; a finished one is read back.

--train_flag (repeatable) adds a train flag to every rerun of VI and XI: on the embedded default an
epoch of phase 3 is 4,096 volumes, a third of the phase, so `--table=VI --train_flag=--config.data.num_train=512`
compares after 64 steps instead, a 24th of the phase, early as the paper's epoch 1 of 50 is.
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
TABLES = ("VI", "IX", "X", "XI")


def _define_flags() -> None:
    """At `python -m` time only: a module that only imports this one keeps its own flags."""
    flags.DEFINE_enum("table", None, list(TABLES), "Which of the paper's tables to build.")
    if "workdir" not in FLAGS:       # the same flag train and evaluate define
        flags.DEFINE_string("workdir", None, "A training workdir (python -m kervljepa_jax.train --workdir=DIR).")
    flags.DEFINE_integer("epochs", 1, "Table VI: phase-3 epochs of each run (the paper compares epoch 1).")
    flags.DEFINE_integer("num_examples", 200, "Table X: validation volumes to score, whole batches (0 = all; "
                         "the paper: 200).")
    flags.DEFINE_integer("phase3_epochs", 0, "Table XI: phase-3 epochs of every rerun (0 = as the workdir's "
                         "phase 3; > 0 also retrains the full model so, as the reference row).")
    flags.DEFINE_list("components", list(COMPONENTS), f"Table XI: the ablations to run, of {','.join(COMPONENTS)}.")
    flags.DEFINE_multi_string("train_flag", [], "Tables VI and XI: a train flag for every rerun, repeatable, e.g. "
                              "--train_flag=--config.data.num_train=512 (VI's epoch 1 then 64 steps on the default)")


MODE_NAMES = {"full": "Full visual tokens", "normal": "Full visual tokens", "zero": "Zeroed",
              "shuffle": "Shuffled (other patient)", "noise": "Random noise"}


class ExperimentError(ValueError):
    """A workdir that cannot give the table: one line, exit 1."""


def _ci(scores: dict) -> str:
    low, high = _ci_bounds(scores)
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


def same_setup(workdir: str, phase: int = 3) -> list[str]:
    """`--config=configs/phase{phase}.py:PROFILE --config.a.b=v ...` reproducing the setup (profile,
    data, LLM) the workdir's phase 3 was trained with (its saved config), for a rerun of `phase`."""
    from kervljepa_jax import evaluate
    from kervljepa_jax.training import config as config_lib
    saved = evaluate.saved_config(workdir, 3)
    args = [f"--config={config_lib.CONFIGS_DIR / f'phase{phase}.py'}:{saved.get('profile', 'default')}"]
    for key in SETUP_KEYS:
        value = saved
        for name in key.split("."):
            value = value.get(name) if isinstance(value, dict) else None
        if value not in (None, "", []):
            args.append(f"--config.{key}={json.dumps(value) if isinstance(value, list) else value}")
    return args


def _seed(out: str, items: dict[str, str]) -> None:
    """A fresh `out` holding copies of `items` (name -> source path; absent sources are skipped)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, src in items.items():
        if os.path.exists(src):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(out, name))


def _train(table: str, workdir: str, out: str, phase: int, args: list[str]) -> None:
    """`python -m kervljepa_jax.train --phase=N` in `out` with the workdir's setup plus `args`, in a
    subprocess (its own devices and memory); its last stderr line in one ExperimentError on failure."""
    cmd = [sys.executable, "-m", "kervljepa_jax.train", f"--phase={phase}", f"--workdir={out}",
           *same_setup(workdir, phase), *args]
    logging.info("table %s: %s", table, " ".join(cmd[3:]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ExperimentError(f"table {table}: phase {phase} in {out} failed: {last}")


def _phase3_run(workdir: str, out: str, epochs: int, warm: bool, train_args: list[str] = ()) -> dict:
    """Phase 3 for `epochs` from the workdir's base LLM, whitening and phases 1-2, in `out`."""
    if not os.path.isfile(os.path.join(out, "report.json")):
        # base_llm: a stand-in's only
        _seed(out, {item: os.path.join(workdir, item) for item in ("base_llm", "whitening.npz", "phase1", "phase2")})
        args = [f"--config.train.epochs={epochs}", f"--config.train.eval_every_epochs={epochs}"]
        if warm:
            args.append(f"--warm_bridge_from={os.path.join(workdir, 'phase3', 'checkpoints')}")
        _train("VI", workdir, out, 3, args + list(train_args))
    return json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))["phase3"]


def table_vi(workdir: str, epochs: int, train_args: list[str] = ()) -> tuple[str, dict]:
    _trained(workdir, (3,))                              # the warm bridge comes from a finished phase 3
    for phase in (1, 2):
        _trained(workdir, (phase,))
    base = os.path.join(workdir, "experiments", "VI")
    runs = {name: _phase3_run(workdir, os.path.join(base, name), epochs, name == "warm", train_args)
            for name in ("cold", "warm")}
    lines = [f"| Phase 3 start | Macro F1 [95% CI] after {epochs} epoch(s) | Precision | Recall | volumes |",
             "|---|---|---|---|---|"]
    for name, scores in runs.items():
        lines.append(f"| {name} bridge | {_ci(scores)} | {scores['precision']:.3f} | {scores['recall']:.3f} | "
                     f"{scores['num_volumes']} |")
    return "\n".join(lines), {f"epoch {epochs}": {n: s["macro_f1"] for n, s in runs.items()}}


# ----------------------------------------------------------------------------- Table XI


# Each component ablation: its row, the earliest phase it changes (what it retrains from; the
# workdir's earlier phases are reused), and the config switches that remove it.
COMPONENTS = {
    "zones": ("w/o zone constraint (queries attend to all slices)", 1, {"model.zone_constraint": "false"}),
    "calibration": ("w/o norm calibration (alpha = 1)", 1, {"calibration.enabled": "false"}),
    "whitening": ("w/o PCA whitening (raw text embeddings)", 1, {"model.whiten": "false"}),
    "xattn": ("w/o cross-attention adapters (grafted tokens only)", 3, {"model.xattn_adapters": "false"}),
    "positive_findings": ("w/o positive-findings-only text (raw reports)", 3, {"data.text_mode": "raw"}),
    "ewc": ("w/o EWC (lambda = 0)", 4, {}),          # ewc_off_overrides: where lambda sits in the config
}
FULL = "Full model"
# Phase 3's own validation is not in the table (phase 4 is scored): 64 volumes. The embedded default
# validates phase 3 once, at its end, so its checkpoint is the same; a profile whose plateau scheduler
# or model selection reads phase 3's validation decides on those 64. The visual-token ablations of
# every final evaluation are Table IX's: the reruns generate them for one batch only.
RERUN_ARGS = {3: ["--config.eval.num_examples=64"], 4: []}
LEAN_ARGS = ["--config.eval.ablation_examples=1"]


def _llm_width(workdir: str) -> int | None:
    """hidden_size of the workdir's LLM (its base_llm copy, else model.llm_path), None if unknown."""
    from kervljepa_jax import evaluate
    folder = evaluate.saved_config(workdir, 3).get("model", {}).get("llm_path") or os.path.join(workdir, "base_llm")
    try:
        return int(json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))["hidden_size"])
    except (OSError, ValueError, KeyError):
        return None


def ewc_off_overrides() -> dict[str, str]:
    """lambda := 0 in every optimizer-group row of phase 4's config that has an EWC pull."""
    from kervljepa_jax.training import config as config_lib
    rows = list(config_lib.load_phase_config(4).optimizer_groups)
    return {f"optimizer_groups[{i}].ewc": "0" for i, row in enumerate(rows) if float(row.get("ewc") or 0) > 0}


def switch_overrides(name: str) -> dict[str, str]:
    """The config fields (dotted key -> value) that remove component `name`."""
    return ewc_off_overrides() if name == "ewc" else dict(COMPONENTS[name][2])


def component_args(workdir: str, name: str) -> list[str]:
    """The --config overrides that remove component `name`; no whitening also widens the JEPA space to
    the LLM's (the identity keeps every feature)."""
    args = [f"--config.{k}={v}" for k, v in switch_overrides(name).items()]
    width = _llm_width(workdir) if name == "whitening" else None
    return args + ([f"--config.model.jepa_dim={width}"] if width else [])


def _ablation_run(workdir: str, out: str, first: int, args: list[str], phase3_epochs: int,
                  phase3_from: str, train_args: list[str]) -> dict:
    """Phases `first`..4 in `out` with `args`, from the workdir's base LLM, whitening (unless the run
    fits its own) and phases before `first` (phase 3 from `phase3_from`); resumes a run left
    unfinished. Returns phase 4's final evaluation."""
    report = os.path.join(out, "report.json")
    done = lambda: os.path.isfile(report) and "phase4" in json.load(open(report, encoding="utf-8"))  # noqa: E731
    if done():
        return json.load(open(report, encoding="utf-8"))["phase4"]
    if not os.path.isdir(out):
        items = {"base_llm": os.path.join(workdir, "base_llm")}
        if "--config.model.whiten=false" not in args:
            items["whitening.npz"] = os.path.join(workdir, "whitening.npz")
        items.update({f"phase{p}": os.path.join(phase3_from if p == 3 else workdir, f"phase{p}") for p in range(1, first)})
        _seed(out, items)
    short = [f"--config.train.epochs={phase3_epochs}", f"--config.train.eval_every_epochs={phase3_epochs}"]
    for phase in range(first, 5):
        if not os.path.isfile(os.path.join(out, f"phase{phase}", "metrics.json")):   # a phase's last file
            extra = RERUN_ARGS.get(phase, []) + (short if phase == 3 and phase3_epochs else [])
            _train("XI", workdir, out, phase, args + LEAN_ARGS + extra + train_args)
    return json.load(open(report, encoding="utf-8"))["phase4"]


def xi_rows(full: dict, runs: dict[str, dict]) -> list[str]:
    """The table's markdown rows: the full model, then each ablation with its change in macro F1."""
    lines = ["| Configuration | Retrained from | Macro F1 [95% CI] | delta vs full | Precision | Recall | volumes |",
             "|---|---|---|---|---|---|---|"]
    for name, scores in [(FULL, full), *runs.items()]:
        label, first = (FULL, "") if name == FULL else (COMPONENTS[name][0], f"phase {COMPONENTS[name][1]}")
        delta = "" if name == FULL else f"{scores['macro_f1'] - full['macro_f1']:+.3f}"
        lines.append(f"| {label} | {first} | {_ci(scores)} | {delta} | {scores['precision']:.3f} | "
                     f"{scores['recall']:.3f} | {scores['num_volumes']} |")
    return lines


def table_xi(workdir: str, phase3_epochs: int = 0, components=tuple(COMPONENTS),
             train_args: list[str] = ()) -> tuple[str, list]:
    """Each component removed in turn, trained from the earliest phase it changes to phase 4 and scored
    as phase 4's final evaluation (generated-report macro F1, bootstrap 95% CI). `phase3_epochs` > 0
    shortens every rerun's phase 3 and retrains the full model likewise from phase 2 as the reference;
    0 keeps the phases as configured and the reference is the workdir's own phase 4."""
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ExperimentError(f"--components: unknown {bad[0]!r}; choose from {','.join(COMPONENTS)}")
    for phase in (1, 2, 3, 4):
        _trained(workdir, (phase,))
    base, train_args = os.path.join(workdir, "experiments", "XI"), list(train_args)
    if phase3_epochs:
        full = _ablation_run(workdir, os.path.join(base, "full"), 3, [], phase3_epochs, workdir, train_args)
        phase3_from = os.path.join(base, "full")
    else:
        full, phase3_from = _metrics(workdir, 4), workdir
        if not full or "macro_f1_ci" not in full:
            raise ExperimentError(f"--workdir={workdir}: phase 4 has no final evaluation (phase4/metrics.json); "
                                  "rerun python -m kervljepa_jax.train --phase=4 there")
    runs = {name: _ablation_run(workdir, os.path.join(base, name), COMPONENTS[name][1],
                                component_args(workdir, name), phase3_epochs, phase3_from, train_args)
            for name in components}
    lines = xi_rows(full, runs)
    if phase3_epochs:
        lines.append(f"\nEvery row, the full model included, trained phase 3 for {phase3_epochs} epoch(s).")
    bars = [(FULL, full)] + [(COMPONENTS[n][0], s) for n, s in runs.items()]
    return "\n".join(lines), [(label, s["macro_f1"], *_ci_bounds(s)) for label, s in bars]


def _ci_bounds(scores: dict) -> tuple[float | None, float | None]:
    ci = scores.get("macro_f1_ci") or {}
    return ci.get("low"), ci.get("high")


# ----------------------------------------------------------------------------- main


TITLES = {"VI": "Table VI: cold vs warm bridge, phase 3", "IX": "Table IX: generation F1 by visual-token condition",
          "X": "Table X: teacher-forced NLL by visual-token condition",
          "XI": "Table XI: component ablations, phase-4 generation F1"}


def build(table: str, workdir: str, epochs: int = 1, num_examples: int = 0, phase3_epochs: int = 0,
          components=tuple(COMPONENTS), train_args: list[str] = ()) -> str:
    """Build `table` from `workdir`; returns the markdown file written. `train_args`: extra train flags
    of every rerun (Tables VI and XI keep the workdir's setup otherwise)."""
    out = os.path.join(workdir, "experiments")
    png = os.path.join(out, f"table_{table}.png")
    if table == "XI":
        body, rows = table_xi(workdir, phase3_epochs, components, train_args)
        figures.component_bars(rows, png, title=TITLES[table])
    else:
        if table == "IX":
            body, bars = table_ix(workdir)
        elif table == "X":
            body, bars = table_x(workdir, num_examples)
        else:
            body, bars = table_vi(workdir, epochs, train_args)
        figures.ablation_bars(bars, png, title=TITLES[table])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"table_{table}.md")
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
    bad = [f for f in FLAGS.train_flag if not f.startswith("--")]
    if bad:
        cli_lib.fail("experiments", f"--train_flag={bad[0]}: give a train flag with its dashes, e.g. "
                     "--train_flag=--config.data.num_train=512", 2)
    if FLAGS.epochs < 1 or FLAGS.num_examples < 0 or FLAGS.phase3_epochs < 0:
        cli_lib.fail("experiments", "--epochs must be >= 1, --num_examples and --phase3_epochs >= 0", 2)
    unknown = [c for c in FLAGS.components if c not in COMPONENTS]
    if unknown or not FLAGS.components:
        cli_lib.fail("experiments", f"--components={','.join(FLAGS.components)}: choose among "
                     f"{','.join(COMPONENTS)}", 2)
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
        path = build(FLAGS.table, FLAGS.workdir, FLAGS.epochs, FLAGS.num_examples, FLAGS.phase3_epochs,
                     tuple(FLAGS.components), FLAGS.train_flag)
    except user_errors as e:
        cli_lib.fail("experiments", str(e).splitlines()[0])
    print(open(path, encoding="utf-8").read())


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("experiments"))
