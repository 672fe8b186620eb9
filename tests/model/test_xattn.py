"""Gated cross-attention adapter and visual projector: identity at init, decode-step parity, torch MHA parity."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from kervljepa_jax.model import xattn as X
from kervljepa_jax.sharding import make_mesh, named_shardings

CFG = X.CrossAttentionConfig(d_model=32, num_heads=4, head_dim=8)
K = 32
RNG = np.random.default_rng(0)
ADAPTER = X.GatedCrossAttention(CFG)


def inputs(batch=2, length=7, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(batch, length, CFG.d_model)).astype(np.float32)
    visual = rng.normal(size=(batch, K, CFG.d_model)).astype(np.float32)
    return jnp.asarray(h), jnp.asarray(visual)


@pytest.fixture(scope="module")
def fresh_params():
    h, visual = inputs()
    return nn.unbox(jax.jit(ADAPTER.init)(jax.random.PRNGKey(0), h, visual))["params"]


@pytest.fixture(scope="module")
def open_params(fresh_params):
    """The adapter with a non-zero gate and a non-trivial LayerNorm, as after training."""
    params = dict(fresh_params)
    params["gate"] = jnp.asarray(0.7)
    params["layer_norm"] = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(RNG.normal(size=x.shape), x.dtype),
                                        params["layer_norm"])
    return params


adapter = jax.jit(lambda p, h, v, m=None: ADAPTER.apply({"params": p}, h, v, m))


def test_fresh_adapter_is_exactly_the_identity(fresh_params):
    h, visual = inputs()
    assert float(fresh_params["gate"]) == 0.0
    assert np.array_equal(np.asarray(adapter(fresh_params, h, visual)), np.asarray(h))
    h16 = h.astype(jnp.bfloat16)  # exact in the LLM's compute dtype too
    assert np.array_equal(np.asarray(adapter(fresh_params, h16, visual.astype(jnp.bfloat16))), np.asarray(h16))


def test_open_gate_changes_the_output_and_depends_on_the_visual_tokens(open_params):
    h, visual = inputs()
    out = np.asarray(adapter(open_params, h, visual))
    assert np.abs(out - np.asarray(h)).max() > 1e-3
    other = np.asarray(adapter(open_params, h, visual[::-1]))   # another patient's tokens
    assert np.abs(out - other).max() > 1e-3


def test_full_sequence_equals_token_by_token_decoding(open_params):
    h, visual = inputs(length=9, seed=1)
    full = np.asarray(adapter(open_params, h, visual))
    steps = np.concatenate([np.asarray(adapter(open_params, h[:, i:i + 1], visual)) for i in range(h.shape[1])], 1)
    np.testing.assert_allclose(steps, full, atol=1e-6)


def _torch_attended(params, h, visual, mask):
    """torch.MHA(bias=False)(LN(h), P, P) on the adapter's weights (head_dim * heads == D here): eq. 7's MHA_l."""
    d, p = CFG.d_model, jax.tree.map(np.asarray, params)
    mha = torch.nn.MultiheadAttention(d, CFG.num_heads, bias=False, batch_first=True).eval()
    ln = torch.nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate(
            [p[n]["kernel"].reshape(d, d).T for n in ("q_proj", "k_proj", "v_proj")], 0)))
        mha.out_proj.weight.copy_(torch.from_numpy(p["o_proj"]["kernel"].reshape(d, d).T.copy()))
        ln.weight.copy_(torch.from_numpy(p["layer_norm"]["scale"].copy()))
        ln.bias.copy_(torch.from_numpy(p["layer_norm"]["bias"].copy()))
        th, tv = torch.from_numpy(np.array(h)), torch.from_numpy(np.array(visual))
        attended, _ = mha(ln(th), tv, tv, key_padding_mask=torch.from_numpy(~mask), need_weights=False)
    return attended.numpy()


def _masked_inputs():
    h, visual = inputs(seed=2)
    mask = np.ones((2, K), bool)
    mask[1, 20:] = False
    return h, visual, mask


def test_matches_torch_multihead_attention(open_params):
    """h + tanh(gate) * torch.MHA(bias=False)(LN(h), P, P) on the same weights."""
    h, visual, mask = _masked_inputs()
    want = np.asarray(h) + np.tanh(0.7) * _torch_attended(open_params, h, visual, mask)
    got = np.asarray(adapter(open_params, h, visual, jnp.asarray(mask)))
    assert np.abs(got - want).max() <= 1e-5


def test_ungated_adapter_is_eq_7(open_params):
    """gate="none": h' = h + MHA_l(LN(h), P, P) as eq. 7 writes it, and no gate parameter."""
    ungated = X.GatedCrossAttention(dataclasses.replace(CFG, gate="none"))
    h, visual, mask = _masked_inputs()
    fresh = nn.unbox(ungated.init(jax.random.PRNGKey(0), h, visual))["params"]
    assert set(fresh) == {"q_proj", "k_proj", "v_proj", "o_proj", "layer_norm"}
    params = {k: v for k, v in open_params.items() if k != "gate"}
    got = np.asarray(ungated.apply({"params": params}, h, visual, jnp.asarray(mask)))
    want = np.asarray(h) + _torch_attended(open_params, h, visual, mask)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got - np.asarray(h)).max() > 1e-2           # a fresh ungated adapter is no identity


def test_gate_init_and_bad_gate():
    h, visual = inputs()
    opened = X.GatedCrossAttention(dataclasses.replace(CFG, gate_init=0.5))
    params = nn.unbox(opened.init(jax.random.PRNGKey(0), h, visual))["params"]
    assert float(params["gate"]) == 0.5
    assert np.abs(np.asarray(opened.apply({"params": params}, h, visual)) - np.asarray(h)).max() > 1e-3
    with pytest.raises(ValueError, match="gate='sigmoid'"):
        X.CrossAttentionConfig(gate="sigmoid")


def test_visual_mask(open_params):
    h, visual = inputs(seed=3)
    mask = np.ones((2, K), bool)
    mask[:, 16:] = False
    masked = np.asarray(adapter(open_params, h, visual, jnp.asarray(mask)))
    scrambled = np.asarray(visual).copy()
    scrambled[:, 16:] = RNG.normal(size=scrambled[:, 16:].shape)
    np.testing.assert_allclose(np.asarray(adapter(open_params, h, jnp.asarray(scrambled), jnp.asarray(mask))),
                               masked, atol=1e-6)                 # hidden tokens are never read
    nothing = np.asarray(adapter(open_params, h, visual, jnp.zeros((2, K), bool)))
    assert np.array_equal(nothing, np.asarray(h))                 # nothing visible -> no contribution


def test_initialisation_is_xavier_with_gain_0_3(fresh_params):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w = np.asarray(fresh_params[name]["kernel"])
        bound = 0.3 * np.sqrt(6.0 / (CFG.d_model + CFG.num_heads * CFG.head_dim))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, name
    assert set(fresh_params) == {"q_proj", "k_proj", "v_proj", "o_proj", "layer_norm", "gate"}


def test_bad_shapes_fail_clearly(fresh_params):
    h, visual = inputs()
    with pytest.raises(ValueError, match="GatedCrossAttention"):
        ADAPTER.apply({"params": fresh_params}, h[..., :16], visual)
    with pytest.raises(ValueError, match="visual_mask"):
        ADAPTER.apply({"params": fresh_params}, h, visual, jnp.ones((2, 5), bool))


class ThreeInjections(nn.Module):
    """How the decoder holds the bridge: projector_l and xattn_l after layers 7, 14, 21."""

    @nn.compact
    def __call__(self, h, visual):
        for layer in (7, 14, 21):
            projected = X.VisualProjector(CFG, name=f"projector_{layer}")(visual)
            h = X.GatedCrossAttention(CFG, name=f"xattn_{layer}")(h, projected)
        return h


def test_three_injection_layers_hold_the_papers_27_bridge_tensors():
    h, visual = inputs()
    boxed = jax.eval_shape(ThreeInjections().init, jax.random.PRNGKey(0), h, visual)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 27 == 3 * 7 + 3 * 2
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == len(x.value.shape) for x in leaves)
    paths = ["/".join(k) for k in traverse_util.flatten_dict(nn.unbox(boxed))]
    assert sum(bool(re.fullmatch(X.XATTN_PATTERN, p)) for p in paths) == 21
    assert sum(bool(re.fullmatch(X.PROJECTOR_PATTERN, p)) for p in paths) == 6
    assert "xattn_7/gate" in paths and "projector_14/kernel" in paths
    assert len(jax.tree.leaves(named_shardings(boxed, make_mesh(data=2, fsdp=2, tensor=2)))) == 27


def test_fresh_stack_is_the_identity_and_projector_is_a_linear_map():
    h, visual = inputs(seed=4)
    variables = ThreeInjections().init(jax.random.PRNGKey(1), h, visual)
    assert np.array_equal(np.asarray(ThreeInjections().apply(variables, h, visual)), np.asarray(h))
    projector = nn.unbox(variables)["params"]["projector_7"]
    kernel, bias = (np.asarray(projector[k]) for k in ("kernel", "bias"))
    got = X.VisualProjector(CFG).apply({"params": projector}, visual)
    np.testing.assert_allclose(np.asarray(got), np.asarray(visual) @ kernel + bias, atol=1e-5)


def test_paper_sizes_on_abstract_shapes():
    """Llama 3.2 3B sizes (D=3072, 24 x 128) at injection layers 7, 14, 21: 27 tensors, traced without weights."""
    cfg = X.CrossAttentionConfig()

    class Bridge3B(nn.Module):
        @nn.compact
        def __call__(self, h, visual):
            for layer in (7, 14, 21):
                h = X.GatedCrossAttention(cfg, name=f"xattn_{layer}")(
                    h, X.VisualProjector(cfg, name=f"projector_{layer}")(visual))
            return h

    h, visual = jax.ShapeDtypeStruct((2, 1, 3072), jnp.bfloat16), jax.ShapeDtypeStruct((2, 32, 3072), jnp.bfloat16)
    variables = jax.eval_shape(Bridge3B().init, jax.random.PRNGKey(0), h, visual)
    assert jax.eval_shape(Bridge3B().apply, variables, h, visual).shape == (2, 1, 3072)
    params = nn.unbox(variables)["params"]
    assert len(jax.tree.leaves(params)) == 27
    assert params["xattn_14"]["q_proj"]["kernel"].shape == (3072, 24, 128)
    assert sum(x.size for x in jax.tree.leaves(params)) == 3 * (4 * 3072 * 3072 + 2 * 3072 + 1 + 3072 * 3072 + 3072)


def test_sharded_forward_matches_single_device(open_params):
    from kervljepa_jax.sharding import use_mesh
    h, visual = inputs(batch=4, seed=5)
    want = np.asarray(adapter(open_params, h, visual))
    with use_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        got = np.asarray(jax.jit(lambda p, h, v: ADAPTER.apply({"params": p}, h, v))(open_params, h, visual))
    np.testing.assert_allclose(got, want, atol=1e-5)
