"""Where a trained generating phase loses the visual findings: reading them, or writing them.

For the best checkpoint of --phase in --workdir, on validation volumes, per class (mean over classes):
  visual_probe_auc   logistic probe on mean-pooled V~ (the tokens the LLM is given)
  hidden_probe_auc   logistic probe on the LLM's last hidden state at the answer start (the prompt
                     with its visual tokens, no answer yet): what the LLM has READ
  forced_choice_auc  the LLM's own log-likelihood of a typical sentence of the class as its first
                     sentence, teacher-forced: what the LLM would WRITE
  generation_f1      macro F1 of sampled reports (eval settings), rule-labelled
Probes are fit on --num_train training volumes. A hidden probe near the visual one with a much lower
forced choice means the LLM holds the findings but does not turn them into words: the bottleneck is
the decoder's writing, not the visual path. Ends with one JSON line of these figures.

  python benchmarks/grounding_gap.py --workdir=/tmp/kervljepa [--phase=3]
"""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from kervljepa_jax import evaluate, findings
from kervljepa_jax.data import text as text_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir with a trained generating phase.")
flags.DEFINE_integer("phase", 3, "Generating phase to inspect (3 or 4).")
flags.DEFINE_integer("num_train", 384, "Training volumes the probes are fit on.")
flags.DEFINE_integer("num_valid", 64, "Validation volumes everything is scored on.")


def class_sentences(seed: int = 0) -> list[str]:
    """One filled positive sentence per class (its first template)."""
    rng = random.Random(seed)
    return [findings.fill_slots(f.positive_sentences[0], rng) for f in findings.FINDINGS]


def per_class_auc(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    """[C] AUCs of scores [B, C] against labels [B, C]; classes with one label value are skipped."""
    return [roc_auc_score(labels[:, c], scores[:, c]) for c in range(labels.shape[1])
            if 0 < labels[:, c].sum() < len(labels)]


def probe_auc(train_x: np.ndarray, train_y: np.ndarray, valid_x: np.ndarray, valid_y: np.ndarray) -> float:
    """Mean per-class AUC on valid of one logistic probe per class fit on train."""
    aucs = []
    for c in range(train_y.shape[1]):
        if not (0 < train_y[:, c].sum() < len(train_y) and 0 < valid_y[:, c].sum() < len(valid_y)):
            continue
        probe = LogisticRegression(C=1.0, max_iter=2000).fit(train_x, train_y[:, c])
        aucs.append(roc_auc_score(valid_y[:, c], probe.decision_function(valid_x)))
    return float(np.mean(aucs))


def main(argv):
    del argv
    loaded = evaluate.load_phase(FLAGS.workdir, FLAGS.phase)
    run, config, model = loaded.run, loaded.config, loaded.model
    prompt = jnp.asarray(text_lib.encode_prompt(run.tokenizer, int(config.data.num_visual_tokens)))

    @jax.jit
    def read(variables, slices, z_mm, valid):
        ids = jnp.tile(prompt[None], (slices.shape[0], 1))
        mask = jnp.ones(ids.shape, bool)
        out = model.apply(variables, slices, z_mm, valid, ids, mask, mask)
        return out.hidden[:, -1], out.visual.calibrated.mean(1)

    def features(split: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        hidden, visual, labels, batches = [], [], [], evaluate.collect(loaded.batches(split, n), n)
        for batch in batches:
            h, v = read(loaded.variables, batch["slices"], batch["z_mm"], batch["valid"])
            hidden.append(np.asarray(h)), visual.append(np.asarray(v)), labels.append(np.asarray(batch["labels"]))
        return np.concatenate(hidden), np.concatenate(visual), np.concatenate(labels), batches

    train_h, train_v, train_y, _ = features("train", FLAGS.num_train)
    valid_h, valid_v, valid_y, batches = features("valid", FLAGS.num_valid)

    # The LLM's log-likelihood of each class's sentence as the first (and, teacher-forced, only scored) sentence.
    chats = evaluate.encode_reports(run.tokenizer, class_sentences(), int(config.data.max_tokens),
                                    int(config.data.num_visual_tokens))
    sentence_mask = chats["loss_mask"].copy()
    sentence_mask[np.arange(len(sentence_mask)), sentence_mask.shape[1] - 1 - np.argmax(sentence_mask[:, ::-1], 1)] = False
    nll = evaluate.token_nll_fn(model, "normal")
    loglik = []
    for batch in batches:
        b = batch["labels"].shape[0]
        rows = np.zeros((b, findings.NUM_CLASSES))
        for c in range(findings.NUM_CLASSES):
            ids = jnp.asarray(np.repeat(chats["input_ids"][c:c + 1], b, 0))
            mask = jnp.asarray(np.repeat(chats["attention_mask"][c:c + 1], b, 0))
            token_nll = np.asarray(nll(loaded.variables, batch["slices"], batch["z_mm"], batch["valid"], ids, mask,
                                       jax.random.key(0)))
            rows[:, c] = -token_nll[:, sentence_mask[c]].sum(1)      # the sentence, not the <|eot_id|> after it
        loglik.append(rows)
    forced = float(np.mean(per_class_auc(valid_y, np.concatenate(loglik))))

    generated = evaluate.generation_eval(loaded.generator(), loaded.variables, batches, ("normal",))
    print(json.dumps({
        "phase": loaded.phase, "visual_probe_auc": round(probe_auc(train_v, train_y, valid_v, valid_y), 4),
        "hidden_probe_auc": round(probe_auc(train_h, train_y, valid_h, valid_y), 4),
        "forced_choice_auc": round(forced, 4), "generation_f1": round(generated["normal"]["macro_f1"], 4),
        "num_train": len(train_y), "num_valid": len(valid_y), "workdir": FLAGS.workdir}))


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
