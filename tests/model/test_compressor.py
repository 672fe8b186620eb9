"""Zone-constrained compressor: zone arithmetic, locality, padding invariance, and PyTorch parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kervljepa_jax.model import compressor as C
from kervljepa_jax.model.llama import ModelConfigError
from kervljepa_jax.sharding import make_mesh, named_shardings

K = 32
CFG = C.CompressorConfig(d_visual=32, num_zones=K, num_heads=4, ffn_dim=64, dropout=0.1)
MODEL = C.ZoneCompressor(CFG)


@pytest.fixture(scope="module")
def variables():
    """Abstract boxed variables (shapes + logical names; tracing init costs no compile)."""
    return jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, CFG.d_visual)), jnp.zeros((1, 4)),
                          jnp.ones((1, 4), bool))


@pytest.fixture(scope="module")
def params(torch_reference):
    """The PyTorch reference's weights (non-zero biases, random queries), mapped to ours."""
    return C.torch_state_dict_to_params(torch_reference.state_dict(), CFG)


def _zone_tokens_and_output(module, slices, z_mm, valid):
    tokens = module.zone_tokens(slices, z_mm, valid)
    return tokens, module.global_layer(tokens)


# One jitted entry for both outputs; retraces only on a new [B, N].
_both = jax.jit(lambda p, s, z, v: MODEL.apply({"params": p}, s, z, v, method=_zone_tokens_and_output))


def forward(p, s, z, v):
    return _both(p, s, z, v)[1]


def zone_tokens(p, s, z, v):
    return _both(p, s, z, v)[0]


train_forward = jax.jit(lambda p, s, z, v, key: MODEL.apply({"params": p}, s, z, v, deterministic=False,
                                                            rngs={"dropout": key}))
sown_forward = jax.jit(lambda p, s, z, v: MODEL.apply({"params": p}, s, z, v, mutable=["intermediates"]))


def volume(rng, n, pad_to, batch=1, spacing=1.5):
    """A padded batch: slices [B, pad_to, d], z_mm [B, pad_to], valid [B, pad_to] (n valid slices)."""
    slices = rng.normal(size=(batch, pad_to, CFG.d_visual)).astype(np.float32)
    z = np.broadcast_to(np.arange(pad_to, dtype=np.float32) * spacing, (batch, pad_to)).copy()
    valid = np.broadcast_to(np.arange(pad_to) < n, (batch, pad_to)).copy()
    return slices, z, valid


def zone_sets(n):
    """Reference zones from the paper's formula, written independently of the module."""
    zones = []
    for k in range(K):
        lo, hi = (k * n) // K, ((k + 1) * n) // K
        zones.append(set(range(lo, hi)) if hi > lo else {min(lo, n - 1)})
    return zones


# --------------------------------------------------------------------------------------- zones

@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100, 600])
def test_zone_mask_matches_the_paper_formula(n):
    pad = max(n, 64) + 3
    valid = jnp.asarray(np.arange(pad)[None] < n)
    mask = np.asarray(C.zone_mask(valid, K))[0]
    for k, zone in enumerate(zone_sets(n)):
        assert set(np.flatnonzero(mask[k])) == zone, k
    if n >= K:  # the zones tile the valid slices exactly, in order
        assert (mask.sum(axis=0)[:n] == 1).all() and not mask[:, n:].any()
        first = mask.argmax(axis=1)
        assert first[0] == 0 and (np.diff(first) > 0).all()


def test_zone_mask_excludes_padding_even_for_a_non_prefix_mask():
    valid = jnp.asarray([[True, False, True, True] + [False] * 4])
    mask = np.asarray(C.zone_mask(valid, 4))[0]
    assert not mask[:, 1].any() and not mask[:, 4:].any()


def test_sinusoidal_z_encoding_formula():
    z = jnp.asarray([[0.0, 1.25, 300.0]])
    pe = np.asarray(C.sinusoidal_z_encoding(z, 8, base=10000.0))
    w = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    want = np.zeros((3, 8))
    want[:, 0::2] = np.sin(np.asarray(z)[0, :, None] * w)
    want[:, 1::2] = np.cos(np.asarray(z)[0, :, None] * w)
    np.testing.assert_allclose(pe[0], want, atol=1e-5)


# --------------------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("n,pad", [(1, 64), (31, 64), (32, 64), (33, 64), (600, 600)])
def test_any_slice_count_gives_finite_tokens(params, n, pad):
    s, z, v = volume(np.random.default_rng(n), n, pad)
    out = np.asarray(forward(params, s, z, v))
    assert out.shape == (1, K, CFG.d_visual) and np.isfinite(out).all()


def test_empty_volume_stays_finite(params):
    s, z, v = volume(np.random.default_rng(0), 0, 64)
    assert np.isfinite(np.asarray(forward(params, s, z, v))).all()


@pytest.mark.parametrize("n", [20, 50])
def test_token_reads_only_its_zone(params, n):
    rng = np.random.default_rng(n)
    base, z, valid = volume(rng, n, 64)
    zones = zone_sets(n)
    # Row b: every slice outside zone b replaced by fresh noise; row K + b: one slice inside zone b changed.
    outside = np.repeat(base, 2 * K, axis=0)
    for b, zone in enumerate(zones):
        others = [i for i in range(64) if i not in zone]
        outside[b, others] = rng.normal(size=(len(others), CFG.d_visual))
        outside[K + b, min(zone)] += 1.0
    batch_z, batch_valid = np.repeat(z, 2 * K, 0), np.repeat(valid, 2 * K, 0)
    ref = np.asarray(zone_tokens(params, base, z, valid))[0]
    got = np.asarray(zone_tokens(params, outside, batch_z, batch_valid))
    for b in range(K):
        np.testing.assert_allclose(got[b, b], ref[b], atol=1e-6, err_msg=f"zone {b} saw slices outside it")
        assert np.abs(got[K + b, b] - ref[b]).max() > 1e-4, f"zone {b} ignored its own slice"


def test_output_does_not_depend_on_padding(params):
    rng = np.random.default_rng(1)
    s40, z40, v40 = volume(rng, 30, 40)
    s64 = np.concatenate([s40, rng.normal(size=(1, 24, CFG.d_visual))], axis=1).astype(np.float32)
    s64[:, 30:] = np.nan  # padding content must never reach the tokens, not even through 0 * NaN
    z64 = np.concatenate([z40, np.full((1, 24), 1e6, np.float32)], axis=1)
    v64 = np.arange(64)[None] < 30
    np.testing.assert_allclose(np.asarray(forward(params, s64, z64, v64)),
                               np.asarray(forward(params, s40, z40, v40)), atol=1e-6)


def test_z_encoding_is_relative_to_the_first_slice_and_changes_the_output(params):
    s, z, v = volume(np.random.default_rng(2), 40, 40)
    ref = np.asarray(forward(params, s, z, v))
    np.testing.assert_allclose(np.asarray(forward(params, s, z - 812.5, v)), ref, atol=1e-5)
    assert np.abs(np.asarray(forward(params, s, z * 2.0, v)) - ref).max() > 1e-4  # spacing matters


def test_zone_attention_weights_are_sown_and_respect_the_zones(params):
    s, z, v = volume(np.random.default_rng(3), 50, 64)
    _, state = sown_forward(params, s, z, v)
    (weights,) = state["intermediates"]["zone_attn"]["attention_weights"]
    weights = np.asarray(weights)
    assert weights.shape == (1, CFG.num_heads, K, 64)
    mask = np.asarray(C.zone_mask(jnp.asarray(v), K))[:, None]
    assert np.abs(weights[~np.broadcast_to(mask, weights.shape)]).max() == 0.0
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_without_the_zone_constraint_every_query_reads_every_valid_slice(params):
    """The Table XI ablation: the mask is all valid slices for every query, nothing else changes."""
    s, z, v = volume(np.random.default_rng(3), 50, 64)
    mask = np.asarray(C.zone_mask(jnp.asarray(v), K, constrained=False))
    np.testing.assert_array_equal(mask, np.broadcast_to(v[:, None, :], (1, K, 64)))
    free = C.ZoneCompressor(C.CompressorConfig(**{**CFG.__dict__, "zone_constraint": False}))
    _, state = jax.jit(lambda p: free.apply({"params": p}, s, z, v, mutable=["intermediates"]))(params)
    (weights,) = state["intermediates"]["zone_attn"]["attention_weights"]
    weights = np.asarray(weights)
    assert np.abs(weights[..., 50:]).max() == 0.0                      # padding still never read
    assert (weights[..., :50] > 0).all()                               # every query reads every valid slice
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.abs(np.asarray(free.apply({"params": params}, s, z, v)) - np.asarray(forward(params, s, z, v))).max() > 1e-4


def test_dropout_is_active_only_in_training(params):
    s, z, v = volume(np.random.default_rng(4), 40, 40)
    eval_out = forward(params, s, z, v)
    train = [train_forward(params, s, z, v, jax.random.PRNGKey(i)) for i in range(2)]
    assert np.abs(np.asarray(train[0] - eval_out)).max() > 1e-3
    assert np.abs(np.asarray(train[0] - train[1])).max() > 1e-3


def test_bad_shapes_fail_with_a_clear_message(params):
    with pytest.raises(ValueError, match="d_visual"):
        MODEL.apply({"params": params}, jnp.zeros((1, 4, 16)), jnp.zeros((1, 4)), jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="z_mm"):
        MODEL.apply({"params": params}, jnp.zeros((1, 4, 32)), jnp.zeros((1, 5)), jnp.ones((1, 4), bool))


def test_sizes_that_cannot_work_are_a_model_config_error_naming_the_flag():
    """d_visual is --config.model.d_visual (the slice width, data.embed_dim): a value the heads do not
    divide, odd (the sin/cos z encoding) or not positive is the user's, one line at the entry points."""
    for d_visual, heads in ((30, 4), (0, 4), (-8, 4), (9, 3)):     # 9: 3 heads divide it, but odd
        with pytest.raises(ModelConfigError, match=f"--config.model.d_visual={d_visual}: the compressor's {heads} heads"):
            C.CompressorConfig(d_visual=d_visual, num_heads=heads)
    assert C.CompressorConfig(d_visual=48, num_heads=16).head_dim == 3     # an odd head dim is fine
    with pytest.raises(ModelConfigError, match="--config.model.num_visual_tokens=0"):
        C.CompressorConfig(d_visual=32, num_heads=4, num_zones=0)


# --------------------------------------------------------------------------------------- params

def test_every_weight_has_logical_axes_and_shards_on_a_mesh(variables):
    boxed = variables["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert boxed["queries"].names == ("zones", "visual_embed")
    assert boxed["zone_attn"]["q_proj"]["kernel"].names == ("visual_embed", "heads", "head_dim")
    shardings = named_shardings(boxed, make_mesh(data=2, fsdp=2, tensor=2))
    assert len(jax.tree.leaves(shardings)) == len(leaves)


def test_svd_init_queries():
    rng = np.random.default_rng(5)
    mean = rng.normal(size=64) * 3.0
    sample = (mean + rng.normal(size=(500, 64)) * np.linspace(2.0, 0.1, 64)).astype(np.float32)
    q = C.svd_init_queries(sample, 32)
    assert q.shape == (32, 64) and q.dtype == np.float32
    norms = np.linalg.norm(q, axis=1)
    np.testing.assert_allclose(norms, np.median(np.linalg.norm(sample, axis=1)), rtol=1e-5)
    gram = (q / norms[:, None]) @ (q / norms[:, None]).T
    np.testing.assert_allclose(gram, np.eye(32), atol=1e-5)
    cos_to_mean = q[0] @ mean / (norms[0] * np.linalg.norm(mean))
    assert cos_to_mean > 0.95  # the leading query points along the data, sign fixed
    with pytest.raises(ValueError, match="M >= 32"):
        C.svd_init_queries(sample[:10], 32)


# --------------------------------------------------------------------------------------- PyTorch parity

class TorchCompressor(torch.nn.Module):
    """The compressor written directly in PyTorch, as a reference released weights would come from."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.region_queries = torch.nn.Parameter(torch.randn(cfg.num_zones, cfg.d_visual))
        self.zone_attn = torch.nn.MultiheadAttention(cfg.d_visual, cfg.num_heads, dropout=cfg.dropout,
                                                     batch_first=True)
        self.global_layer = torch.nn.TransformerEncoderLayer(cfg.d_visual, cfg.num_heads, cfg.ffn_dim,
                                                             cfg.dropout, batch_first=True)
        with torch.no_grad():  # non-zero biases so the mapping of every tensor is exercised
            for p in self.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, slices, z_mm, valid):
        cfg = self.cfg
        z = torch.where(valid, z_mm - z_mm[:, :1], torch.zeros_like(z_mm)).double()
        freqs = torch.exp(torch.arange(0, cfg.d_visual, 2).double() * (-np.log(cfg.pe_base) / cfg.d_visual))
        pe = torch.zeros(*z.shape, cfg.d_visual, dtype=torch.float64)
        pe[..., 0::2] = torch.sin(z[..., None] * freqs)
        pe[..., 1::2] = torch.cos(z[..., None] * freqs)
        keys = torch.where(valid[..., None], slices + pe.float(), torch.zeros_like(slices))
        allowed = torch.zeros(slices.shape[0], cfg.num_zones, slices.shape[1], dtype=torch.bool)
        for b, n in enumerate(valid.sum(1).tolist()):
            for k, zone in enumerate(zone_sets(n)):
                allowed[b, k, sorted(zone)] = True
        blocked = (~allowed).repeat_interleave(cfg.num_heads, dim=0)  # [B*H, K, N], True = may not attend
        queries = self.region_queries.expand(slices.shape[0], -1, -1)
        tokens, _ = self.zone_attn(queries, keys, keys, attn_mask=blocked, need_weights=False)
        return tokens, self.global_layer(tokens)


@pytest.fixture(scope="module")
def torch_reference():
    torch.manual_seed(0)
    return TorchCompressor(CFG).eval()


def test_full_forward_equals_pytorch_on_the_same_weights(torch_reference):
    params = C.torch_state_dict_to_params(torch_reference.state_dict(), CFG)
    rng = np.random.default_rng(6)
    s, z, v = volume(rng, 64, 64, batch=3)
    v[0, 20:], v[1, 50:] = False, False   # three volumes: n = 20, 50, 64
    z = z + rng.normal(size=(3, 1)).astype(np.float32) * 100.0
    with torch.no_grad():
        want_tokens, want = torch_reference(torch.from_numpy(s), torch.from_numpy(z), torch.from_numpy(v))
    got_tokens = np.asarray(zone_tokens(params, s, z, v))
    np.testing.assert_allclose(got_tokens, want_tokens.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(forward(params, s, z, v)), want.numpy(), atol=1e-5)


def test_encoder_layer_equals_torch_transformer_encoder_layer(torch_reference):
    layer = torch_reference.global_layer
    params = C.torch_encoder_layer_to_params(layer.state_dict(), "", CFG)
    x = np.random.default_rng(7).normal(size=(2, K, CFG.d_visual)).astype(np.float32) * 3.0
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    got = jax.jit(C.TransformerEncoderLayer(CFG).apply)({"params": params}, x)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_state_dict_mapping_fails_loudly(torch_reference):
    sd = dict(torch_reference.state_dict())
    del sd["global_layer.norm2.bias"]
    with pytest.raises(ValueError, match="global_layer.norm2.bias"):
        C.torch_state_dict_to_params(sd, CFG)
    sd = dict(torch_reference.state_dict())
    sd["zone_attn.bias_k"] = torch.zeros(1, 1, CFG.d_visual)
    with pytest.raises(ValueError, match="unexpected"):
        C.torch_state_dict_to_params(sd, CFG)
    with pytest.raises(ValueError, match="shape"):
        C.torch_state_dict_to_params(torch_reference.state_dict(), C.CompressorConfig(
            d_visual=32, num_zones=K, num_heads=4, ffn_dim=128))


# --------------------------------------------------------------------------------------- scale

def test_paper_sizes_on_abstract_shapes():
    """The 3B preset (d_v=1024, K=32, 16 heads, N=600) traced without weights."""
    cfg = C.CompressorConfig()
    model = C.ZoneCompressor(cfg)
    args = (jax.ShapeDtypeStruct((2, 600, 1024), jnp.float32), jax.ShapeDtypeStruct((2, 600), jnp.float32),
            jax.ShapeDtypeStruct((2, 600), jnp.bool_))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    out = jax.eval_shape(model.apply, variables, *args)
    assert out.shape == (2, 32, 1024)
    params = nn.unbox(variables)["params"]
    mha = 4 * (1024 * 1024 + 1024)
    ffn = 2 * 1024 * 2048 + 2048 + 1024
    want = 32 * 1024 + mha + (mha + ffn + 4 * 1024)
    assert sum(x.size for x in jax.tree.leaves(params)) == want
    assert params["zone_attn"]["q_proj"]["kernel"].shape == (1024, 16, 64)


def test_sharded_forward_matches_single_device(params):
    from kervljepa_jax.sharding import use_mesh
    s, z, v = volume(np.random.default_rng(8), 64, 64, batch=4)
    v[1, 30:] = False
    want = np.asarray(forward(params, s, z, v))
    with use_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        got = np.asarray(jax.jit(lambda p, s, z, v: MODEL.apply({"params": p}, s, z, v))(params, s, z, v))
    np.testing.assert_allclose(got, want, atol=1e-5)
