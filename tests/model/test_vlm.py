"""The composed VLM: param layout, graft, fresh == base LLM, decode == full forward, ablations, 3B counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm as vlm_lib

VIS = 5          # the <|visual_region|> id in the tiny vocabulary
K = 4            # visual tokens in these tests
CFG = vlm_lib.make_config("tiny", visual_token_id=VIS, d_visual=32, num_visual_tokens=K,
                          lora=lora_lib.LoraConfig(rank=4, alpha=8.0), vocab_size=256, injection_layers=(0, 2))
MODEL = vlm_lib.VLM(CFG)
B, N, T = 3, 10, 12


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    slices = rng.standard_normal((B, N, 32)).astype(np.float32)
    z = np.cumsum(np.full((B, N), 1.5), axis=1).astype(np.float32)
    valid = np.arange(N)[None] < np.array([[10], [7], [3]])
    ids = rng.integers(10, 256, (B, T))
    ids[:, 1:1 + K] = VIS                                     # prompt: <bos> <vis>*K text...
    return jnp.asarray(slices), jnp.asarray(z), jnp.asarray(valid), jnp.asarray(ids, jnp.int32)


INPUTS = _inputs()


@pytest.fixture(scope="module")
def variables():
    return vlm_lib.init(CFG, jax.random.key(0))


def _with_gates(variables, value):
    params = dict(variables["params"])
    for l in CFG.llm.injection_layers:
        params[f"xattn_{l}"] = {**params[f"xattn_{l}"], "gate": jnp.asarray(value, jnp.float32)}
    lora = lambda p, x: x + 0.05 if p[-1].key == "lora_B" else x  # noqa: E731  (LoRA active too)
    params = jax.tree_util.tree_map_with_path(lora, params)
    return {**variables, "params": params}


def test_param_layout(variables):
    top = set(variables["params"])
    assert top == {"compressor", "predictor", "jepa_head", "visual_classifier", "llm_classifier", "log_temperature",
                   "llm", "projector_0", "projector_2", "xattn_0", "xattn_2"}
    assert set(variables["calibration"]) == {"calibrator"}
    counts = vlm_lib.count_bridge_tensors(variables["params"])
    assert counts == {"projector": 4, "xattn": 14, "lora": 4 * 7 * 2}


def test_graft_places_tokens_in_order_and_is_differentiable():
    embeds = jnp.zeros((2, 6, 3))
    ids = jnp.array([[1, VIS, VIS, 2, 3, 4], [VIS, 1, VIS, 2, 3, 4]])
    visual = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3) + 1
    out = vlm_lib.graft(embeds, ids, visual, VIS)
    np.testing.assert_array_equal(out[0, 1:3], visual[0])
    np.testing.assert_array_equal(out[1, 0], visual[1, 0])
    np.testing.assert_array_equal(out[1, 2], visual[1, 1])
    assert float(jnp.abs(out[0, 3:]).sum()) == 0.0
    extra = vlm_lib.graft(embeds, ids.at[0, 4].set(VIS), visual, VIS)    # a third placeholder stays text
    assert float(jnp.abs(extra[0, 4]).sum()) == 0.0
    grad = jax.grad(lambda v: vlm_lib.graft(embeds, ids, v, VIS).sum())(visual)
    np.testing.assert_array_equal(grad, np.ones_like(visual))   # each token used exactly once


def test_fresh_vlm_equals_base_llm_on_grafted_embeddings(variables):
    slices, z, valid, ids = INPUTS
    out = jax.jit(lambda v: MODEL.apply(v, slices, z, valid, ids))(variables)
    base = llama_lib.Llama(CFG.llm)
    calibrated = out.visual.calibrated
    embeds = vlm_lib.graft(base.apply({"params": variables["params"]["llm"]}, ids, method="embed"), ids,
                           calibrated, VIS)
    ref = base.apply({"params": variables["params"]["llm"]}, inputs_embeds=embeds)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)
    assert out.llm_cls_logits.shape == (B, 18) and out.visual.z_visual.shape == (B, CFG.bridge.jepa_dim)
    assert out.visual.z_tokens.shape == (B, K, CFG.bridge.jepa_dim) and out.visual.cls_logits.shape == (B, 18)
    assert np.isfinite(np.asarray(out.logits)).all()


def _decode_logits(variables, slices, z, valid, ids, prompt_len, with_context=True):
    """Prefill the first prompt_len tokens, then feed the rest one by one; logits at every position.
    The steps are a scan, as in the sampling loop: one compiled step instead of T - prompt_len."""
    def run(v):
        cache = llama_lib.init_cache(CFG.llm, B, T)
        first, cache, context = MODEL.apply(v, slices, z, valid, ids[:, :prompt_len],
                                            jnp.ones((B, prompt_len), bool), cache, method="prefill")

        def step(cache, t):
            token = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
            logits, cache = MODEL.apply(v, token, cache, context if with_context else None, method="extend")
            return cache, logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(prompt_len, T))
        return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
    return jax.jit(run)(variables)


def test_token_by_token_decoding_equals_full_forward_with_open_gates(variables):
    """The adapters must fire at every decode step: with non-zero gates, a decoder that dropped the
    visual context after the prefill would give different logits (checked below)."""
    v = _with_gates(variables, 0.7)
    slices, z, valid, ids = INPUTS
    full = MODEL.apply(v, slices, z, valid, ids).logits
    prompt_len = 1 + K + 1
    stepwise = _decode_logits(v, slices, z, valid, ids, prompt_len)
    np.testing.assert_allclose(stepwise, full[:, prompt_len - 1:].at[..., VIS].set(-jnp.inf), atol=2e-5)
    # The same check fails for the paper's bug (no visual context in the decode steps).
    buggy = _decode_logits(v, slices, z, valid, ids, prompt_len, with_context=False)
    words = jnp.arange(full.shape[-1]) != VIS                  # the placeholder column is -inf in both
    assert float(jnp.abs(buggy[:, 1:] - full[:, prompt_len:])[..., words].max()) > 1e-3


def test_ablations(variables):
    slices, z, valid, ids = INPUTS
    outs = {mode: MODEL.apply(variables, slices, z, valid, visual_mode=mode).visual.calibrated
            for mode in vlm_lib.VISUAL_MODES}
    assert float(jnp.abs(outs["zero"]).max()) == 0.0
    np.testing.assert_array_equal(outs["shuffle"], jnp.roll(outs["normal"], 1, axis=0))
    np.testing.assert_allclose(jnp.linalg.norm(outs["noise"], axis=-1), jnp.linalg.norm(outs["normal"], axis=-1),
                               rtol=1e-5)
    cos = jnp.sum(outs["noise"] * outs["normal"], -1) / (jnp.linalg.norm(outs["noise"], axis=-1)
                                                         * jnp.linalg.norm(outs["normal"], axis=-1))
    assert float(jnp.abs(cos).mean()) < 0.3
    with pytest.raises(ValueError, match="visual_mode"):
        vlm_lib.ablate(outs["normal"], "blur")


def test_ablation_by_traced_index_equals_by_name(variables):
    """One jitted function, the mode as data (lax.switch): the same V~ as each named mode."""
    visual = MODEL.apply(variables, *INPUTS[:3]).visual.calibrated
    by_index = jax.jit(lambda v, mode, key: vlm_lib.ablate(v, mode, key))
    by_name = jax.jit(vlm_lib.ablate, static_argnums=1)
    key = jax.random.key(2)
    for mode in vlm_lib.VISUAL_MODES:
        np.testing.assert_array_equal(by_index(visual, jnp.int32(vlm_lib.visual_mode_index(mode)), key),
                                      by_name(visual, mode, key))
    assert by_index._cache_size() == 1


def test_gradients_reach_the_compressor_through_the_graft(variables):
    slices, z, valid, ids = INPUTS
    v = _with_gates(variables, 0.0)

    def loss(params):
        return MODEL.apply({**v, "params": params}, slices, z, valid, ids).logits[:, -1].sum()
    grads = jax.jit(jax.grad(loss))(v["params"])
    assert float(jnp.abs(grads["compressor"]["queries"]).sum()) > 0
    assert float(jnp.abs(grads["predictor"]["linear"]["kernel"]).sum()) > 0


def test_config_errors():
    with pytest.raises(ValueError, match="visual_token_id"):
        vlm_lib.make_config("tiny", visual_token_id=5000)
    good = vlm_lib.make_config("tiny", visual_token_id=3)
    with pytest.raises(ValueError, match="inconsistent sizes"):
        vlm_lib.VLMConfig(llm=good.llm, compressor=good.compressor, bridge=good.bridge, xattn=good.xattn,
                          visual_token_id=3, num_visual_tokens=16)


def test_3b_preset_bridge_counts_by_abstract_init():
    """27 bridge tensors (3 x (7 adapter + 2 projector)) and 392 LoRA tensors on the 3B preset."""
    cfg = vlm_lib.make_config("llama3_2_3b", visual_token_id=128256, vocab_size=128257,
                              lora=lora_lib.LoraConfig(rank=16, alpha=32.0))
    ids = jax.ShapeDtypeStruct((1, 34), jnp.int32)
    slices = jax.ShapeDtypeStruct((1, 8, 1024), jnp.float32)
    abstract = jax.eval_shape(vlm_lib.VLM(cfg).init, jax.random.key(0), slices,
                              jax.ShapeDtypeStruct((1, 8), jnp.float32), jax.ShapeDtypeStruct((1, 8), bool), ids)
    params = nn.unbox(abstract)["params"]
    counts = vlm_lib.count_bridge_tensors(params)
    assert counts == {"projector": 6, "xattn": 21, "lora": 392}
    assert params["xattn_7"]["q_proj"]["kernel"].shape == (3072, 24, 128)
    assert params["predictor"]["linear"]["kernel"].shape == (1024, 3072)
    assert params["jepa_head"]["linear2"]["kernel"].shape == (1024, 256)


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_3b_preset_trains_f32_master_weights_over_bf16_frozen_ones(phase):
    """Mixed precision as the paper trains, by abstract init of the 3B preset under each phase's
    paper table: every trainable leaf (LoRA included) is stored in f32, the frozen Llama weights in
    bf16."""
    from kervljepa_jax.training import config as config_lib, phases
    config = config_lib.load_phase_config(phase, "paper")
    cfg = vlm_lib.make_config("llama3_2_3b", visual_token_id=128256, vocab_size=128257,
                              lora=lora_lib.LoraConfig(rank=16, alpha=32.0))
    abstract = jax.eval_shape(vlm_lib.VLM(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 1024), jnp.float32),
                              jax.ShapeDtypeStruct((1, 8), jnp.float32), jax.ShapeDtypeStruct((1, 8), bool),
                              jax.ShapeDtypeStruct((1, 34), jnp.int32))
    params = nn.unbox(abstract)["params"]
    labels = phases.trainable_labels(params, config.optimizer_groups, phase)
    dtypes = {p: (label, leaf.dtype) for p, label, leaf in
              zip(phases.leaf_paths(params), jax.tree.leaves(labels), jax.tree.leaves(params))}
    narrow = [p for p, (label, dtype) in dtypes.items() if label == phases.TRAINABLE and dtype != jnp.float32]
    assert not narrow, narrow[:5]
    frozen_llm = [dtype for p, (label, dtype) in dtypes.items()
                  if p.startswith("llm/") and label == phases.FROZEN and "lora_" not in p]
    assert frozen_llm and all(d == jnp.bfloat16 for d in frozen_llm)
    lora = [dtype for p, (_, dtype) in dtypes.items() if "lora_" in p]
    # 4 scanned segments (split at the adapters after layers 7, 14, 21) x 7 projections x (A, B)
    assert len(lora) == 4 * 7 * 2 and all(d == jnp.float32 for d in lora)


def test_ungated_vlm_is_the_default_without_gates_at_tanh_1(variables):
    """model.xattn_gate="none" (eq. 7): the default's param tree less the gates, same init, and the
    default's output with every gate fully open (tanh(20) == 1 in f32)."""
    ungated_cfg = vlm_lib.make_config("tiny", visual_token_id=VIS, d_visual=32, num_visual_tokens=K,
                                      lora=lora_lib.LoraConfig(rank=4, alpha=8.0), vocab_size=256,
                                      injection_layers=(0, 2), xattn_gate="none")
    ungated = vlm_lib.init(ungated_cfg, jax.random.key(0))
    def paths(tree):
        return {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    default, plain = paths(variables["params"]), paths(ungated["params"])
    assert set(default) - set(plain) == {"['xattn_0']['gate']", "['xattn_2']['gate']"}
    assert all(np.array_equal(plain[k], default[k]) for k in plain)
    open_gates = _with_gates(variables, 20.0)
    params = {**open_gates["params"], **{f"xattn_{l}": {k: v for k, v in open_gates["params"][f"xattn_{l}"].items()
                                                      if k != "gate"} for l in CFG.llm.injection_layers}}
    want = jax.jit(lambda v: MODEL.apply(v, *INPUTS).logits)(open_gates)
    got = jax.jit(lambda v: vlm_lib.VLM(ungated_cfg).apply(v, *INPUTS).logits)({**ungated, "params": params})
    np.testing.assert_allclose(got, want, atol=1e-5)
    fresh = jax.jit(lambda v: vlm_lib.VLM(ungated_cfg).apply(v, *INPUTS).logits)(ungated)
    base = jax.jit(lambda v: MODEL.apply(v, *INPUTS).logits)(variables)     # tanh at 0: the base LLM
    assert float(jnp.abs(fresh - base).max()) > 1e-3                      # ungated adapters act from the start
    with pytest.raises(ValueError, match="gate='sigmoid'"):
        vlm_lib.make_config("tiny", visual_token_id=VIS, xattn_gate="sigmoid")


def test_without_adapters_the_decoder_sees_the_visual_tokens_only_as_inputs(variables):
    """model.xattn_adapters=false (Table XI): the same param tree, and with the gates open the output
    of the default with every gate shut (tanh(0) = 0): only the grafted tokens carry the image."""
    off_cfg = dataclasses.replace(CFG, xattn_adapters=False)
    off = vlm_lib.init(off_cfg, jax.random.key(0))
    assert jax.tree.structure(off["params"]) == jax.tree.structure(variables["params"])
    open_gates, shut_gates = _with_gates(variables, 0.7), _with_gates(variables, 0.0)
    got = jax.jit(lambda v: vlm_lib.VLM(off_cfg).apply(v, *INPUTS).logits)(open_gates)
    want = jax.jit(lambda v: MODEL.apply(v, *INPUTS).logits)(shut_gates)
    np.testing.assert_allclose(got, want, atol=1e-6)
    opened = jax.jit(lambda v: MODEL.apply(v, *INPUTS).logits)(open_gates)
    assert float(jnp.abs(opened - want).max()) > 1e-3                      # the adapters did act when on
    ablated = vlm_lib.make_config("tiny", visual_token_id=VIS, xattn_adapters=False, zone_constraint=False,
                                  norm_calibration=False)
    assert (ablated.xattn_adapters, ablated.compressor.zone_constraint, ablated.bridge.norm_calibration) == (False,) * 3
