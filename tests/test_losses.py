"""Each loss against an independent reference: torch where torch has it, numpy loops otherwise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from kervljepa_jax import losses
from kervljepa_jax.sharding import make_mesh

RNG = np.random.default_rng(0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- BCE / MIL


def test_pos_weight_from_labels_ratio_cap_and_empty_class():
    labels = np.zeros((40, 4), np.float32)
    labels[:10, 0] = 1   # 10 pos / 30 neg -> 3
    labels[:2, 1] = 1    # 2 pos / 38 neg -> 19 -> capped at 10
    labels[:, 3] = 1     # all positive -> 0 / 40 = 0
    # class 2 has no positive -> 10
    w = np.asarray(losses.pos_weight_from_labels(labels))
    np.testing.assert_allclose(w, [3.0, 10.0, 10.0, 0.0])


def test_pos_weight_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        losses.pos_weight_from_labels(np.zeros(5))


def test_bce_matches_torch_with_pos_weight():
    logits = RNG.normal(scale=4.0, size=(16, 18)).astype(np.float32)
    labels = (RNG.random((16, 18)) < 0.3).astype(np.float32)
    pw = losses.pos_weight_from_labels(labels)
    ours = losses.bce_with_logits(logits, labels, pw)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(np.asarray(pw)))(
        torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6)
    ref_plain = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(float(losses.bce_with_logits(logits, labels)), ref_plain.item(), rtol=1e-6)


def test_bce_is_finite_for_extreme_logits():
    logits = jnp.array([[-200.0, 200.0]])
    labels = jnp.array([[1.0, 0.0]])
    value, grad = jax.value_and_grad(losses.bce_with_logits)(logits, labels)
    np.testing.assert_allclose(float(value), 200.0, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_llm_visual_cls_loss_is_bce():
    logits = RNG.normal(size=(4, 18)).astype(np.float32)
    labels = (RNG.random((4, 18)) < 0.2).astype(np.float32)
    ref = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(float(losses.llm_visual_cls_loss(logits, labels)), ref.item(), rtol=1e-6)


# ----------------------------------------------------------------------------- focal


def test_focal_matches_hand_computation():
    logits = RNG.normal(scale=3.0, size=(6, 18)).astype(np.float64)
    labels = (RNG.random((6, 18)) < 0.3).astype(np.float64)
    p = _sigmoid(logits)
    expected = 0.0
    for x_p, y in zip(p.ravel(), labels.ravel()):
        p_t = x_p if y == 1 else 1.0 - x_p
        expected += -((1.0 - p_t) ** 2) * math.log(p_t)
    expected /= logits.size
    ours = losses.focal_loss(logits.astype(np.float32), labels.astype(np.float32), gamma=2.0)
    np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
    # gamma 0 is plain BCE
    np.testing.assert_allclose(float(losses.focal_loss(logits, labels, gamma=0.0)),
                               float(losses.bce_with_logits(logits, labels)), rtol=1e-6)


# ----------------------------------------------------------------------------- orthogonality


def test_orthogonality_matches_loop_and_bounds():
    tokens = RNG.normal(size=(3, 6, 5)).astype(np.float64)
    expected = []
    for sample in tokens:
        unit = sample / np.linalg.norm(sample, axis=-1, keepdims=True)
        total = 0.0
        for i in range(6):
            for j in range(6):
                if i != j:
                    total += float(unit[i] @ unit[j]) ** 2
        expected.append(total / (6 * 5))
    np.testing.assert_allclose(float(losses.orthogonality_loss(tokens.astype(np.float32))),
                               np.mean(expected), rtol=1e-5)
    eye = np.eye(4, dtype=np.float32)[None] * 3.0
    assert float(losses.orthogonality_loss(eye)) == pytest.approx(0.0, abs=1e-7)
    parallel = np.ones((2, 4, 3), np.float32)
    assert float(losses.orthogonality_loss(parallel)) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- MMD


def _mmd_reference(visual, text, mask, alpha):
    def k(x, y):
        return (1.0 + alpha * np.sum((x - y) ** 2)) ** -0.5
    values = []
    for v, t, m in zip(visual, text, mask):
        t = t[m.astype(bool)]
        if len(t) == 0:
            continue
        vv = np.mean([k(a, b) for a in v for b in v])
        vt = np.mean([k(a, b) for a in v for b in t])
        tt = np.mean([k(a, b) for a in t for b in t])
        values.append(vv - 2 * vt + tt)
    return float(np.mean(values)) if values else 0.0


def test_imq_alpha_is_papers():
    assert losses.imq_alpha(5.0, 256) == pytest.approx(20.0 / 509.0)
    assert round(losses.imq_alpha(5.0, 256), 3) == 0.039


def test_mmd_matches_pairwise_loops_with_padding_and_normals():
    b, n, kmax, d = 4, 8, 5, 16
    visual = RNG.normal(size=(b, n, d))
    text = RNG.normal(size=(b, kmax, d)) + 0.5
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    text_padded = np.where(mask[..., None] > 0, text, 1e3)  # padding garbage must not leak in
    alpha = losses.imq_alpha(5.0, d)
    ours = losses.mmd_imq_loss(visual.astype(np.float32), text_padded.astype(np.float32), mask)
    np.testing.assert_allclose(float(ours), _mmd_reference(visual, text, mask, alpha), rtol=1e-4)
    assert float(ours) > 0


def test_mmd_is_zero_when_distributions_match():
    v = RNG.normal(size=(2, 4, 8)).astype(np.float32)
    ours = losses.mmd_imq_loss(v, v, np.ones((2, 4)))
    assert float(ours) == pytest.approx(0.0, abs=1e-6)


def test_mmd_all_normal_batch_is_zero_with_finite_grads():
    visual = jnp.asarray(RNG.normal(size=(3, 32, 256)), jnp.float32)
    text = jnp.zeros((3, 4, 256))
    mask = jnp.zeros((3, 4))
    value, (g_v, g_t) = jax.value_and_grad(losses.mmd_imq_loss, argnums=(0, 1))(visual, text, mask)
    assert float(value) == 0.0
    assert np.all(np.asarray(g_v) == 0) and np.all(np.isfinite(np.asarray(g_t)))
    # identical tokens (zero distances) still give finite gradients
    same = jnp.ones((1, 32, 256))
    grads = jax.grad(losses.mmd_imq_loss, argnums=(0, 1))(same, jnp.ones((1, 2, 256)), jnp.ones((1, 2)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_mmd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="text_mask"):
        losses.mmd_imq_loss(jnp.zeros((2, 32, 8)), jnp.zeros((2, 3, 8)), jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------- InfoNCE


def _info_nce_torch(v, t, tau, symmetric):
    v = torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.tensor(t, dtype=torch.float64), dim=-1)
    logits = v @ t.T / tau
    target = torch.arange(len(v))
    loss = torch.nn.functional.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + torch.nn.functional.cross_entropy(logits.T, target))
    return loss.item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_torch(symmetric):
    v = RNG.normal(size=(12, 32)).astype(np.float32)
    t = (v + RNG.normal(scale=1.5, size=(12, 32))).astype(np.float32)
    log_tau = losses.init_log_temperature()
    ours = losses.info_nce_loss(v, t, log_tau, symmetric=symmetric)
    np.testing.assert_allclose(float(ours), _info_nce_torch(v, t, 0.10, symmetric), rtol=1e-5)


def test_temperature_init_and_clamp():
    assert float(losses.temperature(losses.init_log_temperature())) == pytest.approx(0.10)
    assert float(losses.temperature(jnp.log(1e-4))) == pytest.approx(0.01)
    assert float(losses.temperature(jnp.log(5.0))) == pytest.approx(1.0)
    v = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
    g_inside = jax.grad(losses.info_nce_loss, argnums=2)(v, v[::-1], jnp.log(0.2))
    g_clamped = jax.grad(losses.info_nce_loss, argnums=2)(v, v[::-1], jnp.log(1e-4))
    assert float(g_inside) != 0.0 and float(g_clamped) == 0.0


def test_info_nce_negatives_come_from_every_device():
    """Jitted on a batch sharded over 8 devices, the loss equals the single-device full-batch
    loss (512-way style negatives), and differs from averaging 8 device-local losses."""
    mesh = make_mesh(data=8)
    per_device, dim = 4, 16
    batch = 8 * per_device
    v = RNG.normal(size=(batch, dim)).astype(np.float32)
    t = (v + RNG.normal(scale=2.0, size=(batch, dim))).astype(np.float32)
    log_tau = losses.init_log_temperature()

    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    v_sharded, t_sharded = jax.device_put(v, sharding), jax.device_put(t, sharding)
    assert len(v_sharded.addressable_shards) == 8
    assert v_sharded.addressable_shards[0].data.shape == (per_device, dim)
    sharded_loss, sharded_grad = jax.jit(jax.value_and_grad(losses.info_nce_loss))(v_sharded, t_sharded, log_tau)

    full_loss = losses.info_nce_loss(jnp.asarray(v), jnp.asarray(t), log_tau)
    local_losses = [losses.info_nce_loss(v[i:i + per_device], t[i:i + per_device], log_tau)
                    for i in range(0, batch, per_device)]
    np.testing.assert_allclose(float(sharded_loss), float(full_loss), rtol=1e-6)
    full_grad = jax.grad(losses.info_nce_loss)(jnp.asarray(v), jnp.asarray(t), log_tau)
    np.testing.assert_allclose(np.asarray(sharded_grad), np.asarray(full_grad), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(full_loss), _info_nce_torch(v, t, 0.10, False), rtol=1e-5)
    # More negatives make the task harder: the global loss is larger than the local average.
    assert float(sharded_loss) > float(np.mean(local_losses)) + 0.1


# ----------------------------------------------------------------------------- LM


def test_lm_loss_matches_torch_cross_entropy_on_masked_targets():
    b, t, v = 3, 10, 50
    logits = RNG.normal(scale=2.0, size=(b, t, v)).astype(np.float32)
    tokens = RNG.integers(0, v, size=(b, t))
    mask = np.zeros((b, t), np.int32)
    mask[0, 4:] = 1          # assistant answer after a 4-token prompt
    mask[1, 7:9] = 1
    mask[2, 0] = 1           # position 0 can never be a target: ignored
    ours = losses.lm_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    # HF convention: labels = tokens with -100 outside the mask, shift by one.
    labels = torch.tensor(np.where(mask > 0, tokens, -100))
    logits_t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.CrossEntropyLoss(ignore_index=-100)(
        logits_t[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1))
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6)
    ref.backward()
    grad = jax.grad(losses.lm_loss)(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(grad), logits_t.grad.numpy(), rtol=1e-5, atol=1e-7)
    bf16 = losses.lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(float(bf16), ref.item(), rtol=2e-2)
    # Hand check of the shift: position 7's target is predicted from logits at 6.
    only = np.zeros_like(mask)
    only[1, 7] = 1
    log_p = logits[1, 6] - np.log(np.sum(np.exp(logits[1, 6])))
    np.testing.assert_allclose(float(losses.lm_loss(logits, tokens, only)), -log_p[tokens[1, 7]], rtol=1e-5)


def test_lm_loss_empty_mask_is_zero():
    assert float(losses.lm_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4)))) == 0.0


def _hidden_case(b=3, t=11, d=6, v=40):
    hidden = jnp.asarray(RNG.normal(size=(b, t, d)).astype(np.float32))
    head = jnp.asarray(RNG.normal(size=(d, v)).astype(np.float32))
    tokens = jnp.asarray(RNG.integers(0, v, size=(b, t)))
    mask = np.zeros((b, t), np.int32)
    mask[0, 3:9] = 1
    mask[1, [2, 5, 6, 10]] = 1    # holes: targets need not be contiguous
    return hidden, head, tokens, jnp.asarray(mask)       # row 2: no target at all


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])
def test_lm_loss_from_hidden_equals_lm_loss_on_full_logits(chunk):
    hidden, head, tokens, mask = _hidden_case()
    full = lambda h, w: losses.lm_loss(h @ w, tokens, mask)  # noqa: E731
    chunked = lambda h, w: losses.lm_loss_from_hidden(h, tokens, mask, lambda x: x @ w, chunk)  # noqa: E731
    np.testing.assert_allclose(float(chunked(hidden, head)), float(full(hidden, head)), rtol=1e-6)
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, head), jax.grad(full, (0, 1))(hidden, head)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    assert float(losses.lm_loss_from_hidden(hidden, tokens, jnp.zeros_like(mask), lambda x: x @ head, chunk)) == 0.0


def test_lm_loss_from_hidden_runs_the_head_only_on_chunks_with_targets():
    hidden, head, tokens, mask = _hidden_case()
    calls = []

    def head_fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x @ head
    # targets per row after the shift: 6, 4, 0 -> sorted to the front, chunks of 2: 3 of 6 run.
    jax.block_until_ready(jax.jit(lambda h: losses.lm_loss_from_hidden(h, tokens, mask, head_fn, 2))(hidden))
    assert len(calls) == 3
    with pytest.raises(ValueError, match="lm_loss_from_hidden"):
        losses.lm_loss_from_hidden(hidden[0], tokens, mask, head_fn)


# ----------------------------------------------------------------------------- JEPA


def test_jepa_loss_is_per_dimension_mse():
    z = RNG.normal(size=(5, 256)).astype(np.float32)
    target = RNG.normal(size=(5, 256)).astype(np.float32)
    ref = torch.nn.functional.mse_loss(torch.tensor(z), torch.tensor(target))
    np.testing.assert_allclose(float(losses.jepa_loss(z, target)), ref.item(), rtol=1e-6)
    # Predicting the mean of a whitened (unit-variance) target scores about 1.
    assert float(losses.jepa_loss(np.zeros_like(target), target)) == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------------- EWC


def _lora_like_tree(rng):
    return {"layers": {"q_proj": {"lora_a": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
                                  "lora_b": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}},
            "o_proj": {"lora_a": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}


def test_ewc_penalty_matches_hand_sum():
    rng = np.random.default_rng(1)
    params, anchor = _lora_like_tree(rng), _lora_like_tree(rng)
    expected = 100.0 * sum(float(np.sum((np.asarray(p) - np.asarray(a)) ** 2))
                           for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
    np.testing.assert_allclose(float(losses.ewc_penalty(params, anchor, lam=100.0)), expected, rtol=1e-6)
    assert float(losses.ewc_penalty(params, params)) == 0.0


def test_ewc_gradient_transformation_adds_grad_of_penalty():
    rng = np.random.default_rng(2)
    anchor, params = _lora_like_tree(rng), _lora_like_tree(rng)
    grads = _lora_like_tree(rng)
    tx = losses.ewc_gradient(anchor, lam=100.0)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    penalty_grad = jax.grad(losses.ewc_penalty)(params, anchor, 100.0)
    added = jax.tree.map(lambda u, g: u - g, updates, grads)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-4),
                 added, penalty_grad)
    with pytest.raises(ValueError, match="without params"):
        tx.update(grads, state)


def test_ewc_gradient_captures_anchor_at_init_and_pulls_back():
    rng = np.random.default_rng(3)
    p3 = _lora_like_tree(rng)
    tx = optax.chain(losses.ewc_gradient(lam=100.0), optax.sgd(1e-3))
    state = tx.init(p3)
    drifted = jax.tree.map(lambda x: x + 1.0, p3)
    zero_grads = jax.tree.map(jnp.zeros_like, p3)
    updates, _ = jax.jit(tx.update)(zero_grads, state, drifted)
    # sgd: -lr * 2 * lam * (theta - theta_P3) = -1e-3 * 200 * 1 = -0.2 everywhere
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(u), -0.2, rtol=1e-5)


def test_ewc_gradient_inside_multi_transform_touches_only_lora():
    rng = np.random.default_rng(4)
    params = {"lora": _lora_like_tree(rng), "xattn": {"w": jnp.ones((3, 3))}}
    labels = {"lora": jax.tree.map(lambda _: "lora", params["lora"]), "xattn": {"w": "frozen"}}
    tx = optax.multi_transform({"lora": optax.chain(losses.ewc_gradient(lam=1.0), optax.sgd(1.0)),
                                "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)
    moved = jax.tree.map(lambda x: x + 0.5, params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, moved)
    for u in jax.tree.leaves(updates["lora"]):
        np.testing.assert_allclose(np.asarray(u), -1.0, rtol=1e-6)  # -lr * 2 * 1 * 0.5
    np.testing.assert_array_equal(np.asarray(updates["xattn"]["w"]), 0.0)
