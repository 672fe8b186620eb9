"""JEPA predictor, norm calibration, SVD init and the auxiliary heads, checked against PyTorch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kervljepa_jax.findings import NUM_CLASSES
from kervljepa_jax.model import bridge as B
from kervljepa_jax.sharding import make_mesh, named_shardings

CFG = B.BridgeConfig(d_visual=32, d_llm=48, jepa_hidden=40, jepa_dim=16, predictor_dropout=0.1)
RNG = np.random.default_rng(0)


def t(x):
    return torch.from_numpy(np.array(x, np.float32))


def torch_linear(params, name):
    """A torch Linear carrying the flax Dense `params[name]` (kernel [in, out] = weight.T)."""
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    layer = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
        layer.weight.copy_(t(kernel.T))
        layer.bias.copy_(t(bias))
    return layer


def torch_layer_norm(params, name, eps=1e-5):
    scale, bias = np.asarray(params[name]["scale"]), np.asarray(params[name]["bias"])
    layer = torch.nn.LayerNorm(scale.shape[0], eps=eps)
    with torch.no_grad():
        layer.weight.copy_(t(scale))
        layer.bias.copy_(t(bias))
    return layer


def perturbed(params):
    """Non-trivial LN scale/bias so that every tensor of the torch comparison matters."""
    return jax.tree.map(lambda x: x + 0.1 * jnp.asarray(RNG.normal(size=x.shape), x.dtype), params)


# --------------------------------------------------------------------------------------- predictor

@pytest.fixture(scope="module")
def predictor():
    model = B.JEPAPredictor(CFG)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, CFG.d_visual)))
    return model, variables


def test_predictor_equals_torch_linear_then_layer_norm(predictor):
    model, variables = predictor
    params = perturbed(nn.unbox(variables)["params"])
    x = RNG.normal(size=(2, 32, CFG.d_visual)).astype(np.float32)
    ref = torch.nn.Sequential(torch_linear(params, "linear"), torch_layer_norm(params, "norm")).eval()
    with torch.no_grad():
        want = ref(t(x)).numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert got.shape == (2, 32, CFG.d_llm)
    assert np.abs(got - want).max() <= 1e-5


def test_predictor_dropout_only_in_training(predictor):
    model, variables = predictor
    x = jnp.asarray(RNG.normal(size=(2, 8, CFG.d_visual)), jnp.float32)
    eval_out = model.apply(variables, x)
    train_out = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(train_out - eval_out)).max() > 1e-3
    with pytest.raises(ValueError, match="last dimension 32"):
        model.apply(variables, jnp.zeros((1, 4, 31)))


# --------------------------------------------------------------------------------------- calibration

def test_alpha_lives_outside_params_and_scales_the_tokens():
    calibrator = B.NormCalibrator()
    x = jnp.asarray(RNG.normal(size=(2, 8, CFG.d_llm)), jnp.float32)
    variables = calibrator.init(jax.random.PRNGKey(0), x)
    assert "params" not in variables and float(variables[B.CALIBRATION]["alpha"]) == 1.0
    text = RNG.normal(size=(100, CFG.d_llm)) * 0.02          # LLM-embedding-like: small norms
    alpha = B.calibrate_alpha(text, np.asarray(x))
    calibrated = calibrator.apply(B.with_alpha(variables, alpha), x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(calibrated), axis=-1).mean(),
                               np.linalg.norm(text, axis=-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(calibrated), alpha * np.asarray(x), rtol=1e-6)
    assert float(variables[B.CALIBRATION]["alpha"]) == 1.0  # with_alpha did not mutate its input


def test_without_norm_calibration_alpha_stays_1():
    """The Table XI ablation: the trainer's alpha is 1 whatever the norms, and V~ = V^ even when a
    checkpoint carries another alpha; with calibration on, the same norms give eq. 6's value."""
    x = jnp.asarray(RNG.normal(size=(2, 8, CFG.d_llm)), jnp.float32)
    text_norms, visual_norms = np.full(100, 0.5), np.linalg.norm(np.asarray(x), axis=-1)
    assert B.calibrated_alpha(text_norms, visual_norms, enabled=False) == 1.0
    assert B.calibrated_alpha(text_norms, visual_norms) == pytest.approx(0.5 / visual_norms.mean())
    off = B.NormCalibrator(enabled=False)
    variables = B.with_alpha(off.init(jax.random.PRNGKey(0), x), 2.5)
    np.testing.assert_array_equal(np.asarray(off.apply(variables, x)), np.asarray(x))
    np.testing.assert_allclose(np.asarray(B.NormCalibrator().apply(variables, x)), 2.5 * np.asarray(x), rtol=1e-6)


def test_with_alpha_inside_a_parent_module_and_gradients_skip_alpha():
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            return B.NormCalibrator(name="calibrator")(nn.Dense(4, name="dense")(x))

    x = jnp.ones((2, 3))
    variables = Parent().init(jax.random.PRNGKey(0), x)
    updated = B.with_alpha(variables, 2.5, ("calibrator",))
    np.testing.assert_allclose(np.asarray(Parent().apply(updated, x)), 2.5 * np.asarray(Parent().apply(variables, x)),
                               rtol=1e-6)
    grads = jax.grad(lambda p: Parent().apply({**updated, "params": p}, x).sum())(updated["params"])
    assert set(grads) == {"dense"}
    with pytest.raises(ValueError, match="module path"):
        B.with_alpha(variables, 2.0, ("elsewhere",))


def test_calibrate_alpha_rejects_bad_input():
    with pytest.raises(ValueError, match="same non-empty D"):
        B.calibrate_alpha(np.ones((4, 8)), np.ones((4, 9)))
    with pytest.raises(ValueError, match="zero norm"):
        B.calibrate_alpha(np.ones((4, 8)), np.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="NaN"):
        B.calibrate_alpha(np.full((4, 8), np.nan), np.ones((2, 8)))


# --------------------------------------------------------------------------------------- SVD init

def anisotropic(n, dim, top, seed):
    """Samples whose leading principal direction is `top` (unit), with a clear spectral gap."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * 0.1
    return x + rng.normal(size=(n, 1)) * 3.0 * top + 5.0  # + a constant offset the centring must remove


def test_svd_init_maps_the_top_visual_direction_onto_the_top_text_direction():
    rng = np.random.default_rng(1)
    text_top = rng.normal(size=CFG.d_llm)
    text_top /= np.linalg.norm(text_top)
    vis_top = rng.normal(size=CFG.d_visual)
    vis_top /= np.linalg.norm(vis_top)
    kernel = B.svd_init_predictor_kernel(anisotropic(400, CFG.d_llm, text_top, 2),
                                         anisotropic(300, CFG.d_visual, vis_top, 3))
    assert kernel.shape == (CFG.d_visual, CFG.d_llm) and kernel.dtype == np.float32
    image = vis_top @ kernel
    assert abs(image @ text_top) / np.linalg.norm(image) > 0.99
    np.testing.assert_allclose(np.linalg.norm(kernel), np.sqrt(CFG.d_llm / 3.0), rtol=1e-5)


def test_svd_init_from_d_visual_only_and_rank_deficient_text():
    text = RNG.normal(size=(10, CFG.d_llm))                 # 10 texts: at most 10 components
    kernel = B.svd_init_predictor_kernel(text, d_visual=CFG.d_visual)
    assert kernel.shape == (CFG.d_visual, CFG.d_llm)
    row_norms = np.linalg.norm(kernel, axis=1)
    assert (row_norms[:9] > 0).all() and np.allclose(row_norms[10:], 0.0)
    centred = text - text.mean(0)                            # rows live in the text's principal subspace
    residual = kernel[:9] - kernel[:9] @ np.linalg.pinv(centred) @ centred
    assert np.abs(residual).max() < 1e-4
    with pytest.raises(ValueError, match="visual sample"):
        B.svd_init_predictor_kernel(text)


# --------------------------------------------------------------------------------------- heads

def test_jepa_head_equals_torch_and_works_per_token():
    head = B.JEPAHead(CFG)
    variables = head.init(jax.random.PRNGKey(2), jnp.zeros((1, CFG.d_llm)))
    params = perturbed(nn.unbox(variables)["params"])
    ref = torch.nn.Sequential(torch_linear(params, "linear1"), torch_layer_norm(params, "norm"),
                              torch.nn.GELU(), torch_linear(params, "linear2")).eval()
    tokens = RNG.normal(size=(3, 32, CFG.d_llm)).astype(np.float32)
    apply = jax.jit(head.apply)
    pooled = np.asarray(apply({"params": params}, tokens.mean(1)))
    per_token = np.asarray(apply({"params": params}, tokens))
    with torch.no_grad():
        assert np.abs(pooled - ref(t(tokens.mean(1))).numpy()).max() <= 1e-5
        assert np.abs(per_token - ref(t(tokens)).numpy()).max() <= 1e-5
    assert pooled.shape == (3, CFG.jepa_dim) and per_token.shape == (3, 32, CFG.jepa_dim)


def test_visual_classifier_mean_and_mil_share_one_linear_layer():
    assert CFG.num_classes == NUM_CLASSES == 18
    clf = B.VisualClassifier(CFG)
    tokens = RNG.normal(size=(2, 32, CFG.d_visual)).astype(np.float32)
    variables = clf.init(jax.random.PRNGKey(3), tokens)
    params = nn.unbox(variables)["params"]
    assert len(jax.tree.leaves(params)) == 2
    logits, mil = clf.apply(variables, tokens)
    kernel, bias = np.asarray(params["linear"]["kernel"]), np.asarray(params["linear"]["bias"])
    np.testing.assert_allclose(np.asarray(logits), tokens.mean(1) @ kernel + bias, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mil), tokens.max(1) @ kernel + bias, atol=1e-5)
    assert logits.shape == mil.shape == (2, 18)


def test_llm_visual_classifier_pools_only_the_response():
    clf = B.LLMVisualClassifier(CFG)
    hidden = RNG.normal(size=(3, 10, CFG.d_llm)).astype(np.float32)
    mask = np.zeros((3, 10), bool)
    mask[0, 4:9], mask[1, :] = True, True                     # row 2: no response token at all
    variables = clf.init(jax.random.PRNGKey(4), hidden, mask)
    logits = np.asarray(clf.apply(variables, hidden, mask))
    params = nn.unbox(variables)["params"]["linear"]
    want0 = hidden[0, 4:9].mean(0) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(logits[0], want0, atol=1e-5)
    np.testing.assert_allclose(logits[2], np.asarray(params["bias"]), atol=1e-6)
    changed = hidden.copy()
    changed[0, :4] += 100.0                                   # prompt tokens must not matter
    np.testing.assert_allclose(np.asarray(clf.apply(variables, changed, mask))[0], logits[0], atol=1e-5)
    with pytest.raises(ValueError, match="response_mask"):
        clf.apply(variables, hidden, mask[:, :5])


def test_every_weight_has_logical_axes():
    x_v, x_l = jnp.zeros((1, 4, CFG.d_visual)), jnp.zeros((1, 4, CFG.d_llm))
    boxed = {
        "predictor": jax.eval_shape(B.JEPAPredictor(CFG).init, jax.random.PRNGKey(0), x_v)["params"],
        "jepa_head": jax.eval_shape(B.JEPAHead(CFG).init, jax.random.PRNGKey(0), x_l)["params"],
        "visual_cls": jax.eval_shape(B.VisualClassifier(CFG).init, jax.random.PRNGKey(0), x_v)["params"],
        "llm_cls": jax.eval_shape(B.LLMVisualClassifier(CFG).init, jax.random.PRNGKey(0), x_l,
                                  jnp.ones((1, 4), bool))["params"],
    }
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 4 + 6 + 2 + 2
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == len(x.value.shape) for x in leaves)
    assert boxed["predictor"]["linear"]["kernel"].names == ("visual_embed", "embed")
    assert len(jax.tree.leaves(named_shardings(boxed, make_mesh(data=2, fsdp=2, tensor=2)))) == len(leaves)


def test_paper_sizes_on_abstract_shapes():
    """d_v=1024 -> d_llm=3072 predictor, 256-d JEPA head and 18-class heads, traced without weights."""
    cfg = B.BridgeConfig()
    tokens = jax.ShapeDtypeStruct((2, 32, 1024), jnp.float32)
    predictor = B.JEPAPredictor(cfg)
    variables = jax.eval_shape(predictor.init, jax.random.PRNGKey(0), tokens)
    v_hat = jax.eval_shape(predictor.apply, variables, tokens)
    assert v_hat.shape == (2, 32, 3072)
    head = B.JEPAHead(cfg)
    head_vars = jax.eval_shape(head.init, jax.random.PRNGKey(0), v_hat)
    assert jax.eval_shape(head.apply, head_vars, v_hat).shape == (2, 32, 256)
    clf = B.VisualClassifier(cfg)
    logits, mil = jax.eval_shape(clf.apply, jax.eval_shape(clf.init, jax.random.PRNGKey(0), tokens), tokens)
    assert logits.shape == mil.shape == (2, 18)


def test_sharded_predictor_matches_single_device(predictor):
    from kervljepa_jax.sharding import use_mesh
    model, variables = predictor
    params = nn.unbox(variables)["params"]
    x = jnp.asarray(RNG.normal(size=(4, 32, CFG.d_visual)), jnp.float32)
    want = np.asarray(model.apply({"params": params}, x))
    with use_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    np.testing.assert_allclose(got, want, atol=1e-5)
