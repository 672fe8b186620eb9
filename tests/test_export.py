"""Export to Hugging Face PyTorch (issue 26): a tiny phase-4 workdir (random bridge, LoRA B off zero,
adapter gates open; nothing trained) exported; transformers loads llm/ with the JAX model's merged
logits, peft puts adapter/ on base/ with the same logits, the bridge tensors are the checkpoint's;
--checkpoint picks the step; CLI mistakes are one line and write nothing."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from kervljepa_jax import export, train, whitening as whitening_lib
from kervljepa_jax.model import compressor as compressor_lib, llama as llama_lib
from kervljepa_jax.training import checkpoint as ckpt_lib, run as run_lib

ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
# The packaged stand-in decoder (64 wide, 4 layers) with a small bridge: 8 visual tokens of width 32.
OVERRIDES = {"checkpoint.async_save": "false", "data.embed_dim": "32", "data.num_visual_tokens": "8",
             "model.lora.rank": "4", "model.lora.alpha": "8.0"}
BEST, LATEST = 3, 5


def _randomised(params, seed: int):
    """The base LLM kept; every other leaf random (LoRA B off zero, adapter gates open)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = "/".join(path)
        if name.startswith("llm/") and not name.endswith("lora_B"):
            return x
        scale = 0.8 if name.endswith("gate") else 0.05 if name.endswith("lora_B") else 0.2
        value = scale * rng.standard_normal(x.shape)
        return jnp.asarray(value + 1.0 if name.endswith("scale") else value, x.dtype)

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: leaf(p, x) for p, x in flat.items()})


def make_workdir(root):
    """A phase-4 workdir as the trainer leaves it: checkpoints at steps 3 (best) and 5 (latest), the
    phase's metrics.json of step 3, whitening.npz, base_llm/. Returns (workdir, vcfg, {step: variables})."""
    workdir = str(root)
    config = train.phase_config(4, None, OVERRIDES)
    run = run_lib.Run(config, workdir)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), run.abstract_params)
    template["llm"] = run.llm_params
    saved = {}
    with ckpt_lib.PhaseCheckpointer.from_config(workdir, config, 4) as ckpt:
        for seed, (step, f1) in enumerate(((BEST, 0.6), (LATEST, 0.4))):
            params, alpha = _randomised(template, seed), 1.5 + seed
            ckpt.save(step, params=params, alpha=alpha, config=config, metrics={"val_gen_f1": f1})
            saved[step] = run_lib.restored_variables(params, alpha)
    per_class = [{"name": f"class{i}", "f1": 0.5} for i in range(3)]
    metrics = {"checkpoint_step": BEST, "macro_f1": 0.612, "precision": 0.7, "recall": 0.55, "num_volumes": 16,
               "macro_f1_ci": {"low": 0.5, "high": 0.7}, "report": {"per_class": per_class}}
    os.makedirs(os.path.join(workdir, "phase4"), exist_ok=True)
    with open(os.path.join(workdir, "phase4", "metrics.json"), "w") as f:
        json.dump(metrics, f)
    d = run.vcfg.llm.hidden_size
    whitening_lib.save(whitening_lib.Whitening(mean=np.ones(d, np.float32), projection=np.eye(d, 8, dtype=np.float32),
                                               eigenvalues=np.ones(8, np.float32), retained_variance=0.5,
                                               n_samples=10, eps=1e-6),
                       os.path.join(workdir, "whitening.npz"))
    return workdir, run.vcfg, saved


_SHARED: dict = {}     # one workdir and one export per session: tests/test_torch_runner.py reads them too


def shared_workdir(tmp_path_factory):
    if "workdir" not in _SHARED:
        _SHARED["workdir"] = make_workdir(tmp_path_factory.mktemp("workdir"))
    return _SHARED["workdir"]


def shared_export(tmp_path_factory) -> str:
    """The best step exported in float32 with its base, shards of ~100 KB to exercise the index."""
    if "export" not in _SHARED:
        options = export.ExportOptions(workdir=shared_workdir(tmp_path_factory)[0],
                                       out=str(tmp_path_factory.mktemp("export") / "out"), dtype="f32",
                                       with_base=True, max_shard_bytes=100_000)
        _SHARED["export"] = export.export(options)
    return _SHARED["export"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


def _ids(vocab: int, shape=(2, 11)) -> np.ndarray:
    return np.random.default_rng(0).integers(10, vocab, shape)


def _jax_logits(vcfg, params, ids):
    return np.asarray(llama_lib.Llama(vcfg.llm).apply({"params": params["llm"]}, jnp.asarray(ids)).logits)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def test_merged_llm_loads_in_transformers_with_the_jax_logits(workdir, exported):
    _, vcfg, saved = workdir
    folder = os.path.join(exported, "llm")
    files = sorted(os.listdir(folder))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    model = transformers.LlamaForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    ids = _ids(vcfg.llm.vocab_size)
    want = _jax_logits(vcfg, saved[BEST]["params"], ids)
    np.testing.assert_allclose(_torch_logits(model, ids), want, atol=1e-4, rtol=0)
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.temperature, generation.top_p, generation.repetition_penalty) == (0.6, 0.9, 1.15)
    assert (generation.no_repeat_ngram_size, generation.max_new_tokens, generation.do_sample) == (5, 384, True)
    assert generation.suppress_tokens == [vcfg.visual_token_id]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("<|visual_region|>") == vcfg.visual_token_id


def test_peft_adapter_on_the_base_gives_the_same_logits_and_the_base_differs(workdir, exported):
    import peft
    _, vcfg, saved = workdir
    base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(exported, "base"), use_safetensors=True).eval()
    ids = _ids(vcfg.llm.vocab_size)
    base_logits = _torch_logits(base, ids)
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(exported, "adapter")).eval()
    want = _jax_logits(vcfg, saved[BEST]["params"], ids)
    np.testing.assert_allclose(_torch_logits(adapted, ids), want, atol=1e-4, rtol=0)
    assert np.abs(base_logits - want).max() > 1e-2


def test_bridge_holds_the_checkpoint_in_torch_layouts(workdir, exported):
    from safetensors.numpy import load_file
    _, vcfg, saved = workdir
    params = saved[BEST]["params"]
    tensors = load_file(os.path.join(exported, "bridge", export.BRIDGE_FILE))
    config = json.loads(open(os.path.join(exported, "bridge", "config.json")).read())
    assert config["prompt_ids"].count(vcfg.visual_token_id) == vcfg.num_visual_tokens == 8
    assert config["injection_layers"] == list(vcfg.llm.injection_layers) and config["whitening_shape"] == [64, 8]
    compressor = {k[len("compressor."):]: v for k, v in tensors.items() if k.startswith("compressor.")}
    restored = compressor_lib.torch_state_dict_to_params(compressor, vcfg.compressor)      # the library's inverse
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params["compressor"]))
    layer = vcfg.llm.injection_layers[0]
    np.testing.assert_array_equal(tensors[f"xattn.{layer}.gate"], np.asarray(params[f"xattn_{layer}"]["gate"]))
    np.testing.assert_array_equal(tensors[f"projectors.{layer}.weight"],
                                  np.asarray(params[f"projector_{layer}"]["kernel"]).T)
    assert float(tensors["calibrator.alpha"]) == 1.5 and tensors["whitening.projection"].shape == (64, 8)


def test_model_card_names_the_step_and_its_metrics(workdir, exported, tmp_path):
    card = open(os.path.join(exported, "README.md")).read()
    assert "step 3" in card and "macro F1 0.612" in card and "temperature 0.6" in card and "val_gen_f1 0.6" in card
    out = export.export(export.ExportOptions(workdir=workdir[0], out=str(tmp_path / "latest"), checkpoint="latest",
                                             dtype="bf16"))
    card = open(os.path.join(out, "README.md")).read()
    assert "step 5" in card and "does not evaluate step 5" in card and not os.path.exists(os.path.join(out, "base"))
    assert json.loads(open(os.path.join(out, "llm", "config.json")).read())["torch_dtype"] == "bfloat16"
    assert json.loads(open(os.path.join(out, "bridge", "config.json")).read())["step"] == LATEST


def test_cli_mistakes_are_one_line_and_write_nothing(workdir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = {  # args -> (exit code, text of the last stderr line)
        (f"--workdir={workdir[0]}", f"--out={tmp_path / 'a'}", "--phase=3"): (1, "phase 3: no checkpoint"),
        (f"--workdir={workdir[0]}", f"--out={tmp_path / 'b'}", "--checkpoint=7"): (1, "--checkpoint=7: phase 4 has "
                                                                                      "steps [3, 5]"),
        (f"--workdir={workdir[0]}", f"--out={full}"): (1, "exists and is not an empty folder"),
        (f"--out={tmp_path / 'c'}",): (2, "--workdir is required"),
    }
    running = {args: subprocess.Popen([sys.executable, "-m", "kervljepa_jax.export", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=ENV) for args in cases}
    for args, process in running.items():
        _, err = process.communicate(timeout=300)
        want_code, want_text = cases[args]
        last = err.strip().splitlines()[-1]
        assert process.returncode == want_code and want_text in last and last.startswith("export: "), (args, err)
    assert sorted(os.listdir(tmp_path)) == ["full"] and os.listdir(full) == ["keep.txt"]
