"""LoRA: fresh == base, merged == unmerged, peft init, and equality with peft on a transformers model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

from kervljepa_jax import hf
from kervljepa_jax.model import llama
from kervljepa_jax.model.lora import (LORA_PATTERN, LoraConfig, count_lora_tensors, merge_lora, select_paths)

VOCAB = 128
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def models():
    base_cfg = llama.tiny(vocab_size=VOCAB)
    lora_cfg = base_cfg.replace(lora=LORA)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(llama.Llama(lora_cfg).init(jax.random.key(0), ids)["params"])
    return base_cfg, lora_cfg, params


def without_lora(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in ("lora_A", "lora_B")})


def randomize_lora_b(params, scale=0.05):
    flat = traverse_util.flatten_dict(params)
    for i, p in enumerate(sorted(flat)):
        if p[-1] == "lora_B":
            flat[p] = scale * jax.random.normal(jax.random.key(i), flat[p].shape)
    return traverse_util.unflatten_dict(flat)


def test_fresh_lora_equals_base_exactly(models):
    base_cfg, lora_cfg, params = models
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, VOCAB)
    with_lora = llama.Llama(lora_cfg).apply({"params": params}, ids).logits
    base = llama.Llama(base_cfg).apply({"params": without_lora(params)}, ids).logits
    assert np.array_equal(np.asarray(with_lora), np.asarray(base))


def test_merged_equals_unmerged(models):
    base_cfg, lora_cfg, params = models
    params = randomize_lora_b(params)
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, VOCAB)
    unmerged = llama.Llama(lora_cfg).apply({"params": params}, ids).logits
    merged_params = merge_lora(params, LORA)
    assert count_lora_tensors(merged_params) == 0
    merged = llama.Llama(base_cfg).apply({"params": merged_params}, ids).logits
    base = llama.Llama(base_cfg).apply({"params": without_lora(params)}, ids).logits
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-3  # the adapter did something


def test_lora_a_follows_peft_init_and_b_is_zero(models):
    _, _, params = models
    seg = params["model"]["layers_0_1"]["mlp"]["down_proj"]
    fan_in = seg["kernel"].shape[1]
    a = np.asarray(seg["lora_A"])
    assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.8 / np.sqrt(fan_in)
    assert not np.asarray(seg["lora_B"]).any()


def test_lora_tensors_sit_next_to_their_weight_and_are_selectable(models):
    _, _, params = models
    paths = select_paths(params, LORA_PATTERN)
    assert len(paths) == 2 * 7 * len(llama.tiny().segments)
    assert "model/layers_0_1/self_attn/q_proj/lora_A" in paths
    assert count_lora_tensors(params) == 2 * 7 * llama.tiny().num_hidden_layers


def test_targets_subset_and_validation():
    cfg = llama.tiny(vocab_size=VOCAB, lora=LoraConfig(rank=2, alpha=2, targets=("q_proj", "v_proj")))
    params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    assert {p.split("/")[-2] for p in select_paths(params, LORA_PATTERN)} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="lora.targets"):
        LoraConfig(targets=("qkv",))


def test_dropout_only_acts_in_training(models):
    _, lora_cfg, params = models
    params = randomize_lora_b(params)
    cfg = lora_cfg.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    ids = jax.random.randint(jax.random.key(3), (1, 6), 0, VOCAB)
    eval_a = llama.Llama(cfg).apply({"params": params}, ids).logits
    eval_b = llama.Llama(cfg).apply({"params": params}, ids).logits
    train = llama.Llama(cfg, deterministic=False).apply({"params": params}, ids,
                                                        rngs={"dropout": jax.random.key(5)}).logits
    assert np.array_equal(np.asarray(eval_a), np.asarray(eval_b))
    assert not np.allclose(np.asarray(train), np.asarray(eval_a))


def test_matches_peft_on_transformers_model(tmp_path, models):
    """Our LoRA params exported as a PEFT adapter give the same logits through peft+transformers."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(hf_cfg).eval()
    base.save_pretrained(tmp_path / "base")
    cfg, params = hf.load_llama(str(tmp_path / "base"), lora=LORA, injection_layers=(0,))
    params = randomize_lora_b(params, 0.2)
    hf.save_peft_lora(cfg, params, str(tmp_path / "adapter"))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = llama.Llama(cfg).apply({"params": params}, jnp.asarray(ids)).logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    # and back: the adapter loads into a fresh LoRA tree
    reloaded = hf.load_peft_lora(cfg, hf.load_llama(str(tmp_path / "base"), lora=LORA, injection_layers=(0,))[1],
                                 str(tmp_path / "adapter"))
    a, b = traverse_util.flatten_dict(reloaded), traverse_util.flatten_dict(params)
    for p in a:
        np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b[p]), atol=1e-7)
