"""Free-text report -> the 18 CT-RATE labels: a rule labeler and the official RadBERT protocol.

Two labelers with one interface (`labeler(texts) -> int8 [N, 18]` in `CLASS_NAMES` order):

- `RuleLabeler`: pure Python, sentence- and clause-level, negation and uncertainty aware; its
  lexicon is `kervljepa_jax.findings` (the same one the positive-findings text builder uses).
  Uncertainty convention (see `findings`): hedged-positive mentions ("suspicious for",
  "consistent with", "probable") count as present; negative hedges ("unlikely", "to rule out")
  and question-marked differentials ("(lymph node?)") do not.
- `RadBertLabeler`: the CT-RATE text classifier, a RoBERTa encoder (e.g. RadBERT-RoBERTa-4m)
  with a Linear(hidden, 18) on the pooler output, sigmoid > 0.5, loaded from local paths only.
  torch is optional and imported lazily.

CLI:
  python -m kervljepa_jax.label --input=reports.csv --text_column=report_text \\
      --id_column=AccessionNo --output=labels.csv [--labeler=rules|radbert \\
      --radbert_encoder=DIR --radbert_classifier=FILE]
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, findings

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class LabelError(ValueError):
    """An input problem, described in one line that names the file, column or flag."""


class RuleLabeler:
    """Report texts -> int8 [N, 18] labels by the `findings` lexicon (no model, no I/O)."""

    name = "rules"

    def label(self, text: str) -> list[int]:
        """One report -> 18 0/1 values in CLASS_NAMES order."""
        return findings.labels_from_indices(findings.report_findings(text))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), findings.NUM_CLASSES), np.int8)
        for row, text in enumerate(texts):
            for index in findings.report_findings(text):
                out[row, index] = 1
        return out


def _unwrap_state_dict(checkpoint) -> dict:
    """Accept a bare state dict or one wrapped under a common key."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise LabelError(f"classifier checkpoint holds a {type(checkpoint).__name__}, expected a state dict")
    return checkpoint


def _load_classifier_state(path: str) -> dict:
    """A safetensors or torch (weights_only) file -> {name: tensor}."""
    import torch

    if not os.path.isfile(path):
        raise LabelError(f"--radbert_classifier: no such file {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _split_classifier_state(state: dict, path: str) -> tuple[dict, "object", "object"]:
    """{encoder weights (maybe empty)}, Linear weight [18, H], bias [18] from a checkpoint.

    The CT-RATE checkpoint stores the encoder under `model.` and the head as `classifier.`;
    a bare Linear state dict (`weight`, `bias`) is accepted too.
    """
    for prefix in ("classifier.", ""):
        if f"{prefix}weight" in state and f"{prefix}bias" in state:
            weight, bias = state[f"{prefix}weight"], state[f"{prefix}bias"]
            break
    else:
        raise LabelError(f"{path}: no classifier.weight/classifier.bias (nor weight/bias) in the checkpoint")
    if weight.ndim != 2 or weight.shape[0] != findings.NUM_CLASSES or bias.shape != (findings.NUM_CLASSES,):
        raise LabelError(f"{path}: classifier weight {tuple(weight.shape)} / bias {tuple(bias.shape)}, "
                         f"expected [{findings.NUM_CLASSES}, hidden] / [{findings.NUM_CLASSES}]")
    encoder = {}
    for key, value in state.items():
        for prefix in ("model.", "roberta.", "bert.", "encoder_model."):
            if key.startswith(prefix):
                encoder[key[len(prefix):]] = value
    return encoder, weight, bias


class RadBertLabeler:
    """The official CT-RATE protocol: RoBERTa pooler output -> Linear(hidden, 18) -> sigmoid > 0.5.

    encoder_dir: a local transformers folder (config, weights, tokenizer), e.g. RadBERT-RoBERTa-4m.
    classifier_path: the classifier checkpoint (.pt/.pth via torch.load(weights_only=True), or
        .safetensors); encoder weights inside it (`model.*`) replace the folder's.
    """

    name = "radbert"

    def __init__(self, encoder_dir: str, classifier_path: str, *, batch_size: int = 16,
                 max_length: int = 512, threshold: float = 0.5, device: str = "cpu"):
        try:
            import torch  # noqa: F401  (optional dependency)
            import transformers
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise LabelError(f"--labeler=radbert needs torch and transformers ({err}); "
                             "install the 'torch' extra") from err
        if not os.path.isdir(encoder_dir):
            raise LabelError(f"--radbert_encoder: no such folder {encoder_dir}")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        self.encoder = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True, use_safetensors=True,
                                                              add_pooling_layer=True)
        encoder_state, weight, bias = _split_classifier_state(_load_classifier_state(classifier_path),
                                                              classifier_path)
        if encoder_state:
            missing, unexpected = self.encoder.load_state_dict(encoder_state, strict=False)
            # position_ids is a buffer some versions save and others do not.
            missing = [k for k in missing if not k.endswith("position_ids")]
            unexpected = [k for k in unexpected if not k.endswith("position_ids")]
            if missing or unexpected:
                raise LabelError(f"{classifier_path}: encoder weights do not match {encoder_dir} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if weight.shape[1] != self.encoder.config.hidden_size:
            raise LabelError(f"{classifier_path}: classifier expects hidden size {weight.shape[1]}, "
                             f"the encoder in {encoder_dir} has {self.encoder.config.hidden_size}")
        self.weight, self.bias = weight.float(), bias.float()
        # RoBERTa's positions start after the padding index: 514 positions hold 512 tokens.
        positions = getattr(self.encoder.config, "max_position_embeddings", max_length + 2) - 2
        self.batch_size, self.max_length, self.threshold = batch_size, min(max_length, positions), threshold
        self.device = device
        self.encoder.to(device).eval()
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Sigmoid probabilities float32 [N, 18]."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                       truncation=True, max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                pooled = self.encoder(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).pooler_output
                logits = pooled.float() @ self.weight.T + self.bias
                out.append(torch.sigmoid(logits).cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, findings.NUM_CLASSES), np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return (self.scores(texts) > self.threshold).astype(np.int8)


def read_reports(path: str, text_column: str, id_column: str) -> tuple[list[str], list[str]]:
    """CSV -> (ids, texts); one-line LabelError for a missing file, column or empty input."""
    if not os.path.isfile(path):
        raise LabelError(f"--input: no such file {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for flag, column in (("--text_column", text_column), ("--id_column", id_column)):
            if column not in columns:
                raise LabelError(f"{path}: {flag}={column} is not a column (columns: {', '.join(columns)})")
        ids, texts = [], []
        for row in reader:
            if row[text_column] is None or row[id_column] is None:
                raise LabelError(f"{path}: row {reader.line_num} has fewer fields than the header")
            if None in row:      # csv.DictReader's key for fields past the header: an unquoted comma
                raise LabelError(f"{path}: row {reader.line_num} has more fields than the header; quote "
                                 "text that holds commas")
            ids.append(row[id_column])
            texts.append(row[text_column])
    if not ids:
        raise LabelError(f"{path}: no rows")
    return ids, texts


def write_labels(path: str, id_column: str, ids: Sequence[str], labels: np.ndarray) -> None:
    """Id column + the 18 CT-RATE class columns (names and order), values 0/1."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_column, *findings.CLASS_NAMES])
        for row_id, row in zip(ids, labels):
            writer.writerow([row_id, *(int(v) for v in row)])


def label_texts(labeler, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
    """Label in chunks with a tqdm progress bar: int8 [N, 18]."""
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(texts), desc=f"labelling ({labeler.name})", unit="report") as bar:
        for start in range(0, len(texts), chunk):
            parts.append(labeler(texts[start:start + chunk]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts, 0)


def make_labeler(kind: str, radbert_encoder: str | None, radbert_classifier: str | None):
    if kind == "rules":
        return RuleLabeler()
    if kind == "radbert":
        if not radbert_encoder or not radbert_classifier:
            raise LabelError("--labeler=radbert needs --radbert_encoder=DIR and --radbert_classifier=FILE")
        return RadBertLabeler(radbert_encoder, radbert_classifier)
    raise LabelError(f"--labeler={kind}: expected 'rules' or 'radbert'")


FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "CSV of reports.")
flags.DEFINE_string("text_column", "report_text", "Column holding the report text.")
flags.DEFINE_string("id_column", "AccessionNo", "Column holding the report id.")
flags.DEFINE_string("output", None, "CSV to write: id column + the 18 CT-RATE classes (0/1).")
flags.DEFINE_enum("labeler", "rules", ["rules", "radbert"], "Which labeler.")
flags.DEFINE_string("radbert_encoder", None, "Local RoBERTa encoder folder (with tokenizer).")
flags.DEFINE_string("radbert_classifier", None, "Classifier checkpoint (.pt/.pth/.safetensors).")


def run(input_path: str, output_path: str, text_column: str, id_column: str, labeler_kind: str,
        radbert_encoder: str | None = None, radbert_classifier: str | None = None) -> np.ndarray:
    """Read, label, write; returns the labels int8 [N, 18]."""
    ids, texts = read_reports(input_path, text_column, id_column)
    empty = [row_id for row_id, t in zip(ids, texts) if not t.strip()]
    if empty:
        logging.warning("%s: %d of %d reports are empty (%s%s); they get all-zero labels", input_path,
                        len(empty), len(texts), ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")
    labeler = make_labeler(labeler_kind, radbert_encoder, radbert_classifier)
    labels = label_texts(labeler, texts)
    write_labels(output_path, id_column, ids, labels)
    logging.info("wrote %d x %d labels to %s (%s labeler)", *labels.shape, output_path, labeler.name)
    return labels


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        cli_lib.fail("label", f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not FLAGS.input or not FLAGS.output:
        cli_lib.fail("label", "--input and --output are required", 2)
    if os.path.isdir(FLAGS.output):
        cli_lib.fail("label", f"--output={FLAGS.output} is a folder; pass a CSV file path", 2)
    cli_lib.ensure_parent("label", "output", FLAGS.output)
    try:
        run(FLAGS.input, FLAGS.output, FLAGS.text_column, FLAGS.id_column, FLAGS.labeler,
            FLAGS.radbert_encoder, FLAGS.radbert_classifier)
    except LabelError as err:
        cli_lib.fail("label", str(err))


if __name__ == "__main__":
    app.run(main, flags_parser=cli_lib.flags_parser("label"))
