"""How well the stand-in LLM follows a prompt that NAMES the findings: a ceiling for phase 3.

Phase 3 has to turn visual tokens into a findings text. A real Llama 3.2 3B can already write the
findings it is told about; the tiny stand-in learns that from findings-by-name conversations
(`data.text.findings_by_name_chat`): the packaged one (`kervljepa_jax/stand_in.py`) once, offline,
or a phase 0 in the workdir (`--stand_in=phase0`, the embedded 300 steps). If it cannot write the right findings when the
prompt spells out their names, it will not write them from visual tokens either, whatever the
bridge learns. Measured on the validation volumes' label sets, sampling with the eval settings:
  names_macro_f1     the rule labeler on the answer vs the named classes (macro F1, P, R)
  single_name_*      prompts naming one random class: how often it is mentioned, and how many
                     other classes each answer mentions (0 for a model that follows the prompt)
  answer_nll_*       teacher-forced NLL per answer token under the volume's own names vs another
                     volume's names (no gap: the names are ignored)
Ends with one JSON line of these figures.

  python benchmarks/stand_in_llm.py [--workdir=DIR] [--stand_in=phase0]   # DIR: reuses DIR/base_llm
"""

from __future__ import annotations

import json
import tempfile

import jax
import numpy as np
from absl import app, flags

from kervljepa_jax import findings, generate, metrics
from kervljepa_jax.data import synthetic, text as text_lib, tokenizer as tokenizers
from kervljepa_jax.label import RuleLabeler
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.training import config as config_lib, run as run_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "A training workdir whose base_llm/ to use (default: a temporary one, "
                    "which gets the stand-in --stand_in names).")
flags.DEFINE_enum("stand_in", "packaged", ["packaged", "phase0"], "Base LLM of a fresh workdir: the packaged "
                  "stand-in, or a phase 0 with the embedded config.")
flags.DEFINE_integer("num_volumes", 64, "Validation label sets to prompt with.")
flags.DEFINE_integer("max_new_tokens", 160, "Answer length cap (the embedded eval.max_new_tokens).")


def left_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids, mask = np.full((len(rows), width), pad, np.int32), np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, True
    return ids, mask


def answers(run: run_lib.Run, config, label_sets: list[np.ndarray], seed: int) -> list[str]:
    special = tokenizers.special_ids(run.tokenizer)
    ids, mask = left_padded(text_lib.encode_texts(run.tokenizer, [text_lib.findings_by_name_prompt(y) for y in label_sets]),
                            special["pad"])
    out = generate.generate_text(llama_lib.Llama(run.llm_cfg), run.llm_params, ids, mask,
                                 run_lib.sampling_config(config), jax.random.key(seed),
                                 eos_ids=(special["eot"],), pad_id=special["pad"])
    drop = {special["pad"], special["eot"]}
    return [run.tokenizer.decode([t for t in row if t not in drop]) for row in np.asarray(out.tokens)]


def answer_nll(run: run_lib.Run, label_sets: list[np.ndarray], answers_text: list[str]) -> float:
    """Mean NLL per answer token (+ eot) after the names prompt of `label_sets`: one forward of
    every conversation, right-padded to one width (one compilation)."""
    model = llama_lib.Llama(run.llm_cfg)
    pad = tokenizers.special_ids(run.tokenizer)["pad"]
    prompts = text_lib.encode_texts(run.tokenizer, [text_lib.findings_by_name_prompt(y) for y in label_sets])
    targets = text_lib.encode_texts(run.tokenizer, [a + text_lib.EOT for a in answers_text])
    rows = [p + t for p, t in zip(prompts, targets)]
    ids = np.full((len(rows), max(map(len, rows))), pad, np.int32)
    scored = np.zeros(ids.shape, bool)          # position i is scored when token i + 1 is an answer token
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)] = r
        scored[i, len(p) - 1:len(r) - 1] = True
    logits = model.apply({"params": run.llm_params}, ids, attention_mask=ids != pad).logits
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))[:, :-1]
    picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return float(-(picked * scored[:, :-1]).sum() / scored.sum())


def main(argv):
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="stand_in_llm_")
    config = config_lib.apply_overrides(config_lib.load_phase_config(3),
                                        {"eval.max_new_tokens": str(FLAGS.max_new_tokens),
                                         "model.stand_in": FLAGS.stand_in})
    run = run_lib.Run(config, workdir)                     # installs or pretrains base_llm/ when absent
    seed, labeler = int(config.data.seed), RuleLabeler()
    volumes = [synthetic.sample_volume_text(seed, "valid", i) for i in range(FLAGS.num_volumes)]
    truth = np.stack([np.asarray(v["labels"]) for v in volumes])
    named = metrics.evaluation_report(truth, labeler(answers(run, config, list(truth), seed)))

    rng = np.random.default_rng(seed)
    single = np.zeros_like(truth)
    single[np.arange(len(single)), rng.integers(0, findings.NUM_CLASSES, len(single))] = 1
    mentioned = labeler(answers(run, config, list(single), seed + 1))

    abnormal = [i for i in range(len(volumes)) if truth[i].any()]
    targets = [text_lib.positive_findings_text(volumes[i]["report"], truth[i], rng) for i in abnormal]
    own = answer_nll(run, [truth[i] for i in abnormal], targets)
    other = answer_nll(run, [truth[abnormal[(k + 1) % len(abnormal)]] for k in range(len(abnormal))], targets)
    print(json.dumps({
        "names_macro_f1": round(named["macro_f1"], 4), "names_precision": round(named["macro_precision"], 4),
        "names_recall": round(named["macro_recall"], 4),
        "single_name_mentioned": round(float((mentioned & single).sum() / single.sum()), 4),
        "single_name_other_classes_per_answer": round(float((mentioned & (1 - single)).sum() / len(single)), 3),
        "answer_nll_own_names": round(own, 4), "answer_nll_other_names": round(other, 4),
        "num_volumes": FLAGS.num_volumes, "workdir": workdir}))


if __name__ == "__main__":
    app.run(main)
