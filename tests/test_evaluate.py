"""The evaluation library and CLI: pathology/generic token split, teacher-forced NLL == the LM loss,
config restored from the checkpoint, one-line CLI errors; (slow) the CLI end to end on a tiny
trained workdir (phases 1 and 3) with --nll --probe: metrics.json, reports.csv, figures."""

import csv
import json
import math
import os
import subprocess
import sys

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from kervljepa_jax import evaluate, findings, losses, metrics as metrics_lib, train
from kervljepa_jax.label import RuleLabeler
from kervljepa_jax.data import text as text_lib, tokenizer as tokenizers
from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import checkpoint as ckpt_lib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}   # one device: the CLI as a user runs it
SMALL = {"train.max_steps": "2", "data.num_train": "64", "data.num_valid": "16",
         "eval.num_examples": "8", "eval.max_new_tokens": "8"}


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "kervljepa_jax.evaluate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(process, timeout=900):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# ----------------------------------------------------------------------------- pathology vs generic words


@pytest.fixture(scope="module")
def tokenizer():
    texts = [s for f in findings.FINDINGS for s in (*f.positive_sentences, *f.negative_sentences, f.fallback_sentence)]
    return tokenizers.train_bpe(texts + [text_lib.chat_prompt(4)], 400)


def test_pathology_spans_cover_asserted_and_negated_findings():
    text = "No pleural effusion. Mild cardiomegaly. The trachea is patent."
    covered = "".join(text[a:b] for a, b in evaluate.pathology_spans(text))
    assert "effusion" in covered and "cardiomegaly" in covered
    assert "trachea" not in covered and "patent" not in covered and not covered.startswith("No")


def test_word_classes_partition_the_response_tokens(tokenizer):
    ids = tokenizers.special_ids(tokenizer)
    prompt = text_lib.encode_prompt(tokenizer, 4)
    responses = ["No pleural effusion. The trachea is patent.", "Mild cardiomegaly."]
    rows = [text_lib.encode_chat(tokenizer, prompt, r, 256, ids["pad"], ids["eot"])[0] for r in responses]
    input_ids = np.stack([r["input_ids"] for r in rows])
    loss_mask = np.stack([r["loss_mask"] for r in rows])
    pathology, generic, unaligned = evaluate.response_word_classes(tokenizer, responses, input_ids, loss_mask,
                                                                   ids["eot"])
    assert unaligned == 0
    assert not (pathology & generic).any()
    # every target but the closing <|eot_id|> is in exactly one class
    eot = input_ids == ids["eot"]
    np.testing.assert_array_equal(pathology | generic, loss_mask & ~eot)
    words = lambda mask, row: tokenizer.decode(input_ids[row][mask[row]])  # noqa: E731
    assert "effusion" in words(pathology, 0) and "trachea" in words(generic, 0) and "No" in words(generic, 0)
    assert "trachea" not in words(pathology, 0)
    assert words(pathology, 1).strip() == "cardiomegaly"
    # a reference that does not re-encode to the batch's ids is left out, and counted
    pathology, generic, unaligned = evaluate.response_word_classes(tokenizer, ["Something else.", responses[1]],
                                                                   input_ids, loss_mask, ids["eot"])
    assert unaligned == 1 and not (pathology[0] | generic[0]).any() and pathology[1].any()


def test_nll_totals_are_token_means_with_deltas():
    totals = evaluate.NLLTotals(("normal", "zero"))
    masks = {"all": np.array([[1, 1, 1]], bool), "pathology": np.array([[1, 0, 0]], bool),
             "generic": np.array([[0, 1, 0]], bool)}
    totals.add_counts(masks, unaligned=0)
    totals.add("normal", np.array([[1.0, 2.0, 3.0]]), masks)
    totals.add("zero", np.array([[4.0, 2.0, 3.0]]), masks)
    summary = totals.summary()
    assert summary["normal"] == {"all": 2.0, "pathology": 1.0, "generic": 2.0}
    assert summary["zero"]["pathology"] == 4.0 and summary["zero"]["delta_vs_normal"]["pathology"] == 3.0
    assert summary["tokens"] == {"all": 3, "pathology": 1, "generic": 1}


# ----------------------------------------------------------------------------- jitted model calls

VIS, K = 5, 4
CFG = vlm_lib.make_config("tiny", visual_token_id=VIS, d_visual=16, num_visual_tokens=K,
                          lora=lora_lib.LoraConfig(rank=2, alpha=4.0), vocab_size=128, injection_layers=(1,))


def _random_variables(model, *inputs):
    """Random values in the init's shapes (an abstract init: tracing only, no 20 s init compile)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(treedef, [jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype) for s in leaves])


def test_token_nll_mean_is_the_lm_loss_and_ablations_change_it():
    rng = np.random.default_rng(0)
    b, n, t = 3, 6, 12
    slices = jnp.asarray(rng.standard_normal((b, n, 16)), jnp.float32)
    z = jnp.asarray(np.cumsum(np.full((b, n), 1.5), 1), jnp.float32)
    valid = jnp.asarray(np.arange(n)[None] < np.array([[6], [4], [2]]))
    ids = rng.integers(10, 128, (b, t))
    ids[:, 1:1 + K] = VIS
    ids = jnp.asarray(ids, jnp.int32)
    attention = jnp.asarray(np.arange(t)[None] < np.array([[12], [10], [8]]))
    loss_mask = attention & (jnp.arange(t)[None] >= 1 + K + 1)
    model = vlm_lib.VLM(CFG)
    variables = _random_variables(model, slices, z, valid, ids, attention)
    lm_loss = jax.jit(lambda v: losses.lm_loss(model.apply(v, slices, z, valid, ids, attention).logits, ids,
                                                loss_mask))(variables)
    nll = {m: np.asarray(evaluate.token_nll_fn(model, m)(variables, slices, z, valid, ids, attention,
                                                          jax.random.key(1))) for m in ("normal", "zero")}
    mask = np.asarray(loss_mask)
    assert nll["normal"].shape == (b, t) and (nll["normal"][:, 0] == 0).all()
    np.testing.assert_allclose(nll["normal"][mask].mean(), float(lm_loss), rtol=1e-5)
    assert np.isfinite(nll["zero"]).all() and not np.allclose(nll["zero"][mask], nll["normal"][mask])


# ----------------------------------------------------------------------------- config and checkpoints


def _fake_checkpoint(workdir, phase, config):
    ckpt = ckpt_lib.PhaseCheckpointer(workdir, phase, async_save=False)
    ckpt.save(3, params={"w": np.zeros(2, np.float32)}, config=config)
    ckpt.close()


def test_phase_config_comes_from_the_checkpoint_then_the_command_line(tmp_path):

    trained = train.phase_config(3, None, {"data.num_train": "64", "data.embed_dim": "48", "eval.max_new_tokens": "7"})
    _fake_checkpoint(tmp_path, 3, trained)
    assert evaluate.trained_phases(str(tmp_path)) == [3]
    config = evaluate.phase_eval_config(str(tmp_path), 3, {"eval.max_new_tokens": "11"})
    assert config.data.num_train == 64 and config.eval.max_new_tokens == 11
    assert config.data.embed_dim == 48 and config.model.d_visual == 48      # the field reference survives
    assert isinstance(config.optimizer_groups, type(trained.optimizer_groups))
    assert list(config.optimizer_groups) == list(trained.optimizer_groups)
    with pytest.raises(evaluate.EvalError, match="--config.eval.nope"):
        evaluate.phase_eval_config(str(tmp_path), 3, {"eval.nope": "1"})
    with pytest.raises(evaluate.EvalError, match="phase 4: no checkpoint"):
        evaluate.check_phase(str(tmp_path), 4)


def test_phase4_asks_the_saved_phase3_config_whether_the_llm_classifier_trained(tmp_path):

    phase4 = train.phase_config(4, None, {})
    assert not evaluate.llm_classifier_trained(phase4, str(tmp_path))    # no phase 3 here: the default profile's
    assert evaluate.llm_classifier_trained(train.phase_config(4, "paper", {}), str(tmp_path))
    _fake_checkpoint(tmp_path, 3, train.phase_config(3, None, {"loss_weights.llm_cls": "3.0"}))
    assert evaluate.llm_classifier_trained(phase4, str(tmp_path))        # what phase 3 ran with wins


def test_ablation_flag_and_strict_json(tmp_path):
    assert evaluate.parse_ablations("zero, noise,zero") == ("zero", "noise")
    assert evaluate.parse_ablations("") == ()
    with pytest.raises(evaluate.EvalError, match="'blur'"):
        evaluate.parse_ablations("zero,blur")
    path = tmp_path / "m.json"
    evaluate.write_json(str(path), {"a": float("nan"), "b": np.array([1.0, np.inf]), "c": np.int64(2)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": 2}


def test_ablations_are_scored_against_the_full_model_on_the_volumes_they_generated_for(tmp_path):
    rng = np.random.default_rng(0)
    truth = (rng.random((24, findings.NUM_CLASSES)) < 0.3).astype(np.int8)
    normal = np.where(rng.random(truth.shape) < 0.8, truth, 1 - truth).astype(np.int8)
    zero = np.zeros((8, findings.NUM_CLASSES), np.int8)               # generated for the first 8 only
    scores = evaluate.ablation_scores(truth, {"normal": normal, "zero": zero}, ("zero",))["zero"]
    full_on_8 = metrics_lib.evaluation_report(truth[:8], normal[:8])["macro_f1"]
    assert scores["num_volumes"] == 8 and scores["full_macro_f1"] == pytest.approx(full_on_8)
    assert full_on_8 != pytest.approx(metrics_lib.evaluation_report(truth, normal)["macro_f1"])
    assert scores["macro_f1"] == 0.0 and scores["delta_vs_full"] == pytest.approx(-full_on_8)
    assert evaluate.ablation_bar_values({"zero": scores}) == {"full": scores["full_macro_f1"], "zero": 0.0}
    path = tmp_path / "reports.csv"
    results = {"labels": truth[:3], "volume_names": ["a", "b", "c"], "normal": {"texts": ["x", "y", "z"]},
               "zero": {"texts": ["w"]}}
    evaluate.write_reports_csv(str(path), results, ("normal", "zero"))
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    assert [r["report_zero"] for r in rows] == ["w", "", ""] and [r["report_normal"] for r in rows] == ["x", "y", "z"]


def test_ablation_count_comes_from_the_option_then_the_config():
    config = train.phase_config(3, None, {})
    assert evaluate.ablation_count(evaluate.EvalOptions(), config) == 128      # the default run's EMBEDDED value
    assert evaluate.ablation_count(evaluate.EvalOptions(ablation_examples=0), config) == 0
    assert evaluate.ablation_count(evaluate.EvalOptions(), train.phase_config(3, "paper", {})) == 0
    with pytest.raises(evaluate.EvalError, match="--ablation_examples=-1"):
        evaluate.ablation_count(evaluate.EvalOptions(ablation_examples=-1), config)


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {  # args -> (exit code, text of the last stderr line); the rest of the checks are in-process
        (): (2, "--workdir is required"),
        (f"--workdir={tmp_path / 'missing'}", "--phase=3"): (1, "does not exist"),
        (f"--workdir={empty}", "--no_such_flag=1"): (2, "Unknown command line flag 'no_such_flag'"),
        (f"--workdir={empty}", "--config.eval.no_such_field=1"): (2, "--config.eval.no_such_field"),
        (f"--workdir={empty}", "--ablation_examples=-8"): (2, "--ablation_examples=-8"),
    }
    running = {args: _cli(*args) for args in cases}                  # in parallel: each pays the imports
    for args, process in running.items():
        code, _, err = _finish(process, timeout=300)
        want_code, want_text = cases[args]
        last = err.strip().splitlines()[-1]
        assert code == want_code and want_text in last and last.startswith("evaluate: "), (args, err[-1500:])


# ----------------------------------------------------------------------------- end to end (slow)

TRAIN_SCRIPT = """
import sys
from kervljepa_jax import sharding, train
workdir, overrides = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
configs = {p: train.phase_config(p, None, overrides) for p in (1, 3)}
for config in configs.values():
    config.data.workdir = workdir
run = train.Run(configs[1], workdir)
run.configs = configs
with sharding.use_mesh(run.mesh):       # phase 1, then phase 3 from it (phase 2 skipped: --init_from)
    train.train_phase(run, configs[1], 1)
    train.train_phase(run, configs[3], 3, init_from=f"{workdir}/phase1")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workdir trained for 2 steps in phases 1 and 3 (one process, no final evaluation)."""
    workdir = tmp_path_factory.mktemp("trained")
    out = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(workdir), *(f"{k}={v}" for k, v in SMALL.items())],
                         capture_output=True, text=True, timeout=1200, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def evaluated(trained):
    """`--phase=all --nll --probe` on it: phase 1 (classifier path) and phase 3 (generation) in one run."""
    code, out, err = _finish(_cli(f"--workdir={trained}", "--phase=all", "--nll", "--probe", "--probe_folds=2",
                                  "--num_examples=16", "--ablation_examples=8"), timeout=1200)
    assert code == 0, err[-3000:]
    return trained, json.loads(out.strip().splitlines()[-1])


def _check_png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.shape[0] >= 150 and pixels.shape[1] >= 300 and pixels[..., :3].std() > 0.01


def _finite_number(x):
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.slow
def test_generating_phase_metrics_reports_and_figures(evaluated):
    workdir, summary = evaluated
    assert set(summary) == {"phase1", "phase3"}
    out = workdir / "eval" / "phase3"
    metrics = json.loads((out / "metrics.json").read_text())       # strict JSON (NaN would not parse back equal)
    assert metrics["phase"] == 3 and metrics["num_volumes"] == 16 and metrics["labeler"] == "rules"
    assert summary["phase3"]["macro_f1"] == metrics["macro_f1"]
    assert summary["phase3"]["ablations"]["zero"]["macro_f1"] == metrics["ablations"]["zero"]["macro_f1"]
    assert summary["phase3"]["per_class_f1"]["Cardiomegaly"] == metrics["report"]["per_class"][2]["f1"]
    ci = metrics["macro_f1_ci"]
    assert ci["low"] <= metrics["macro_f1"] <= ci["high"] and ci["n_resamples"] == 1000
    report = metrics["report"]
    assert [row["name"] for row in report["per_class"]] == list(findings.CLASS_NAMES)
    assert report["threshold_tuned"]["tuned_on_eval_set"] is True
    # The default phase 3 trains no LLM-visual classifier: the scores are the visual classifier's, and say so.
    assert "LLM-visual classifier is untrained" in metrics["scores"]
    assert report["per_class"][0]["auc"] == metrics["visual_classifier"]["per_class"][0]["auc"]
    assert set(metrics["ablations"]) == {"zero", "shuffle", "noise"}
    with open(out / "reports.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # --ablation_examples=8: the ablations generated for the first batch of 8 and are scored against the
    # full model's reports of those 8 volumes (relabelled here from reports.csv).
    truth = np.array([[name in row["true_findings"].split("; ") for name in findings.CLASS_NAMES] for row in rows[:8]])
    full_on_8 = metrics_lib.evaluation_report(
        truth.astype(np.int8), RuleLabeler()([row["report_normal"] for row in rows[:8]]))["macro_f1"]
    for mode, ablation in metrics["ablations"].items():
        assert 0 <= ablation["macro_f1"] <= 1 and ablation["num_volumes"] == 8
        assert ablation["full_macro_f1"] == pytest.approx(full_on_8)
        assert ablation["delta_vs_full"] == pytest.approx(ablation["macro_f1"] - full_on_8)
        assert all(row[f"report_{mode}"] == "" for row in rows[8:])
    nll = metrics["nll"]
    for mode in ("normal", "zero", "shuffle", "noise"):
        assert all(_finite_number(nll[mode][k]) and nll[mode][k] > 0 for k in ("all", "pathology", "generic"))
    assert nll["tokens"]["pathology"] > 0 and nll["tokens"]["generic"] > 0 and nll["unaligned_rows"] == 0
    assert nll["tokens"]["pathology"] + nll["tokens"]["generic"] < nll["tokens"]["all"]   # + one <|eot_id|> each
    assert set(metrics["probe"]) == {"raw_slices", "compressor", "phase3"}
    assert all(p["n_samples"] == 16 for p in metrics["probe"].values())
    assert np.asarray(metrics["zone_evidence"]["matrix"], float).shape == (18, 32)
    assert len(rows) == 16 and set(rows[0]) == {"VolumeName", "true_findings", "report_normal", "report_zero",
                                                "report_shuffle", "report_noise"}
    for name in ("per_class_f1", "ablations", "loss_curves", "zone_map"):
        assert metrics["figures"][name].endswith(f"{name}.png")
        _check_png(out / f"{name}.png")


@pytest.mark.slow
def test_classifier_phase_is_scored_without_generation(evaluated):
    workdir, _ = evaluated
    out = workdir / "eval" / "phase1"
    metrics = json.loads((out / "metrics.json").read_text())
    assert "visual classifier" in metrics["scores"] and "ablations" not in metrics
    assert metrics["macro_f1"] == metrics["visual_classifier"]["macro_f1"]
    assert metrics["report"]["threshold_tuned"]["tuned_on_eval_set"] is True
    assert "skipped" in metrics["nll"] and not (out / "reports.csv").exists()
    for name in ("per_class_f1", "loss_curves", "zone_map"):
        _check_png(out / f"{name}.png")


@pytest.mark.slow
def test_untrained_phase_of_a_trained_workdir_is_a_one_line_error(trained):
    code, _, err = _finish(_cli(f"--workdir={trained}", "--phase=2"), timeout=300)
    assert code == 1 and "phase 2: no checkpoint in" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_grounding_gap_benchmark_reads_a_trained_workdir(trained):
    """benchmarks/grounding_gap.py on the tiny trained workdir: one JSON line of AUCs and F1 in [0, 1]."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "grounding_gap.py")
    out = subprocess.run([sys.executable, script, f"--workdir={trained}", "--num_train=32", "--num_valid=16"],
                         capture_output=True, text=True, timeout=900, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert (figures["phase"], figures["num_train"], figures["num_valid"]) == (3, 32, 16)
    for key in ("visual_probe_auc", "hidden_probe_auc", "forced_choice_auc", "generation_f1"):
        assert 0.0 <= figures[key] <= 1.0, figures


def test_the_config_names_the_labeler_and_its_paths_are_checked_first(tmp_path):
    """eval.labeler: rules by default; radbert needs two existing local paths, said in one line before
    any set-up (train's check_before_set_up raises it as a TrainError)."""
    from kervljepa_jax.label import RuleLabeler
    from kervljepa_jax.training import config as config_lib
    config = config_lib.load_phase_config(3)
    assert evaluate.labeler_problem(config) == "" and isinstance(evaluate.config_labeler(config), RuleLabeler)
    config.eval.labeler = "radbert"
    assert "needs --config.eval.radbert_encoder=PATH" in evaluate.labeler_problem(config)
    config.eval.radbert_encoder, config.eval.radbert_classifier = str(tmp_path), str(tmp_path / "nope.pt")
    assert "--config.eval.radbert_classifier=PATH" in evaluate.labeler_problem(config)
    config.eval.labeler = "bert"
    assert evaluate.labeler_problem(config) == "--config.eval.labeler=bert: use rules or radbert"


@pytest.mark.slow
def test_radbert_from_the_config_scores_the_reports_and_drives_the_threshold_search(trained, tmp_path):
    """The paper's protocol: with eval.labeler=radbert (a tiny random RoBERTa here) the phase's
    reports are labelled by RadBERT and its probabilities are the scores of AUC and the threshold search."""
    import safetensors.torch
    import torch
    from kervljepa_jax import sharding
    from tests.test_label import _tiny_roberta
    _, model = _tiny_roberta(str(tmp_path / "encoder"), seed=0)
    torch.manual_seed(1)
    safetensors.torch.save_file({"weight": torch.randn(18, 32) * 0.5, "bias": torch.linspace(-3.0, 3.0, 18)},
                                str(tmp_path / "classifier.safetensors"))
    overrides = {"eval.labeler": "radbert", "eval.radbert_encoder": str(tmp_path / "encoder"),
                 "eval.radbert_classifier": str(tmp_path / "classifier.safetensors"), "eval.num_examples": "8"}
    loaded = evaluate.load_phase(str(trained), 3, overrides)
    with sharding.use_mesh(loaded.run.mesh):
        payload = evaluate.evaluate_phase(loaded, evaluate.EvalOptions(ablations=()), str(tmp_path / "out"))
    assert payload["labeler"] == "radbert" and payload["scores"].startswith("RadBERT classifier probabilities")
    assert evaluate.headline_numbers(payload)["labeler"] == "radbert"
    assert "threshold_tuned" in payload["report"]
