"""Evaluation (paper IV-C, Tables IV, VIII-X): generate reports, label them, score against ground truth.

Library: `generation_eval` (reports under every visual mode -> labels -> metrics), used by the
trainer at each validation of a generating phase (3, 4); `classifier_eval` (phase 1's visual classifier);
`load_phase` + `evaluate_phase` (what the CLI runs, also used by notebooks/quickstart.ipynb).

CLI:

    python -m kervljepa_jax.evaluate --workdir=DIR [--phase=4|all] [--split=valid]
        [--ablations=zero,shuffle,noise] [--nll] [--probe] [--num_examples=N] [--ablation_examples=M]
        [--labeler=rules|radbert --radbert_encoder=DIR --radbert_classifier=FILE]
        [--config.eval.max_new_tokens=96 ...]

loads the phase's best checkpoint (no --phase: the latest phase that has one; --phase=all: every
phase that has one) with the config it was trained with (saved in the checkpoint; `--config.x=y`
overrides it), and writes DIR/eval/phaseN/:

  metrics.json      macro/micro F1, P, R, per-class table, bootstrap 95% CI of macro F1, AUC and
                    the per-class threshold search (flagged "tuned_on_eval_set") on the scores
                    below; each ablation's F1 (Table IX) on the first M volumes, beside the full
                    model's on those same volumes; --nll: Table X; --probe: Table VIII;
                    the zone-evidence matrix.
  reports.csv       one row per volume: ground-truth findings and the report of every visual mode.
  per_class_f1.png, ablations.png, loss_curves.png (from DIR/metrics.jsonl), zone_map.png.

Scores for AUC and the threshold search. Phases 3-4: with --labeler=radbert, RadBERT's own
probabilities of the generated (normal-mode) reports (the paper's protocol); otherwise the LLM-visual classifier (the head trained
in phase 3 on the response tokens' last hidden states) reading the model's own generated report
(normal mode): sigmoid of its logits; where phase 3 did not train it (the default run's phase 3
has no llm_cls or focal loss), the visual classifier on V' instead, and metrics.json says so. Phases 1-2 (no language path trained): the visual
classifier on V' (mean-pooled compressor tokens); its F1 at 0.5 is then the headline number.
The visual classifier's numbers are reported for every phase under "visual_classifier"; after
phase 2 they are stale (phase 2 moves the compressor, not that head).

--nll (Table X): the reference response of each volume (the phase's training target: the
positive-findings text in phase 3, Findings_EN in phase 4; `--config.data.text_mode` switches)
teacher-forced under each visual mode; mean NLL per token of
  pathology  tokens whose characters overlap a match of any class's lexicon pattern
             (`findings.FINDINGS[c].patterns` and `.weak_patterns`, matched on the lower-cased
             text) whether asserted or negated: "effusion" in "no pleural effusion" names a
             pathology all the same, and only the image tells which;
  generic    every other response token (anatomy, syntax, "no", "the", punctuation);
  all        every target token of the LM loss (both plus the closing <|eot_id|>).
A response whose re-encoding differs from the batch ids (it never should) counts in "all" only.

--probe (Table VIII): `probe.probe_stages` (5-fold CV logistic regression per class) on the
mean-pooled raw slices, the mean of the compressor tokens V', and the mean of V~ of the phase.

Zone map: `figures.zone_evidence` on V' [M, 32, d_v] of the evaluated volumes vs their labels
(cross-fitted per-zone AUC), drawn by `figures.zone_attention_map`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, figures, findings, label as label_lib, metrics as metrics_lib
from kervljepa_jax import probe as probe_lib, sharding
from kervljepa_jax.data import text as text_lib, tokenizer as tokenizers
from kervljepa_jax.data.records import DataError
from kervljepa_jax.generate import ReportGenerator
from kervljepa_jax.label import RuleLabeler
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import checkpoint as ckpt_lib, config as config_lib, run as run_lib

ABLATIONS = ("zero", "shuffle", "noise")
MODES = ("normal", *ABLATIONS)
WORD_CLASSES = ("pathology", "generic")


class EvalError(ValueError):
    """A user mistake found by the evaluator: one line, non-zero exit."""


# ----------------------------------------------------------------------------- library (train uses these)


def score(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Macro F1 / precision / recall (+ the full sklearn report) of multi-hot predictions."""
    report = metrics_lib.classification_metrics(np.asarray(y_true), np.asarray(y_pred), scores)
    return {"macro_f1": report["macro_f1"], "precision": report["macro_precision"],
            "recall": report["macro_recall"], "report": report}


def take(batches: Iterable[dict], num_examples: int) -> Iterator[dict]:
    """Batches until `num_examples` examples were seen (all if 0); the last batch stays whole."""
    seen = 0
    for batch in batches:
        yield batch
        seen += int(batch["labels"].shape[0])       # the global batch, whichever process reads it
        if num_examples and seen >= num_examples:
            return


def collect(batches, num_examples: int) -> list[dict]:
    """Up to `num_examples` examples' batches (all if 0), as host dicts."""
    return list(take(batches, num_examples))


def generate_texts(generator: ReportGenerator, variables: Any, batch: dict, modes: Sequence[str],
                   rng: jax.Array) -> dict[str, list[str]]:
    """One batch's reports under each visual mode (the same sampling key for every mode)."""
    return {mode: generator(variables, batch["slices"], batch["z_mm"], batch["valid"], visual_mode=mode, rng=rng)
            for mode in modes}


def generation_eval(generator: ReportGenerator, variables: Any, batches: Sequence[dict],
                    modes: Sequence[str] = ("normal",), labeler=None, rng: jax.Array | None = None) -> dict:
    """Generate under each visual mode, label with `labeler` (the rule labeler when None), score against the batch labels.

    Returns {mode: {macro_f1, precision, recall, report, texts}} plus "labels" (ground truth) and
    "volume_names".
    """
    labeler = labeler or RuleLabeler()
    rng = jax.random.key(0) if rng is None else rng
    truth = np.concatenate([_host(b["labels"]) for b in batches])
    # Per batch, as the rows of each global batch are laid out (process 0's rows, then process 1's, ...).
    names = [n for b in batches for n in sharding.host_strings(list(b.get("meta", {}).get("volume_name", [])))]
    names += [""] * (len(truth) - len(names))
    results: dict[str, Any] = {"labels": truth, "volume_names": names}
    texts: dict[str, list[str]] = {mode: [] for mode in modes}
    for i, batch in enumerate(batches):
        for mode, batch_texts in generate_texts(generator, variables, batch, modes, jax.random.fold_in(rng, i)).items():
            texts[mode] += batch_texts
    for mode in modes:
        predicted = labeler(texts[mode])
        results[mode] = {**score(truth, predicted), "texts": texts[mode], "predicted": predicted}
        logging.info("generation eval [%s]: macro F1 %.3f (P %.3f, R %.3f) on %d volumes", mode,
                     results[mode]["macro_f1"], results[mode]["precision"], results[mode]["recall"], len(truth))
    return results


def classifier_eval(logits_fn, variables: Any, batches: Sequence[dict]) -> dict:
    """The visual classifier's macro F1 (sigmoid > 0.5) and AUC on `batches`."""
    logits = np.concatenate([_host(logits_fn(variables, b)) for b in batches])
    truth = np.concatenate([_host(b["labels"]) for b in batches])
    probs = 1.0 / (1.0 + np.exp(-logits))
    return score(truth, (probs > 0.5).astype(int), probs)


def write_reports_csv(path: str, results: dict, modes: Sequence[str]) -> None:
    """One row per volume: name, ground-truth positives, and each mode's generated report."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["VolumeName", "true_findings", *[f"report_{m}" for m in modes]])
        for i, name in enumerate(results["volume_names"]):
            positives = "; ".join(findings.CLASS_NAMES[c] for c in np.flatnonzero(results["labels"][i]))
            # An ablation generates for the first volumes only (ablation_examples): "" after them.
            writer.writerow([name, positives, *[_at(results[m]["texts"], i) for m in modes]])


def _at(texts: Sequence[str], i: int) -> str:
    return texts[i] if i < len(texts) else ""


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(payload), f, indent=2, allow_nan=False, default=str)


def as_jnp(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "meta"}


# ----------------------------------------------------------------------------- pathology vs generic tokens


_LEXICON: tuple[re.Pattern, ...] = tuple(re.compile(p.lower()) for f in findings.FINDINGS
                                         for p in (*f.patterns, *f.weak_patterns))


def pathology_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of `text` matched by any class's lexicon pattern (asserted or negated)."""
    lowered = text.lower()
    return sorted((m.start(), m.end()) for pattern in _LEXICON for m in pattern.finditer(lowered) if m.end() > m.start())


def pathology_token_mask(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """[L] bool: which tokens (character `offsets` into `text`) overlap a pathology span.

    A byte-level BPE token's offsets include its leading space; it is trimmed first so that
    " no" before "effusion" is not a pathology token.
    """
    spans = pathology_spans(text)
    out = np.zeros(len(offsets), bool)
    for i, (start, end) in enumerate(offsets):
        while start < end and text[start].isspace():
            start += 1
        out[i] = any(a < end and start < b for a, b in spans)
    return out


def response_word_classes(tokenizer: Any, responses: Sequence[str], input_ids: np.ndarray, loss_mask: np.ndarray,
                          eot_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per target token of a batch: (pathology [B, T], generic [B, T], rows that could not be aligned).

    Targets are the `loss_mask` positions (the response, then <|eot_id|>). Each response is
    re-encoded with character offsets; a row whose ids differ from the batch's is left out of
    both classes (counted in the returned number).
    """
    pathology = np.zeros(loss_mask.shape, bool)
    generic = np.zeros(loss_mask.shape, bool)
    unaligned = 0
    for row, response in enumerate(responses):
        positions = np.flatnonzero(loss_mask[row])
        ids = input_ids[row, positions]
        if len(ids) and ids[-1] == eot_id:          # the closing <|eot_id|> is no word
            positions, ids = positions[:-1], ids[:-1]
        encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"][:len(ids)]) != ids.tolist():
            unaligned += 1
            continue
        mask = pathology_token_mask(response, encoded["offset_mapping"][:len(ids)])
        pathology[row, positions] = mask
        generic[row, positions] = ~mask
    return pathology, generic, unaligned


class NLLTotals:
    """Running NLL sums per (visual mode, word class) -> Table X means."""

    def __init__(self, modes: Sequence[str]):
        self.modes = tuple(modes)
        self.sums = {m: {k: 0.0 for k in ("all", *WORD_CLASSES)} for m in self.modes}
        self.counts = {k: 0 for k in ("all", *WORD_CLASSES)}
        self.unaligned = 0

    def add_counts(self, masks: dict[str, np.ndarray], unaligned: int) -> None:
        for key, mask in masks.items():
            self.counts[key] += int(mask.sum())
        self.unaligned += unaligned

    def add(self, mode: str, nll: np.ndarray, masks: dict[str, np.ndarray]) -> None:
        for key, mask in masks.items():
            self.sums[mode][key] += float(np.asarray(nll, np.float64)[mask].sum())

    def summary(self) -> dict:
        means = {m: {k: (self.sums[m][k] / self.counts[k] if self.counts[k] else None) for k in self.sums[m]}
                 for m in self.modes}
        out: dict[str, Any] = {"definition": "mean NLL (nats/token) of the teacher-forced reference response; "
                               "pathology = tokens overlapping a findings-lexicon match (any class, asserted or "
                               "negated), generic = the other response tokens, all = every LM target token "
                               "(+ <|eot_id|>)", "tokens": dict(self.counts), "unaligned_rows": self.unaligned}
        for mode in self.modes:
            out[mode] = dict(means[mode])
            if mode != "normal" and "normal" in means:
                out[mode]["delta_vs_normal"] = {k: (means[mode][k] - means["normal"][k]
                                                    if means[mode][k] is not None else None) for k in means[mode]}
        return out


# ----------------------------------------------------------------------------- jitted model calls


def visual_fn(model):
    """(variables, slices, z_mm, valid) -> (V' [B, K, d_v], mean V~ [B, D], visual-classifier probs [B, C])."""
    def fn(variables, slices, z_mm, valid):
        out = model.apply(variables, slices, z_mm, valid, method="encode_visual")
        return (out.tokens.astype(jnp.float32), out.calibrated.astype(jnp.float32).mean(1),
                jax.nn.sigmoid(out.cls_logits.astype(jnp.float32)))
    return jax.jit(fn)


def llm_classifier_fn(model):
    """(variables, slices, z_mm, valid, ids, attention_mask, response_mask) -> LLM-visual classifier probs [B, C]."""
    def fn(variables, slices, z_mm, valid, ids, attention_mask, response_mask):
        out = model.apply(variables, slices, z_mm, valid, ids, attention_mask, response_mask)
        return jax.nn.sigmoid(out.llm_cls_logits.astype(jnp.float32))
    return jax.jit(fn)


def token_nll_fn(model, mode: str):
    """(variables, slices, z_mm, valid, ids, attention_mask, rng) -> [B, T] NLL of ids[:, t] given ids[:, <t]
    (0 at t = 0) with the visual tokens under `mode`."""
    def fn(variables, slices, z_mm, valid, ids, attention_mask, rng):
        logits = model.apply(variables, slices, z_mm, valid, ids, attention_mask, visual_mode=mode,
                             rng=rng).logits[:, :-1].astype(jnp.float32)
        target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.pad(jax.nn.logsumexp(logits, axis=-1) - target, ((0, 0), (1, 0)))
    return jax.jit(fn)


def encode_reports(tokenizer, texts: Sequence[str], max_tokens: int, num_visual_tokens: int) -> dict[str, np.ndarray]:
    """Generated reports as the chat the LLM-visual classifier was trained on: ids, attention and response masks."""
    ids = tokenizers.special_ids(tokenizer)
    prompt = text_lib.encode_prompt(tokenizer, num_visual_tokens)
    rows = [text_lib.encode_chat(tokenizer, prompt, t, max_tokens, ids["pad"], ids["eot"])[0] for t in texts]
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "loss_mask")}


# ----------------------------------------------------------------------------- loading a trained phase


def trained_phases(workdir: str) -> list[int]:
    """The curriculum phases of `workdir` that have at least one checkpoint step."""
    found = []
    for phase in (1, 2, 3, 4):
        directory = ckpt_lib.phase_directory(workdir, phase)
        if directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir()):
            found.append(phase)
    return found


def saved_config(workdir: str, phase: int) -> dict:
    """The config the phase's best (else latest) checkpoint was trained with ({} when none was saved)."""
    step_dir = ckpt_lib.resolve_step_dir(ckpt_lib.phase_directory(workdir, phase))
    return ckpt_lib.read_json(step_dir / ckpt_lib.CONFIG)


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _set(config, key: str, value: Any) -> None:
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise KeyError(key)
    current = node[leaf]
    node[leaf] = type(current)(value) if isinstance(current, (list, tuple)) else value


def phase_eval_config(workdir: str, phase: int, overrides: dict[str, str] | None = None, arg: str | None = None):
    """The phase config as trained (saved in its checkpoint) + `--config.x=y` overrides.

    The schema (types, field references) comes from `configs/phaseN.py`; every saved value that
    still exists in it is restored, so the tokenizer, the data split and the model sizes are the
    ones the checkpoint was trained with, whatever the current profile defaults say.
    """
    config = config_lib.load_phase_config(phase, arg)
    for key, value in _flatten(saved_config(workdir, phase)):
        try:
            _set(config, key, value)
        except (KeyError, TypeError, ValueError) as e:
            logging.warning("phase %d: saved config field %s=%r not restored (%s: %s)", phase, key, value,
                            type(e).__name__, e)
    config.phase = phase
    try:
        config_lib.validate(config_lib.apply_overrides(config, overrides or {}))
    except config_lib.OverrideError as e:
        raise EvalError(str(e)) from None
    return config


@dataclasses.dataclass
class Loaded:
    """A trained phase ready to evaluate: the shared run state, its config, restored variables."""

    run: Any
    config: Any
    phase: int
    variables: dict
    step: int

    @property
    def model(self):
        return vlm_lib.VLM(self.run.vcfg)

    def generator(self) -> ReportGenerator:
        return self.run.report_generator(self.config)     # one compiled sampler per run and settings

    def batches(self, split: str = "valid", num_examples: int | None = None) -> Iterator[dict]:
        """The split in order (no shuffle), up to `num_examples` (default config.eval.num_examples; 0 = all)."""
        n = int(self.config.eval.num_examples) if num_examples is None else int(num_examples)
        return take(self.run.pipeline(self.config, split, shuffle=False).epoch(0), n)


def check_workdir(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise EvalError(f"--workdir={workdir} does not exist; train first: python -m kervljepa_jax.train "
                        f"--workdir={workdir}")


def check_phase(workdir: str, phase: int) -> None:
    check_workdir(workdir)
    if phase not in trained_phases(workdir):
        raise EvalError(f"phase {phase}: no checkpoint in {os.path.join(workdir, f'phase{phase}', 'checkpoints')}; "
                        f"train it: python -m kervljepa_jax.train --phase={phase} --workdir={workdir}")


def load_phase(workdir: str, phase: int | None = None, overrides: dict[str, str] | None = None,
               run: Any = None, arg: str | None = None) -> Loaded:
    """The best checkpoint of `phase` (default: the latest trained phase) with its saved config.

    `run`: a `training.run.Run` to reuse (one tokenizer / base LLM load for several phases).
    """
    if phase is None:
        check_workdir(workdir)
        phases = trained_phases(workdir)
        if not phases:
            raise EvalError(f"--workdir={workdir}: no trained phase (no DIR/phaseN/checkpoints); train first: "
                            f"python -m kervljepa_jax.train --workdir={workdir}")
        phase = phases[-1]
    check_phase(workdir, phase)
    config = phase_eval_config(workdir, phase, overrides, arg)
    run = run or run_lib.Run(config, workdir)
    config.data.workdir = workdir
    return restore_phase(run, config, phase)


def restore_phase(run: Any, config: Any, phase: int) -> Loaded:
    """The best checkpoint of `phase` in `run.workdir`, restored onto `run`'s mesh as training left it."""
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, config, phase, read_only=True)
    try:
        restored = ckpt.restore_best(run.abstract_params, base=run.llm_params)   # the frozen LLM: run's
    finally:
        ckpt.close()
    if restored is None:
        raise EvalError(f"phase {phase}: no checkpoint in {ckpt.directory}; train the phase first")
    variables = run.place(run_lib.restored_variables(restored.params, restored.alpha))
    logging.info("phase %d: restored step %d from %s", phase, restored.step, ckpt.directory)
    return Loaded(run=run, config=config, phase=phase, variables=variables, step=restored.step)


_LABELERS: dict[tuple[str, str, str], Any] = {}


def config_labeler(config) -> Any:
    """The labeler `config.eval` names (rules unless eval.labeler=radbert), loaded once per process:
    RadBERT is a transformer, and validation calls for it at every evaluation."""
    e = config.eval
    key = (str(e.get("labeler", "rules")), str(e.get("radbert_encoder", "")), str(e.get("radbert_classifier", "")))
    if key not in _LABELERS:
        _LABELERS[key] = label_lib.make_labeler(*key)
    return _LABELERS[key]


def labeler_problem(config) -> str:
    """Why `config.eval` cannot give its labeler, checked before any set-up ("" when it can)."""
    e = config.eval
    kind = str(e.get("labeler", "rules"))
    if kind not in ("rules", "radbert"):
        return f"--config.eval.labeler={kind}: use rules or radbert"
    for key in ("radbert_encoder", "radbert_classifier") if kind == "radbert" else ():
        if not e.get(key) or not os.path.exists(e[key]):
            return (f"--config.eval.labeler=radbert needs --config.eval.{key}=PATH (a local path; "
                    f"got {e.get(key)!r})")
    return ""


def headline_numbers(payload: dict) -> dict:
    """`evaluate_phase`'s headline numbers: macro F1 / P / R with the CI, each ablation's, per-class F1,
    and which labeler scored the reports."""
    out = {k: payload[k] for k in ("macro_f1", "precision", "recall", "macro_f1_ci", "num_volumes")}
    if "labeler" in payload:
        out["labeler"] = payload["labeler"]
    out["per_class_f1"] = {c["name"]: c["f1"] for c in payload["report"]["per_class"]}
    if "ablations" in payload:
        out["ablations"] = {m: {k: a[k] for k in ("macro_f1", "precision", "recall", "num_volumes", "full_macro_f1")}
                            for m, a in payload["ablations"].items()}
    return out


# ----------------------------------------------------------------------------- one phase, end to end


@dataclasses.dataclass
class EvalOptions:
    split: str = "valid"
    ablations: tuple[str, ...] = ABLATIONS
    nll: bool = False
    probe: bool = False
    probe_folds: int = 5
    num_examples: int | None = None      # None: config.eval.num_examples (0 = all)
    # The ablations generate for the first this-many of those volumes (whole batches);
    # None: config.eval.ablation_examples; 0 = all of them.
    ablation_examples: int | None = None
    labeler: Any = None                  # None: the one the phase's config.eval names (rules by default)


def parse_ablations(raw: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in raw.split(",") if m.strip())
    bad = [m for m in modes if m not in ABLATIONS]
    if bad:
        raise EvalError(f"--ablations={raw}: unknown mode {bad[0]!r}; choose from {','.join(ABLATIONS)}")
    return tuple(dict.fromkeys(modes))


def ablation_count(options: EvalOptions, config) -> int:
    """Volumes the ablations generate for (0 = every evaluated one): the option, else the config's."""
    n = options.ablation_examples
    # .get: a hand-built config may lack the field (a checkpoint's config is restored onto today's schema).
    n = int(config.eval.get("ablation_examples", 0)) if n is None else int(n)
    if n < 0:
        raise EvalError(f"--ablation_examples={n}: use 0 (every evaluated volume) or a positive count")
    return n


def _host(x) -> np.ndarray:
    return sharding.as_host_f32(x)


def llm_classifier_trained(config, workdir: str) -> bool:
    """Whether phase 3 trained the LLM-visual classifier (only phase 3 does: a positive llm_cls or
    focal weight). Phase 4 reads the weights phase 3 ran with from that phase's saved config in the
    same workdir, and only without one (phase 4 from --init_from) its profile's phase-3 config file."""
    if int(config.phase) == 3:
        weights = dict(config.loss_weights)
    else:
        saved = saved_config(workdir, 3).get("loss_weights") if 3 in trained_phases(workdir) else None
        weights = saved or dict(config_lib.load_phase_config(3, config.profile).loss_weights)
    return float(weights.get("llm_cls", 0.0)) + float(weights.get("focal", 0.0)) > 0


def _collect_outputs(loaded: Loaded, options: EvalOptions, modes: Sequence[str]) -> dict:
    """One pass over the split: labels, visual features, reports per mode, classifier scores, NLL sums."""
    model = loaded.model
    variables, config, run = loaded.variables, loaded.config, loaded.run
    generating = loaded.config.eval.score == "generation"
    encode = visual_fn(model)
    generator = loaded.generator() if generating else None
    classify = llm_classifier_fn(model) if generating else None
    nll_modes = ("normal", *options.ablations)
    nll_fns = {m: token_nll_fn(model, m) for m in nll_modes} if options.nll and generating else {}
    totals = NLLTotals(nll_modes) if nll_fns else None
    eot = None
    if nll_fns:
        eot = tokenizers.special_ids(run.tokenizer)["eot"]
    rng = jax.random.key(int(config.train.seed))
    out: dict[str, list] = {k: [] for k in ("labels", "names", "tokens", "calibrated", "visual_probs", "raw_mean",
                                            "llm_probs")}
    texts: dict[str, list[str]] = {m: [] for m in modes}
    ablated = ablation_count(options, config)
    for i, batch in enumerate(loaded.batches(options.split, options.num_examples)):
        labels = _host(batch["labels"])
        # Ablation modes only while fewer than `ablated` volumes have them (0: every batch).
        batch_modes = modes if not ablated or len(out["names"]) < ablated else modes[:1]
        out["labels"].append(labels)
        out["names"] += sharding.host_strings(list(batch["meta"]["volume_name"]))
        tokens, calibrated, visual_probs = map(_host, encode(variables, batch["slices"], batch["z_mm"], batch["valid"]))
        out["tokens"].append(tokens)
        out["calibrated"].append(calibrated)
        out["visual_probs"].append(visual_probs)
        if options.probe:
            out["raw_mean"].append(probe_lib.mean_pool(_host(batch["slices"]), _host(batch["valid"])))
        key = jax.random.fold_in(rng, i)
        if generator is not None:
            for mode, batch_texts in generate_texts(generator, variables, batch, batch_modes, key).items():
                texts[mode] += batch_texts
            chat = encode_reports(run.tokenizer, texts["normal"][-len(labels):], int(config.data.max_tokens),
                                  run.vcfg.num_visual_tokens)
            out["llm_probs"].append(_host(classify(variables, batch["slices"], batch["z_mm"], batch["valid"],
                                                   chat["input_ids"], chat["attention_mask"], chat["loss_mask"])))
        if totals is not None:
            ids, loss_mask = _host(batch["input_ids"]), _host(batch["loss_mask"]).astype(bool)
            pathology, generic, unaligned = response_word_classes(run.tokenizer, batch["meta"]["response"], ids,
                                                                  loss_mask, eot)
            # NLL of position t is the prediction of token t; loss_mask[:, 0] is never a target.
            masks = {"all": loss_mask & (np.arange(ids.shape[1]) > 0), "pathology": pathology, "generic": generic}
            totals.add_counts(masks, unaligned)
            for mode, fn in nll_fns.items():
                nll = fn(variables, batch["slices"], batch["z_mm"], batch["valid"], batch["input_ids"],
                         batch["attention_mask"], jax.random.fold_in(key, 1))
                totals.add(mode, _host(nll), masks)
        logging.info("evaluate phase %d: batch %d done (%d volumes)", loaded.phase, i, len(out["names"]))
    if not out["names"]:
        raise EvalError(f"split {options.split!r} yielded no volume to evaluate")
    arrays = {k: np.concatenate(v) for k, v in out.items() if k != "names" and v}
    return {**arrays, "names": out["names"], "texts": texts, "nll": totals.summary() if totals else None}


def _compact(report: dict) -> dict:
    """An ablation's numbers: macro F1 / P / R, the CI, per-class F1."""
    return {"macro_f1": report["macro_f1"], "precision": report["macro_precision"], "recall": report["macro_recall"],
            "micro_f1": report["micro_f1"], "macro_f1_ci": report["macro_f1_ci"],
            "per_class_f1": {row["name"]: row["f1"] for row in report["per_class"]}}


def ablation_scores(truth: np.ndarray, labelled: dict[str, np.ndarray], ablations: Sequence[str]) -> dict:
    """Each ablation's numbers on the volumes it generated for (the first len(labelled[mode])),
    beside the full model's macro F1 on those same volumes (`full_macro_f1`, `delta_vs_full`)."""
    scores, full = {}, {}
    for mode in ablations:
        n = len(labelled[mode])
        compact = _compact(metrics_lib.evaluation_report(truth[:n], labelled[mode]))
        if n not in full:      # every mode usually has the same n: one scoring of the full model
            full[n] = score(truth[:n], labelled["normal"][:n])["macro_f1"]
        scores[mode] = {**compact, "num_volumes": n, "full_macro_f1": full[n],
                        "delta_vs_full": compact["macro_f1"] - full[n]}
    return scores


def ablation_bar_values(ablations: dict) -> dict[str, float]:
    """{"full": the full model's F1 on the ablated volumes, mode: the mode's F1}: one phase's bars."""
    full = next(iter(ablations.values()))["full_macro_f1"]
    return {"full": full, **{m: v["macro_f1"] for m, v in ablations.items()}}


def _figure(name: str, fn, *args) -> str | None:
    """Draw one figure; a figure that cannot be drawn is a warning, never a lost evaluation."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        logging.warning("figure %s not written: %s", name, e)
        return None


def visual_tokens(loaded: Loaded, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """V' [M, K, d_v] (float32) and labels [M, C] of `batches` (e.g. `loaded.batches("valid")`)."""
    encode = visual_fn(loaded.model)
    tokens, labels = [], []
    for batch in batches:
        tokens.append(_host(encode(loaded.variables, batch["slices"], batch["z_mm"], batch["valid"])[0]))
        labels.append(_host(batch["labels"]))
    return np.concatenate(tokens), np.concatenate(labels)


ZONE_METHOD = ("figures.zone_evidence: per zone and class, the cross-fitted (2 folds) AUC of a diagonal-LDA score "
               "of that zone's V' token; 0.5 = no evidence; None = fewer than 2 positives or negatives")


def zone_map(tokens: np.ndarray, labels: np.ndarray, path: str,
             title: str = "Zone evidence per class") -> tuple[np.ndarray, str | None]:
    """V' [M, Z, d_v] of evaluated volumes and their labels [M, C] -> ([C, Z] evidence, the PNG written)."""
    evidence = figures.zone_evidence(tokens, labels, folds=2, seed=0)
    return evidence, _figure("zone_map", figures.zone_attention_map, evidence, path, None, "per-zone AUC", title)


def evaluate_phase(loaded: Loaded, options: EvalOptions, out_dir: str) -> dict:
    """Everything for one trained phase into `out_dir`: metrics.json, reports.csv, the figures."""
    t0 = time.time()
    generating = loaded.config.eval.score == "generation"
    modes = ("normal", *options.ablations) if generating else ()
    labeler = options.labeler or config_labeler(loaded.config)
    outputs = _collect_outputs(loaded, options, modes)
    truth = outputs["labels"]
    payload: dict[str, Any] = {"phase": loaded.phase, "checkpoint_step": loaded.step, "split": options.split,
                               "num_volumes": len(truth), "workdir": loaded.run.workdir}
    visual = metrics_lib.evaluation_report(truth, (outputs["visual_probs"] > 0.5).astype(np.int8),
                                           outputs["visual_probs"])
    payload["visual_classifier"] = visual
    figure_paths: dict[str, str | None] = {}
    if generating:
        labelled = {m: labeler(outputs["texts"][m]) for m in modes}
        if hasattr(labeler, "scores"):     # RadBERT: its own probabilities of the reports, as the paper
            scores, scores_note = labeler.scores(outputs["texts"]["normal"]), (
                "RadBERT classifier probabilities on the generated (normal-mode) reports; used for AUC and the "
                "threshold search (the paper's protocol)")
        elif llm_classifier_trained(loaded.config, loaded.run.workdir):
            scores, scores_note = outputs["llm_probs"], ("LLM-visual classifier probabilities on the generated "
                                                         "(normal-mode) report; used for AUC and the threshold search")
        else:
            scores, scores_note = outputs["visual_probs"], (
                "visual classifier probabilities (sigmoid of the head on mean V'; used for AUC and the threshold "
                "search): the LLM-visual classifier is untrained, phase 3's llm_cls loss weight is 0")
        main = metrics_lib.evaluation_report(truth, labelled["normal"], scores)
        payload.update({"labeler": getattr(labeler, "name", type(labeler).__name__), "scores": scores_note,
                        "macro_f1": main["macro_f1"], "precision": main["macro_precision"],
                        "recall": main["macro_recall"], "macro_f1_ci": main["macro_f1_ci"], "report": main})
        payload["ablations"] = ablation_scores(truth, labelled, options.ablations)
        results = {"labels": truth, "volume_names": outputs["names"], **{m: {"texts": outputs["texts"][m]} for m in modes}}
        write_reports_csv(os.path.join(out_dir, "reports.csv"), results, modes)
        if options.ablations:
            bars = {f"phase{loaded.phase}": ablation_bar_values(payload["ablations"])}
            figure_paths["ablations"] = _figure("ablations", figures.ablation_bars, bars,
                                                os.path.join(out_dir, "ablations.png"))
    else:
        main = visual
        payload.update({"scores": "visual classifier probabilities (sigmoid of the head on mean V'); predictions "
                                  "at 0.5", "macro_f1": main["macro_f1"], "precision": main["macro_precision"],
                        "recall": main["macro_recall"], "macro_f1_ci": main["macro_f1_ci"], "report": main})
    figure_paths["per_class_f1"] = _figure("per_class_f1", figures.per_class_f1_bars, main,
                                           os.path.join(out_dir, "per_class_f1.png"),
                                           f"Per-class F1, phase {loaded.phase} ({options.split})")
    log = os.path.join(loaded.run.workdir, "metrics.jsonl")
    if os.path.isfile(log):
        figure_paths["loss_curves"] = _figure("loss_curves", figures.loss_curves, log,
                                              os.path.join(out_dir, "loss_curves.png"))
    if len(truth) >= 2:
        evidence, figure_paths["zone_map"] = zone_map(outputs["tokens"], truth, os.path.join(out_dir, "zone_map.png"),
                                                      f"Zone evidence per class, phase {loaded.phase}")
        payload["zone_evidence"] = {"method": ZONE_METHOD, "class_names": list(findings.CLASS_NAMES),
                                    "matrix": evidence}
    if outputs["nll"] is not None:
        payload["nll"] = outputs["nll"]
    elif options.nll:
        payload["nll"] = {"skipped": f"phase {loaded.phase} trains no language path (NLL needs phase 3 or 4)"}
    if options.probe:
        stages = {"raw_slices": outputs["raw_mean"], "compressor": probe_lib.mean_pool(outputs["tokens"]),
                  f"phase{loaded.phase}": outputs["calibrated"]}
        payload["probe"] = probe_lib.probe_stages(stages, truth, folds=options.probe_folds,
                                                  seed=int(loaded.config.train.seed))
    payload["figures"] = figure_paths
    payload["wall_seconds"] = time.time() - t0
    write_json(os.path.join(out_dir, "metrics.json"), payload)
    logging.info("phase %d: macro F1 %.3f [%.3f, %.3f] on %d volumes -> %s", loaded.phase, payload["macro_f1"],
                 payload["macro_f1_ci"]["low"], payload["macro_f1_ci"]["high"], len(truth), out_dir)
    return payload


# ----------------------------------------------------------------------------- CLI


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The evaluate flags on top of the run flags it shares with train (--workdir, --phase, --config:
    one spelling for both CLIs) and label's (--labeler, --radbert_encoder, --radbert_classifier)."""
    cli_lib.define_run_flags()          # --workdir, --phase, --config, --distributed, ... as train spells them

    flags.DEFINE_enum("split", "valid", ["train", "valid"], "Split to evaluate.")
    flags.DEFINE_string("ablations", ",".join(ABLATIONS), "Visual-token ablations to generate under (Table IX); "
                        "'' for none.")
    flags.DEFINE_bool("nll", False, "Teacher-forced NLL per visual mode, pathology vs generic words (Table X).")
    flags.DEFINE_bool("probe", False, "Linear probe of raw slices, V' and V~ (Table VIII).")
    flags.DEFINE_integer("probe_folds", 5, "Cross-validation folds of the linear probe.")
    flags.DEFINE_integer("num_examples", None, "Volumes to evaluate (whole batches); default "
                         "config.eval.num_examples; 0 = all.")
    flags.DEFINE_integer("ablation_examples", None, "Of those, how many the ablations generate for (the first; "
                         "whole batches); default config.eval.ablation_examples; 0 = all.")


def _fail(message: str, code: int = 1) -> None:
    cli_lib.fail("evaluate", message, code)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --workdir, --phase, --split, --ablations, ...", 2)
    if not FLAGS.workdir:
        _fail("--workdir is required: a training workdir (python -m kervljepa_jax.train --workdir=DIR)", 2)
    for name in ("num_examples", "ablation_examples"):
        if FLAGS[name].value is not None and FLAGS[name].value < 0:
            _fail(f"--{name}={FLAGS[name].value}: use 0 (all) or a positive number of volumes", 2)
    for name in ("init_from", "warm_bridge_from"):
        if FLAGS[name].present:
            _fail(f"--{name} is a training flag; evaluate reads DIR/phaseN/checkpoints", 2)
    if FLAGS.probe and FLAGS.probe_folds < 2:
        _fail(f"--probe_folds={FLAGS.probe_folds}: cross-validation needs at least 2 folds", 2)
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    overrides = cli_lib.config_overrides(sys.argv[1:])
    config_path = cli_lib.config_file_argument(sys.argv[1:])
    arg = config_path.split(":", 1)[1] if ":" in config_path else None
    workdir = FLAGS.workdir
    try:
        if FLAGS.distributed:
            cli_lib.initialize_distributed("evaluate", FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id)
        options = EvalOptions(split=FLAGS.split, ablations=parse_ablations(FLAGS.ablations), nll=FLAGS.nll,
                              probe=FLAGS.probe, probe_folds=FLAGS.probe_folds, num_examples=FLAGS.num_examples,
                              ablation_examples=FLAGS.ablation_examples,
                              labeler=(label_lib.make_labeler(FLAGS.labeler, FLAGS.radbert_encoder,
                                                              FLAGS.radbert_classifier)
                                       if FLAGS["labeler"].present else None))   # None: the config's
        check_workdir(workdir)
        if FLAGS.phase == "all" and FLAGS["phase"].present:
            phases = trained_phases(workdir)
        elif FLAGS.phase == "all":
            phases = [None]                         # the latest trained phase
        else:
            phases = [int(FLAGS.phase)]
        if not phases:
            raise EvalError(f"--workdir={workdir}: no trained phase to evaluate")
        results, run = {}, None
        for phase in phases:
            loaded = load_phase(workdir, phase, overrides, run, arg)
            run = loaded.run
            if FLAGS["ablations"].present and loaded.config.eval.score != "generation" and FLAGS.ablations:
                logging.warning("evaluate: --ablations=%s skipped for phase %d: ablations compare generated "
                                "reports (eval.score=generation)", FLAGS.ablations, loaded.phase)
            with sharding.use_mesh(run.mesh):
                payload = evaluate_phase(loaded, options, os.path.join(workdir, "eval", f"phase{loaded.phase}"))
            results[f"phase{loaded.phase}"] = headline_numbers(payload)
    except (EvalError, run_lib.TrainError, DataError, label_lib.LabelError, FileNotFoundError, KeyError,
            ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(results))


def cli() -> None:
    try:
        _define_flags()
    except (KeyError, AttributeError) as e:
        cli_lib.bad_config_field("evaluate", sys.argv, e)
    app.run(main, flags_parser=cli_lib.flags_parser("evaluate"))


if __name__ == "__main__":
    # Run inside the imported module, the one train.py imports too: one set of functions and flags.
    from kervljepa_jax import evaluate as _module
    _module.cli()
