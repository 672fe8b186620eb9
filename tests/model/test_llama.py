"""Llama decoder: HF parity (via the importer), KV cache, scan/unrolled, sharding, 3B shapes."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kervljepa_jax import hf, sharding
from kervljepa_jax.model import llama
from kervljepa_jax.model.lora import LoraConfig, count_lora_tensors

VOCAB = 256


def make_hf_model(tmp_path, *, tie, heads, kv_heads, rope, sharded, seed=0):
    """A random tiny transformers Llama saved with save_pretrained (all weights non-trivial)."""
    torch.manual_seed(seed)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope == "llama3":
        rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=tie, rope_parameters=rope_parameters)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    folder = tmp_path / f"hf_{tie}_{heads}_{kv_heads}_{rope}_{sharded}"
    model.save_pretrained(folder, max_shard_size="40KB" if sharded else "100GB")
    return model, folder


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.tensor(np.asarray(mask)))
    return out.logits.numpy()


CASES = [  # tie, heads, kv_heads, rope, scan, sharded files, injection layers
    (True, 4, 2, "llama3", True, False, (1,)),
    (False, 4, 4, "default", False, True, ()),
    (True, 8, 2, "llama3", False, True, (0, 2)),
    (False, 8, 2, "llama3", True, False, ()),
]


@pytest.mark.parametrize("tie,heads,kv_heads,rope,scan,sharded,inject", CASES)
def test_logits_match_transformers(tmp_path, tie, heads, kv_heads, rope, scan, sharded, inject):
    model, folder = make_hf_model(tmp_path, tie=tie, heads=heads, kv_heads=kv_heads, rope=rope, sharded=sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").exists()
    cfg, params = hf.load_llama(str(folder), scan_layers=scan, injection_layers=inject)
    assert cfg.tie_word_embeddings == tie and cfg.num_key_value_heads == kv_heads
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 24))
    ours = llama.Llama(cfg).apply({"params": params}, jnp.asarray(ids)).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
    model, folder = make_hf_model(tmp_path, tie=True, heads=4, kv_heads=2, rope="llama3", sharded=False)
    cfg, params = hf.load_llama(str(folder))
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding, as batched generation uses
    ours = np.asarray(llama.Llama(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=mask).logits)
    ref = hf_logits(model, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_transformers4_rope_scaling_spelling_is_read():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2}
    v4 = dict(base, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
    v5 = dict(base, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    assert hf.config_from_hf(v4).rope == hf.config_from_hf(v5).rope == llama.llama3_2_3b().rope


def test_rope_inv_freq_matches_transformers():
    cfg = llama.llama3_2_3b()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.config_to_hf(cfg).items()
                                         if k not in ("architectures", "model_type", "rope_scaling")})
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    np.testing.assert_allclose(np.asarray(llama.rope_inv_freq(128, cfg.rope)), ref.numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = llama.tiny(vocab_size=VOCAB)
    params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # non-trivial norms so any layout slip shows
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params)
    return cfg, params


def test_scan_and_unrolled_agree(tiny_model):
    cfg, params = tiny_model
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, VOCAB)
    scanned = llama.Llama(cfg).apply({"params": params}, ids).logits
    unrolled = llama.Llama(cfg.replace(scan_layers=False, remat_policy="full")).apply({"params": params}, ids).logits
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-5, rtol=0)


def test_prefill_and_extend_equal_full_forward(tiny_model):
    cfg, params = tiny_model
    model = llama.Llama(cfg)
    ids = jax.random.randint(jax.random.key(2), (3, 16), 0, VOCAB)
    mask = jnp.ones((3, 16), jnp.bool_).at[2, :3].set(False)  # row 2 left-padded
    full = model.apply({"params": params}, ids, attention_mask=mask).logits

    @jax.jit
    def decode(params, ids, mask):
        cache = llama.init_cache(cfg, 3, 20)
        out = model.apply({"params": params}, ids[:, :10], attention_mask=mask[:, :10], cache=cache)
        logits = jnp.zeros((3, 16, VOCAB)).at[:, :10].set(out.logits)

        def body(t, carry):  # one token per step, inside a lax loop with static shapes
            cache, logits = carry
            step = model.apply({"params": params}, jax.lax.dynamic_slice_in_dim(ids, t, 1, 1),
                               attention_mask=jax.lax.dynamic_slice_in_dim(mask, t, 1, 1), cache=cache)
            return step.cache, jax.lax.dynamic_update_slice_in_dim(logits, step.logits, t, 1)

        return jax.lax.fori_loop(10, 16, body, (out.cache, logits))[1]

    stepped = decode(params, ids, mask)
    keep = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(stepped)[keep], np.asarray(full)[keep], atol=1e-5, rtol=0)


def test_sharded_fsdp_and_tensor_mesh_gives_single_device_logits(tiny_model):
    cfg, params = tiny_model
    assert len(jax.devices()) == 8, "conftest forces 8 host CPU devices"
    model = llama.Llama(cfg)
    ids = jax.random.randint(jax.random.key(4), (8, 12), 0, VOCAB)
    reference = np.asarray(model.apply({"params": params}, ids).logits)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    for sizes in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.make_mesh(**{"data": 1, **sizes})
        shardings = sharding.named_shardings(boxed, mesh)
        placed = sharding.shard_params(params, shardings)
        assert placed["model"]["embed_tokens"]["weight"].sharding.spec == shardings["model"]["embed_tokens"]["weight"].spec
        with sharding.use_mesh(mesh):
            batch = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
            out = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(placed, batch)
        np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=0)
    # the weights really are split: fsdp shards the embed dimension over 8 devices
    spec = shardings["model"]["layers_0_1"]["self_attn"]["q_proj"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_3b_preset_shapes_without_memory():
    cfg = llama.llama3_2_3b()
    boxed = hf.abstract_params(cfg)
    sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, nn.unbox(boxed)))
    assert sum(sizes) == 3_212_749_824
    with_lora = hf.abstract_params(cfg.replace(lora=LoraConfig(rank=16, alpha=32)))
    assert count_lora_tensors(nn.unbox(with_lora)) == 392
    assert {d.dtype for d in jax.tree.leaves(nn.unbox(boxed))} == {jnp.dtype("bfloat16")}


def test_config_validation_is_one_line():
    """A model config that cannot work is a ModelConfigError (a ValueError the entry points report in
    one line, not a traceback), naming the setting."""
    with pytest.raises(llama.ModelConfigError, match="num_key_value_heads"):
        llama.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(llama.ModelConfigError, match="remat_policy"):
        llama.tiny(remat_policy="sometimes")
    with pytest.raises(llama.ModelConfigError, match=r"--config.model.injection_layers=\(3,\)"):
        llama.tiny(injection_layers=(3,))
    with pytest.raises(llama.ModelConfigError, match=r"--config.model.preset='llama9': no such preset; choose "
                                                       r"one of \['llama3_2_3b', 'tiny'\]") as raised:
        llama.preset("llama9")
    assert "\n" not in str(raised.value)
