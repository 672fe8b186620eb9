"""HF import/export: one-line errors, export that transformers loads, loading straight onto a mesh."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kervljepa_jax import hf, sharding
from kervljepa_jax.model import llama

VOCAB = 96


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(folder)
    return folder, model


def copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_non_llama_model_type_is_refused(hf_folder, tmp_path):
    folder = copy_with_config(hf_folder[0], tmp_path / "m", model_type="mistral")
    with pytest.raises(hf.HFLoadError, match=r"config.json: model_type='mistral'"):
        hf.load_llama(str(folder))


@pytest.mark.parametrize("changes,message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "rope_type='yarn'"),
])
def test_math_changing_keys_are_refused(hf_folder, tmp_path, changes, message):
    folder = copy_with_config(hf_folder[0], tmp_path / "m", **changes)
    with pytest.raises(hf.HFLoadError, match=message):
        hf.load_llama(str(folder))


def test_shape_mismatch_names_the_tensor(hf_folder, tmp_path):
    folder = copy_with_config(hf_folder[0], tmp_path / "m", intermediate_size=64)
    with pytest.raises(hf.HFLoadError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        hf.load_llama(str(folder))


def test_missing_tensor_names_the_tensor(hf_folder, tmp_path):
    folder = copy_with_config(hf_folder[0], tmp_path / "m", num_hidden_layers=3)
    with pytest.raises(hf.HFLoadError, match=r"tensor model\.layers\.2\.\S+ is missing"):
        hf.load_llama(str(folder))


def test_missing_folder_or_weights(tmp_path):
    with pytest.raises(hf.HFLoadError, match="no config.json"):
        hf.load_llama(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(hf.HFLoadError, match="model.safetensors"):
        hf.load_llama(str(tmp_path))


def test_export_loads_in_transformers_with_equal_logits(hf_folder, tmp_path):
    folder, model = hf_folder
    cfg, params = hf.load_llama(str(folder))
    hf.save_llama(cfg, params, str(tmp_path / "export"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    with torch.no_grad():
        a = reloaded(input_ids=torch.tensor(ids)).logits.numpy()
        b = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_bf16_params_load_from_memmap(hf_folder):
    cfg, params = hf.load_llama(str(hf_folder[0]), param_dtype="bfloat16", dtype="bfloat16")
    assert params["model"]["norm"]["weight"].dtype == jnp.bfloat16


def test_load_straight_onto_a_mesh(hf_folder):
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = hf.load_llama(str(hf_folder[0]), mesh=mesh)
    q = params["model"]["layers_0_1"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 8, 16)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (4, 5)))
    with torch.no_grad():
        ref = hf_folder[1](input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda p, x: llama.Llama(cfg).apply({"params": p}, x).logits)(params, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_streamed_export_merges_lora_into_shards_that_load_back(hf_folder, tmp_path):
    """save_llama(lora="merge"): small shards + index (transformers' layout), each kernel W + A B * scale;
    lora="drop" writes the base; bf16 storage rounds; lora="refuse" (the default) still refuses."""
    from kervljepa_jax.model import lora as lora_lib
    lora = lora_lib.LoraConfig(rank=2, alpha=6.0)
    cfg, params = hf.load_llama(str(hf_folder[0]), lora=lora)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) if "lora_B" in jax.tree_util.keystr(p) else x,
        params)
    names = hf.save_llama(cfg, params, str(tmp_path / "merged"), lora="merge", max_shard_bytes=20_000)
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    _, merged = hf.load_llama(str(tmp_path / "merged"))
    want = lora_lib.merge_lora(params, lora)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0), merged, want)
    q = lambda p: np.asarray(p["model"]["layers_0_1"]["self_attn"]["q_proj"]["kernel"])  # noqa: E731
    assert np.abs(q(merged) - q(params)).max() > 1e-2                  # the LoRA delta is in there
    hf.save_llama(cfg, params, str(tmp_path / "base"), lora="drop", dtype="bfloat16")
    base_cfg, base = hf.load_llama(str(tmp_path / "base"))
    assert json.loads((tmp_path / "base" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    np.testing.assert_array_equal(q(base), q(params).astype(jnp.bfloat16).astype(np.float32))
    with pytest.raises(ValueError, match="merge them"):
        hf.save_llama(cfg, params, str(tmp_path / "refused"))
