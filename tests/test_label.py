"""Rule labeler, RadBERT labeler (tiny random RoBERTa vs a direct torch computation) and the CLI.

Report text here is written for these tests; the licensed CT-RATE file is only used by the
last test, which skips when it is absent.
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from kervljepa_jax import findings, label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LICENSED = os.path.join(REPO, "..", "shared", "data", "ctrate_labeled_reports_train.csv")
IDX = {name: i for i, name in enumerate(findings.CLASS_NAMES)}

REPORTS = {
    "A1": ("Trachea and both main bronchi are open. Heart size is normal. No pleural or pericardial "
           "effusion. Calcified atherosclerotic plaques in the aortic arch and the coronary arteries. "
           "A 4 mm nodule in the right upper lobe. No consolidation."),
    "A2": "No significant abnormality. No nodule, mass or infiltrate. No lymphadenopathy.",
    "A3": ("Sternotomy wires. The heart is enlarged. Bilateral pleural effusion with compressive "
           "atelectasis in both lower lobes. Centrilobular emphysema in both upper lobes."),
}
EXPECTED = {
    "A1": {"Arterial wall calcification", "Coronary artery wall calcification", "Lung nodule"},
    "A2": set(),
    "A3": {"Medical material", "Cardiomegaly", "Pleural effusion", "Atelectasis", "Emphysema"},
}


def _expected_row(key):
    return [int(name in EXPECTED[key]) for name in findings.CLASS_NAMES]


def _write_reports(path, rows, header=("AccessionNo", "report_text")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kervljepa_jax.label", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- rules


def test_rule_labeler_rows_match_expected():
    labeler = label.RuleLabeler()
    out = labeler([REPORTS[k] for k in ("A1", "A2", "A3")])
    assert out.shape == (3, 18) and out.dtype == np.int8
    for row, key in zip(out, ("A1", "A2", "A3")):
        assert row.tolist() == _expected_row(key), key
    assert labeler.label(REPORTS["A3"]) == _expected_row("A3")


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_id_and_18_ct_rate_columns(tmp_path):
    src, dst = tmp_path / "reports.csv", tmp_path / "out" / "labels.csv"
    _write_reports(src, [(k, v) for k, v in REPORTS.items()])
    result = _run_cli(f"--input={src}", "--text_column=report_text", "--id_column=AccessionNo",
                      f"--output={dst}")
    assert result.returncode == 0, result.stderr
    with open(dst, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["AccessionNo", *findings.CLASS_NAMES]
    assert [r[0] for r in rows[1:]] == list(REPORTS)
    for r in rows[1:]:
        assert [int(v) for v in r[1:]] == _expected_row(r[0])


def test_cli_missing_file_fails_with_one_line(tmp_path):
    missing = tmp_path / "nope.csv"
    result = _run_cli(f"--input={missing}", f"--output={tmp_path / 'o.csv'}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and str(missing) in lines[0] and "--input" in lines[0]
    assert not (tmp_path / "o.csv").exists()


def test_cli_missing_column_names_the_column_and_flag(tmp_path):
    src = tmp_path / "reports.csv"
    _write_reports(src, [("X1", "No effusion.")], header=("AccessionNo", "Findings_EN"))
    result = _run_cli(f"--input={src}", "--text_column=report_text", f"--output={tmp_path / 'o.csv'}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1
    assert "--text_column=report_text" in lines[0] and "Findings_EN" in lines[0]


def test_cli_unquoted_comma_and_a_folder_as_output_fail_with_one_line(tmp_path):
    src = tmp_path / "reports.csv"
    src.write_text("AccessionNo,report_text\nA1,No effusion, but cardiomegaly is present.\n")
    out = tmp_path / "o.csv"
    for args, text in [((f"--input={src}", f"--output={out}"), "row 2 has more fields than the header"),
                       ((f"--input={src}", f"--output={tmp_path}"), f"--output={tmp_path} is a folder"),
                       ((f"--input={src}", f"--output={out}", "--labeler=bogus"), "--labeler")]:
        result = _run_cli(*args)
        lines = [line for line in result.stderr.strip().splitlines() if line]
        assert result.returncode != 0 and len(lines) == 1 and text in lines[0], (args, result.stderr)
        assert lines[0].startswith("label: ")
    assert not out.exists()


def test_main_raises_system_exit_for_radbert_without_paths(tmp_path):
    src = tmp_path / "reports.csv"
    _write_reports(src, [("X1", "No effusion.")])
    with pytest.raises(label.LabelError, match="--radbert_encoder"):
        label.run(str(src), str(tmp_path / "o.csv"), "report_text", "AccessionNo", "radbert")


def test_read_reports_rejects_empty_file(tmp_path):
    src = tmp_path / "reports.csv"
    _write_reports(src, [])
    with pytest.raises(label.LabelError, match="no rows"):
        label.read_reports(str(src), "report_text", "AccessionNo")


# ----------------------------------------------------------------------------- RadBERT

try:  # torch is an optional dependency of the RadBERT labeler only
    import torch
    import transformers
except ImportError:  # pragma: no cover - depends on the environment
    torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch/transformers not installed")


def _tiny_roberta(folder, seed):
    """A random 2-layer RoBERTa with a word-level tokenizer built here, saved as HF folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w.strip(".,").lower() for text in REPORTS.values() for w in text.split()})
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                                        eos_token_id=2, type_vocab_size=1)
    model = transformers.RobertaModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(folder)
    return fast, model


def _reference_scores(tokenizer, model, weight, bias, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        return torch.sigmoid(pooled @ weight.T + bias).numpy()


@pytest.fixture(scope="module")
def radbert(tmp_path_factory):
    root = tmp_path_factory.mktemp("radbert")
    tokenizer, model = _tiny_roberta(str(root / "encoder"), seed=0)
    torch.manual_seed(1)
    weight = torch.randn(18, 32) * 0.5
    bias = torch.linspace(-3.0, 3.0, 18)  # some classes clearly off, some clearly on
    return root, tokenizer, model, weight, bias


@needs_torch
def test_radbert_bare_linear_safetensors_matches_torch(radbert):
    from safetensors.torch import save_file

    root, tokenizer, model, weight, bias = radbert
    path = str(root / "head.safetensors")
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, path)
    labeler = label.RadBertLabeler(str(root / "encoder"), path, batch_size=2)
    texts = list(REPORTS.values())
    reference = _reference_scores(tokenizer, model, weight, bias, texts)
    np.testing.assert_allclose(labeler.scores(texts), reference, rtol=1e-5, atol=1e-6)
    predicted = labeler(texts)
    np.testing.assert_array_equal(predicted, (reference > 0.5).astype(np.int8))
    assert 0 < predicted.sum() < predicted.size


@needs_torch
def test_radbert_ct_rate_checkpoint_encoder_weights_override_the_folder(radbert, tmp_path):
    """The CT-RATE checkpoint holds `model.*` (the fine-tuned encoder) and `classifier.*`."""
    root, tokenizer, _, weight, bias = radbert
    _, finetuned = _tiny_roberta(str(tmp_path / "other"), seed=7)
    state = {f"model.{k}": v for k, v in finetuned.state_dict().items()}
    state.update({"classifier.weight": weight, "classifier.bias": bias})
    path = str(tmp_path / "classifier.pt")
    torch.save(state, path)
    labeler = label.RadBertLabeler(str(root / "encoder"), path)
    texts = list(REPORTS.values())
    reference = _reference_scores(tokenizer, finetuned, weight, bias, texts)
    np.testing.assert_allclose(labeler.scores(texts), reference, rtol=1e-5, atol=1e-6)


@needs_torch
def test_radbert_cli_end_to_end(radbert, tmp_path):
    from safetensors.torch import save_file

    root, tokenizer, model, weight, bias = radbert
    head = str(tmp_path / "head.safetensors")
    save_file({"classifier.weight": weight.contiguous(), "classifier.bias": bias.contiguous()}, head)
    src, dst = tmp_path / "reports.csv", tmp_path / "labels.csv"
    _write_reports(src, [(k, v) for k, v in REPORTS.items()])
    labels = label.run(str(src), str(dst), "report_text", "AccessionNo", "radbert",
                       str(root / "encoder"), head)
    reference = _reference_scores(tokenizer, model, weight, bias, list(REPORTS.values())) > 0.5
    np.testing.assert_array_equal(labels, reference.astype(np.int8))
    with open(dst, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["AccessionNo", *findings.CLASS_NAMES] and len(rows) == 4


@needs_torch
def test_radbert_rejects_wrong_head_shape_and_missing_paths(radbert, tmp_path):
    from safetensors.torch import save_file

    root = radbert[0]
    path = str(tmp_path / "bad.safetensors")
    save_file({"weight": torch.zeros(17, 32), "bias": torch.zeros(17)}, path)
    with pytest.raises(label.LabelError, match=r"expected \[18, hidden\]"):
        label.RadBertLabeler(str(root / "encoder"), path)
    save_file({"weight": torch.zeros(18, 16), "bias": torch.zeros(18)}, path)
    with pytest.raises(label.LabelError, match="hidden size 16"):
        label.RadBertLabeler(str(root / "encoder"), path)
    with pytest.raises(label.LabelError, match="--radbert_classifier"):
        label.RadBertLabeler(str(root / "encoder"), str(tmp_path / "missing.pt"))
    with pytest.raises(label.LabelError, match="--radbert_encoder"):
        label.RadBertLabeler(str(tmp_path / "no_encoder"), path)


# ----------------------------------------------------------------------------- licensed data


@pytest.mark.skipif(not os.path.isfile(LICENSED), reason="licensed CT-RATE labelled reports not present")
def test_rule_labeler_on_licensed_reports_keeps_macro_f1():
    """Regression guard on the 800 manually labelled reports (measurement only, read by path)."""
    from kervljepa_jax import metrics

    with open(LICENSED, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    truth = np.array([[int(r[n]) for n in findings.CLASS_NAMES] for r in rows])
    predicted = label.RuleLabeler()([r["report_text"] for r in rows])
    assert metrics.classification_metrics(truth, predicted)["macro_f1"] >= 0.93
