"""The phase train step on a mesh: one step of each phase on 8 forced host devices (data, FSDP and
a 3D data x fsdp x tensor layout) gives the single-device loss and updated trainable parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kervljepa_jax import findings, sharding
from kervljepa_jax.data import pipeline
from kervljepa_jax.model import lora as lora_lib, vlm as vlm_lib
from kervljepa_jax.training import config as config_lib, optim, phases, step as step_lib

CFG = vlm_lib.make_config("tiny", visual_token_id=5, vocab_size=64, d_visual=16, num_visual_tokens=4,
                          lora=lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0), injection_layers=(1,))
B, N, T, C = 8, 12, 16, findings.NUM_CLASSES
MESHES = ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2"]


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, 64, (B, T)).astype(np.int32)
    ids[:, 1:5] = CFG.visual_token_id
    jepa = CFG.bridge.jepa_dim
    return {"slices": rng.normal(size=(B, N, 16)).astype(np.float32),
            "z_mm": np.cumsum(np.full((B, N), 1.5, np.float32), 1), "valid": np.arange(N)[None] < rng.integers(4, N, (B, 1)),
            "input_ids": ids, "attention_mask": np.ones((B, T), bool), "loss_mask": np.arange(T)[None].repeat(B, 0) >= 5,
            "labels": (rng.random((B, C)) < 0.3).astype(np.int32),
            "target_embedding": rng.normal(size=(B, jepa)).astype(np.float32),
            "condition_embedding": rng.normal(size=(B, C, jepa)).astype(np.float32),
            "condition_valid": rng.random((B, C)) < 0.5}


def _consts():
    rng = np.random.default_rng(1)
    d, jepa = CFG.llm.hidden_size, CFG.bridge.jepa_dim
    return {"whitening": {"mean": jnp.asarray(rng.normal(size=d), jnp.float32),
                          "projection": jnp.asarray(rng.normal(size=(d, jepa)) / 8, jnp.float32)},
            "pos_weight": jnp.full((C,), 2.0)}


@pytest.fixture(scope="module")
def boxed():
    """Boxed fresh variables (logical axes kept for the shardings), LoRA B moved off zero."""
    model = vlm_lib.VLM(CFG)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, N, 16)), jnp.zeros((1, N)), jnp.ones((1, N), bool),
                               jnp.full((1, 6), CFG.visual_token_id, jnp.int32))


def _one_step(phase, variables, batch, consts, mesh=None):
    config = config_lib.load_phase_config(phase, "paper")
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 it turns a gradient that is
    # zero in exact arithmetic (an attention key bias: softmax ignores a shift shared by all keys) and
    # ~1e-9 in floats into a full +-lr step whose sign is the summation order's. eps 1e-4 keeps such
    # noise out of the comparison and every real update (|g| >> 1e-4) at ~lr.
    config.train.update(dict(lr=1e-3, eps=1e-4))
    params = variables["params"]
    labels = phases.trainable_labels(params, config.optimizer_groups, phase)
    trainable, frozen = phases.split_params(params, labels)
    tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch=10)
    encoder = step_lib.TextEncoder(CFG.llm, 2)
    step = jax.jit(step_lib.make_train_step(phase, vlm_lib.VLM(CFG), encoder, tx, dict(config.loss_weights)))
    out = step(trainable, frozen, tx.init(trainable), variables["calibration"], batch, jax.random.key(3), consts)
    new, _, metrics = jax.device_get(out)
    return float(metrics["loss"]), dict(zip(phases.leaf_paths(new), jax.tree.leaves(new)))


# Phases 1 and 3 cover every module (compressor, heads, LLM, adapters); 2 and 4 run with the slow tests.
@pytest.mark.parametrize("phase", [1, pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
def test_one_step_on_each_mesh_equals_one_device(phase, boxed):
    variables = nn.unbox(boxed)
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.02 if kp[-1].key == "lora_B" else x, variables["params"])
    batch, consts = _batch(), _consts()
    loss, params = _one_step(phase, variables, {k: jnp.asarray(v) for k, v in batch.items()}, consts)
    assert np.isfinite(loss)
    for spec in MESHES:
        mesh = sharding.mesh_from_spec(spec)
        with sharding.use_mesh(mesh):
            shardings = sharding.named_shardings(boxed, mesh)
            placed = {"params": sharding.shard_params(variables["params"], shardings["params"]),
                      "calibration": jax.device_put(variables["calibration"], sharding.replicated(mesh))}
            sharded_batch = pipeline.to_global(batch, mesh)
            assert sharded_batch["slices"].sharding.spec[0] == ("data", "fsdp")
            mesh_loss, mesh_params = _one_step(phase, placed, sharded_batch,
                                               jax.device_put(consts, sharding.replicated(mesh)), mesh)
        np.testing.assert_allclose(mesh_loss, loss, rtol=1e-5, err_msg=spec)
        assert mesh_params.keys() == params.keys()
        for path, value in params.items():     # updates are ~1e-3; a missing or doubled one fails
            np.testing.assert_allclose(mesh_params[path], value, rtol=1e-5, atol=2e-6, err_msg=f"{spec} {path}")


def test_a_term_weighted_zero_is_not_computed_and_its_nan_cannot_spoil_the_step(boxed, monkeypatch):
    """The embedded default's phase 3 weighs focal, JEPA and LLM-cls at 0: they are not computed (not
    in the metrics), and a NaN one of them would produce leaves the loss finite (0 * NaN is NaN)."""
    monkeypatch.setattr(step_lib.losses, "focal_loss", lambda *a, **k: jnp.float32(jnp.nan))
    variables, batch, consts = nn.unbox(boxed), {k: jnp.asarray(v) for k, v in _batch().items()}, _consts()
    config = config_lib.load_phase_config(3)
    weights = dict(config.loss_weights)
    assert weights["focal"] == weights["jepa"] == weights["llm_cls"] == 0.0 and weights["lm"] == 1.0
    encoder = step_lib.TextEncoder(CFG.llm, 2)
    terms = step_lib.phase_losses(3, vlm_lib.VLM(CFG), encoder, variables["params"], variables["calibration"],
                                  batch, jax.random.key(0), consts, weights)
    assert set(terms) == {"lm"} and np.isfinite(float(terms["lm"]))
    every = step_lib.phase_losses(3, vlm_lib.VLM(CFG), encoder, variables["params"], variables["calibration"],
                                  batch, jax.random.key(0), consts)
    assert set(every) == {"lm", "focal", "jepa", "llm_cls"} and np.isnan(float(every["focal"]))


def test_a_phase_whose_every_loss_weight_is_zero_is_a_one_line_config_error():
    from kervljepa_jax.training.config import OverrideError
    with pytest.raises(OverrideError, match="phase 4: every loss weight is 0"):
        step_lib.check_loss_weights(4, {"lm": 0.0, "focal": 0.0})


@pytest.mark.parametrize("chunk", [3, 16])
def test_lm_loss_frozen_head_equals_lm_loss_from_hidden_in_value_and_hidden_gradient(chunk):
    """The closed-form head gradient (no logits recomputed) is the recomputing loss's, padding,
    skipped chunks (rows whose targets all sit in the first chunks) and the target-first order included."""
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 13, 8, 40
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.4)
    general = jax.value_and_grad(lambda h: step_lib.losses.lm_loss_from_hidden(h, tokens, mask, lambda x: x @ w.T,
                                                                                chunk))
    fused = jax.value_and_grad(lambda h: step_lib.lm_loss_frozen_head(h, w, tokens, mask, jnp.float32, chunk))
    (loss, grad), (fused_loss, fused_grad) = general(hidden), jax.jit(fused)(hidden)
    np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(fused_grad, grad, rtol=1e-5, atol=1e-7)


def test_phase_3_takes_the_frozen_head_path_with_the_general_paths_loss_and_gradients(boxed):
    variables, batch, consts = nn.unbox(boxed), {k: jnp.asarray(v) for k, v in _batch().items()}, _consts()
    params = variables["params"]
    labels = phases.trainable_labels(params, config_lib.load_phase_config(3).optimizer_groups, 3)
    trainable, frozen = phases.split_params(params, labels)
    assert step_lib.head_is_frozen(CFG.llm, trainable) and not step_lib.head_is_frozen(CFG.llm, params)
    encoder, weights = step_lib.TextEncoder(CFG.llm, 2), {"lm": 1.0}

    def loss(t, head_frozen):
        return step_lib.phase_losses(3, vlm_lib.VLM(CFG), encoder, phases.merge_params(t, frozen),
                                     variables["calibration"], batch, jax.random.key(0), consts, weights,
                                     head_frozen)["lm"]

    general, fused = (jax.jit(jax.value_and_grad(lambda t, f=f: loss(t, f)))(trainable) for f in (False, True))
    np.testing.assert_allclose(fused[0], general[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(general[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_loss_terms_come_from_the_registry_by_their_weights():
    """Every phase term is registered; a weighted term a phase cannot compute is a one-line error,
    not a silent drop; a phase-3 step whose only term reads the visual path skips the decoder."""
    from kervljepa_jax.training.config import OverrideError
    assert {n for terms in step_lib.LOSS_TERMS.values() for n in terms} == set(step_lib.LOSS_REGISTRY)
    with pytest.raises(OverrideError, match=r"phase 1: loss_weights \['lm'\] name no term of this phase"):
        step_lib.check_loss_weights(1, {"bce": 1.0, "mil": 1.0, "orth": 1.0, "mmd": 0.5, "lm": 1.0})
    assert not any(step_lib.LOSS_REGISTRY[n].reads_llm for n in step_lib.LOSS_TERMS[1] + step_lib.LOSS_TERMS[2])
    # The text targets are embedded only for a phase whose weighted terms read them: not for the
    # default's LM-only phases 3-4, nor phase 1 without its MMD term.
    assert {n for n, term in step_lib.LOSS_REGISTRY.items() if term.reads_text} == {"mmd", "infonce", "jepa"}
    assert step_lib.reads_text_targets(3, {"lm": 1.0, "focal": 1.0, "jepa": 1.0, "llm_cls": 3.0})
    assert not step_lib.reads_text_targets(3, {"lm": 1.0, "focal": 0.0, "jepa": 0.0, "llm_cls": 0.0})
    assert not step_lib.reads_text_targets(1, {"bce": 1.5, "mil": 1.0, "orth": 1.0, "mmd": 0.0})
    assert step_lib.reads_text_targets(2, {"mmd": 0.0, "infonce": 1.0})


def test_a_phase3_step_of_visual_terms_alone_runs_no_decoder(boxed, monkeypatch):
    variables, batch, consts = nn.unbox(boxed), {k: jnp.asarray(v) for k, v in _batch().items()}, _consts()
    encoder = step_lib.TextEncoder(CFG.llm, 2)
    calls = []
    real_apply = vlm_lib.VLM.apply

    def counting_apply(self, variables, *args, **kwargs):
        calls.append(len(args))
        return real_apply(self, variables, *args, **kwargs)
    monkeypatch.setattr(vlm_lib.VLM, "apply", counting_apply)
    weights = {"lm": 0.0, "focal": 0.0, "jepa": 1.0, "llm_cls": 0.0}
    terms = step_lib.phase_losses(3, vlm_lib.VLM(CFG), encoder, variables["params"], variables["calibration"],
                                  batch, jax.random.key(0), consts, weights)
    assert set(terms) == {"jepa"} and np.isfinite(float(terms["jepa"]))
    assert calls[0] == 3          # slices, z_mm, valid: the visual path only, no input_ids
