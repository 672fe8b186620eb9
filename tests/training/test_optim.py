"""The phase optimizer: freezing without state, EWC == its loss term, the projectors' trust ratio, lr_mult, schedule,
ReduceLROnPlateau (against torch), non-finite skipping, the LoRA-freeze state transfer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kervljepa_jax import losses
from kervljepa_jax.model.lora import LORA_PATTERN
from kervljepa_jax.model.xattn import XATTN_GATE_PATTERN
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import optim, phases
from tests.training import toy_params

STEPS_PER_EPOCH = 10


def _config(phase, **train):
    c = config_lib.load_phase_config(phase)
    c.train.update({**dict(warmup_steps=0, grad_clip=0.0, lr=1e-2, schedule="constant"), **train})
    if phase == 3:     # the paper's LoRA freeze (the embedded default trains LoRA throughout): the freeze tests' subject
        c.optimizer_groups = phases.update_groups(c.optimizer_groups, {LORA_PATTERN: dict(freeze_after_epoch=6)})
    return c


def _grads(params, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)     # numpy: one jax.random call per shape would compile each
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), params)


def _by_path(tree):
    return dict(zip(phases.leaf_paths(tree), jax.tree.leaves(tree)))


def _elements(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def params():
    return toy_params()


@pytest.fixture(scope="module")
def phase3(params):
    c = _config(3)
    labels = phases.trainable_labels(params, c.optimizer_groups, c.phase)
    tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
    return c, labels, tx, jax.jit(tx.update)     # one jitted update for the module: compile once per tree shape


def test_optimizer_groups(params, phase3):
    c, labels, _, _ = phase3
    groups = _by_path(optim.optimizer_labels(params, labels, c.optimizer_groups))
    rows = {row["pattern"]: str(i) for i, row in enumerate(c.optimizer_groups)}    # first match wins:
    assert groups["xattn_1/gate"] == rows[XATTN_GATE_PATTERN]          # the gate row, not xattn's
    assert groups["xattn_1/q_proj/kernel"] == rows[r"(^|.*/)xattn_\d+/.*"]
    assert groups["llm/model/layers_0_1/self_attn/q_proj/lora_A"] == rows[LORA_PATTERN]
    assert groups["projector_1/kernel"] == rows[r"(^|.*/)projector_\d+/.*"]
    assert groups["llm/model/layers_0_1/self_attn/q_proj/kernel"] == optim.FROZEN
    assert groups["compressor/queries"] == optim.FROZEN


def test_frozen_leaves_get_zero_updates_and_no_state(params, phase3):
    _, labels, tx, update = phase3
    state = tx.init(params)
    trainable_elems = sum(int(np.size(x)) for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                          if label == phases.TRAINABLE)
    frozen_elems = _elements(params) - trainable_elems
    # Adam's two moments per trainable element, plus a few scalars (counts, lr, lr_scale, flags).
    assert 2 * trainable_elems <= _elements(state) < 2 * trainable_elems + 32
    assert frozen_elems > 1000            # so a frozen moment would have shown up above
    updates, _ = update(_grads(params), state, params)
    for path, u in _by_path(updates).items():
        label = _by_path(labels)[path]
        assert (label == phases.FROZEN) == (not np.any(np.asarray(u))), path
    # The split half gives the same state layout and the same updates, without frozen leaves at all.
    trainable, _ = phases.split_params(params, labels)
    state_t = tx.init(trainable)
    assert jax.tree.structure(state_t) == jax.tree.structure(state)
    grads_t, _ = phases.split_params(_grads(params), labels)
    updates_t, _ = update(grads_t, state_t, trainable)
    assert len(jax.tree.leaves(updates_t)) == len(jax.tree.leaves(trainable))
    for path, u in _by_path(updates_t).items():
        np.testing.assert_allclose(u, _by_path(updates)[path], rtol=1e-6, atol=1e-12)


def test_ewc_transform_is_the_gradient_of_the_penalty(params):
    lora = {p: x for p, x in _by_path(params).items() if p.endswith(("lora_A", "lora_B"))}
    anchor = jax.tree.map(lambda x: x + 0.3, lora)
    moved = jax.tree.map(lambda x: x - 0.1 * jnp.sign(x), lora)
    ewc = losses.ewc_gradient(anchor, lam=100.0)
    update, _ = ewc.update(jax.tree.map(jnp.zeros_like, moved), ewc.init(moved), moved)
    expected = jax.grad(lambda p: losses.ewc_penalty(p, anchor, lam=100.0))(moved)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), update, expected)


def test_phase4_optimizer_equals_adamw_on_loss_plus_ewc(params):
    """EWC in the optimizer == adamw on grad(loss + lam * sum (theta - theta_P3)^2) (anchor at init)."""
    c = _config(4, lr=1e-2, weight_decay=0.0)
    labels = phases.trainable_labels(params, c.optimizer_groups, c.phase)
    tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
    trainable, _ = phases.split_params(params, labels)
    lora = {p: x for p, x in _by_path(params).items() if p.endswith(("lora_A", "lora_B"))}
    ref = optax.adam(1e-2)
    ref_state, ref_params = ref.init(lora), lora
    state = tx.init(trainable)
    # The anchor is optimizer state: 3 copies of the LoRA (mu, nu, anchor) and no more.
    assert 3 * _elements(lora) <= _elements(state) < 3 * _elements(lora) + 32
    update = jax.jit(tx.update)
    for step in range(3):
        grads = phases.split_params(_grads(params, seed=step), labels)[0]
        updates, state = update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        pull = jax.grad(lambda p: losses.ewc_penalty(p, lora, lam=100.0))(ref_params)
        ref_grads = jax.tree.map(jnp.add, {p: g for p, g in _by_path(grads).items()}, pull)
        ref_updates, ref_state = ref.update(ref_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    got = _by_path(trainable)
    assert set(got) == set(lora)
    assert any(np.abs(ref_params[p] - lora[p]).max() > 1e-3 for p in lora)   # they did move
    for p in lora:
        np.testing.assert_allclose(got[p], ref_params[p], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_scale, expect", [(1e-6, 30.0), (1e3, 1.0), (None, None)])
def test_projector_trust_ratio_is_clipped_norm_ratio(params, grad_scale, expect):
    c = _config(3, weight_decay=0.0)
    labels = phases.trainable_labels(params, [r"projector_1/.*"], c.phase)
    trainable, _ = phases.split_params(params, labels)
    tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
    grads = phases.split_params(_grads(params, scale=grad_scale or 0.2), labels)[0]
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    adam_updates, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(trainable), trainable)
    for path in ("projector_1/kernel", "projector_1/bias"):
        w, g = _by_path(trainable)[path], _by_path(grads)[path]
        ratio = float(np.clip(np.linalg.norm(w) / np.linalg.norm(g), 1.0, 30.0))
        if expect is not None:
            assert ratio == pytest.approx(expect)
        np.testing.assert_allclose(_by_path(updates)[path], ratio * _by_path(adam_updates)[path], rtol=1e-5)


def test_schedules():
    c = _config(1, lr=1.0, schedule="cosine", warmup_steps=5, final_lr_fraction=0.1, epochs=2)
    s = optim.make_schedule(c.train, STEPS_PER_EPOCH)                 # 20 steps
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(1.0) and float(s(20)) == pytest.approx(0.1)
    c.train.max_steps = 10                                              # the cap shortens the decay
    assert float(optim.make_schedule(c.train, STEPS_PER_EPOCH)(10)) == pytest.approx(0.1)
    c = _config(3, lr=2.0, warmup_steps=4)
    s = optim.make_schedule(c.train, STEPS_PER_EPOCH)
    assert [float(s(i)) for i in (0, 2, 4, 400)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    c.train.schedule = "linear"
    with pytest.raises(ValueError, match="train.schedule='linear'"):
        optim.make_schedule(c.train, STEPS_PER_EPOCH)


def test_plateau_halves_after_patience_without_recompiling(params, phase3):
    _, labels, tx, update = phase3
    plateau = optim.ReduceLROnPlateau(patience=3, factor=0.5, mode="max")
    reduced = [plateau.step(f1) for f1 in (0.30, 0.40, 0.40, 0.39, 0.40, 0.38)]
    assert reduced == [False, False, False, False, False, True] and plateau.scale == 0.5
    grads = _grads(params)
    _, state = update(grads, tx.init(params), params)       # as in a loop: the state a step returned
    compiled = update._cache_size()
    before, _ = update(grads, state, params)
    halved, _ = update(grads, plateau.apply(state), params)
    assert update._cache_size() == compiled                  # a new lr scale is a new value, not a new program
    assert optim.lr_scale(plateau.apply(state)) == 0.5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 0.5 * a, rtol=1e-6), before, halved)
    restored = optim.ReduceLROnPlateau()
    restored.load_state_dict(plateau.state_dict())
    assert restored.state_dict() == plateau.state_dict()


def test_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    metrics = np.concatenate([np.linspace(0.1, 0.5, 5), 0.5 + 0.001 * rng.normal(size=25), np.full(10, 0.2)])
    for mode in ("max", "min"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, patience=3, factor=0.5)
        ours = optim.ReduceLROnPlateau(patience=3, factor=0.5, mode=mode)
        for m in metrics:
            ref.step(float(m))
            ours.step(float(m))
            assert ours.scale == pytest.approx(opt.param_groups[0]["lr"]), mode


def test_early_stopping():
    stop = optim.EarlyStopping(patience=2, mode="min")
    assert [stop.step(v) for v in (1.0, 0.9, 0.95, 0.9)] == [False, False, False, True]
    assert not any(optim.EarlyStopping(patience=0).step(v) for v in (1.0, 2.0, 3.0, 4.0))


def test_nonfinite_step_is_skipped_and_counted(params, phase3):
    _, labels, tx, update = phase3
    trainable, _ = phases.split_params(params, labels)
    state = tx.init(trainable)
    grads = phases.split_params(_grads(params), labels)[0]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan) if g.ndim else jnp.nan * g, grads)
    updates, state = update(bad, state, trainable)
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    assert optim.skipped_steps(state) == 1
    updates, state = update(grads, state, trainable)
    assert optim.skipped_steps(state) == 1 and any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    assert optim.learning_rate(state) == pytest.approx(1e-2)


def test_lora_freeze_keeps_the_other_groups_state(params, phase3):
    c, labels, tx, update = phase3
    trainable, _ = phases.split_params(params, labels)
    state = tx.init(trainable)
    for step in range(2):
        updates, state = update(phases.split_params(_grads(params, seed=step), labels)[0], state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    state = optim.set_lr_scale(state, 0.25)
    frozen_labels = phases.freeze_scheduled(labels, c.optimizer_groups)
    new_tx = optim.make_optimizer(c, params, frozen_labels, STEPS_PER_EPOCH)
    new_trainable, _ = phases.split_params(phases.merge_params(trainable, phases.split_params(params, labels)[1]),
                                           frozen_labels)
    new_state = optim.transfer_state(state, new_tx, new_trainable)
    old_groups = state.inner_state[1].inner_state.inner_states
    new_groups = new_state.inner_state[1].inner_state.inner_states
    lora_row = str([row["pattern"] for row in c.optimizer_groups].index(LORA_PATTERN))
    assert lora_row in old_groups and lora_row not in new_groups
    assert len(new_groups) == len(old_groups) - 1 >= 3
    for group in new_groups:
        jax.tree.map(np.testing.assert_array_equal, new_groups[group], old_groups[group])
    assert optim.lr_scale(new_state) == 0.25 and int(new_state.inner_state[1].count) == 2
    lora_elems = sum(int(np.size(x)) for p, x in _by_path(params).items() if p.endswith(("lora_A", "lora_B")))
    assert _elements(state) - _elements(new_state) == 2 * lora_elems + 1     # LoRA's moments and Adam count
    updates, _ = new_tx.update(phases.split_params(_grads(params), frozen_labels)[0], new_state, new_trainable)
    assert not any(p.endswith(("lora_A", "lora_B")) for p in _by_path(updates))


def test_lora_freeze_continues_the_lr_schedule(params):
    """The freeze rebuilds the optimizer mid-phase; its warmup and decay must go on from the step
    reached, not start again (optax keeps a schedule's count apart from the state's `count`)."""
    c = _config(3, schedule="cosine", warmup_steps=2, epochs=4)
    schedule = optim.make_schedule(c.train, STEPS_PER_EPOCH)
    labels = phases.trainable_labels(params, c.optimizer_groups, c.phase)
    tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
    trainable, frozen = phases.split_params(params, labels)
    state = tx.init(trainable)
    done = 5
    for step in range(done):
        _, state = tx.update(phases.split_params(_grads(params, seed=step), labels)[0], state, trainable)
    frozen_labels = phases.freeze_scheduled(labels, c.optimizer_groups)
    new_trainable, _ = phases.split_params(phases.merge_params(trainable, frozen), frozen_labels)
    new_tx = optim.make_optimizer(c, params, frozen_labels, STEPS_PER_EPOCH)
    new_state = optim.transfer_state(state, new_tx, new_trainable)
    _, new_state = new_tx.update(phases.split_params(_grads(params), frozen_labels)[0], new_state, new_trainable)
    assert optim.learning_rate(new_state) == pytest.approx(float(schedule(done)), rel=1e-6)
    assert float(schedule(done)) != pytest.approx(float(schedule(0)))     # the check can tell a restart


def _with_lr_mults(c, mults):
    c.optimizer_groups = phases.update_groups(c.optimizer_groups, {p: dict(lr_mult=m) for p, m in mults.items()})
    return c


def test_lr_mult_scales_exactly_the_rows_leaves(params):
    plain = _with_lr_mults(_config(3), {XATTN_GATE_PATTERN: 1.0})
    scaled = _with_lr_mults(_config(3), {XATTN_GATE_PATTERN: 30.0, r"predictor/.*": 0.5})
    labels = phases.trainable_labels(params, plain.optimizer_groups, 3)
    assert _by_path(labels)["compressor/queries"] == phases.FROZEN          # no row: frozen
    grads = _grads(params)
    updates = {}
    for name, c in (("plain", plain), ("scaled", scaled)):
        tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
        updates[name] = _by_path(tx.update(grads, tx.init(params), params)[0])
    for path, u in updates["plain"].items():
        factor = 30.0 if path == "xattn_1/gate" else 0.5 if path.startswith("predictor/") else 1.0
        np.testing.assert_allclose(updates["scaled"][path], factor * np.asarray(u), rtol=1e-5, err_msg=path)
    assert np.any(np.asarray(updates["plain"]["xattn_1/gate"]))


def test_a_frozen_row_freezes_what_a_later_row_would_train(params):
    table = phases.group_rows([dict(pattern="compressor/queries", frozen=True), "compressor/.*"])
    labels = _by_path(phases.trainable_labels(params, table, 1))
    assert labels["compressor/queries"] == phases.FROZEN
    assert {label for p, label in labels.items() if p.startswith("compressor/") and p != "compressor/queries"} == \
        {phases.TRAINABLE}


def test_phase4_step_at_the_paper_lr_moves_lora_on_a_bf16_model():
    """Phase 4 trains at lr 5e-7. On a model that stores its base weights and computes in bf16, the
    LoRA master weights are f32, so one step moves them (a bf16 lora_A near 0.1 has a spacing of
    ~5e-4: the update would round away); the frozen bf16 weights do not move."""
    from kervljepa_jax.model import lora as lora_lib, vlm as vlm_lib
    from kervljepa_jax.training import step as step_lib
    cfg = vlm_lib.make_config("tiny", visual_token_id=5, vocab_size=64, d_visual=16, num_visual_tokens=4,
                              lora=lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0), injection_layers=(1,),
                              dtype="bfloat16", param_dtype="bfloat16")
    variables = vlm_lib.init(cfg, jax.random.key(0))
    # A trained LoRA: B away from its zero init (else A's gradient is zero).
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.05 if kp[-1].key == "lora_B" else x, variables["params"])
    config = config_lib.load_phase_config(4, "paper")
    assert config.train.lr == 5e-7
    labels = phases.trainable_labels(variables["params"], config.optimizer_groups, 4)
    trainable, frozen = phases.split_params(variables["params"], labels)
    tx = optim.make_optimizer(config, trainable, labels, STEPS_PER_EPOCH)
    rng = np.random.default_rng(0)
    b, n, t = 2, 6, 10
    ids = rng.integers(6, 64, (b, t)).astype(np.int32)
    ids[:, 1:5] = 5
    batch = {"slices": jnp.asarray(rng.normal(size=(b, n, 16)), jnp.float32), "z_mm": jnp.ones((b, n)),
             "valid": jnp.ones((b, n), bool), "input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, t), bool),
             "loss_mask": jnp.asarray(np.arange(t)[None].repeat(b, 0) >= 5), "labels": jnp.zeros((b, 18), jnp.int32)}
    consts = {"whitening": None, "pos_weight": jnp.ones((18,))}
    step = step_lib.make_train_step(4, vlm_lib.VLM(cfg, deterministic=False), None, tx, dict(config.loss_weights))
    new, _, metrics = jax.jit(step)(trainable, frozen, tx.init(trainable), variables["calibration"], batch,
                                    jax.random.key(1), consts)
    assert np.isfinite(float(metrics["loss"]))
    before, after = _by_path(trainable), _by_path(new)
    lora = [p for p in before if p.endswith(("lora_A", "lora_B"))]
    assert len(lora) == 28 and all(after[p].dtype == jnp.float32 for p in lora)
    moved = [p for p in lora if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))]
    assert moved == lora, sorted(set(lora) - set(moved))
    assert _by_path(frozen)["llm/model/norm/weight"].dtype == jnp.bfloat16


def test_config_mistakes_are_one_line_override_errors(params):
    """A schedule name, a trainable list that selects nothing, a plateau / early-stop mode: the
    user's config, so train prints them in one line (issue 25.8); a mode fails when the phase starts."""
    with pytest.raises(config_lib.OverrideError, match=r"^--config.train.schedule='linear'"):
        optim.make_schedule(_config(1, schedule="linear").train, 10)
    config = _config(1)
    labels = phases.trainable_labels(params, [r"compressor/.*"], 1)
    frozen = jax.tree.map(lambda _: phases.FROZEN, labels)
    with pytest.raises(config_lib.OverrideError, match=r"^--config.optimizer_groups: selects no parameter of phase 1"):
        optim.make_optimizer(config, params, frozen, 10)
    for controller in (optim.ReduceLROnPlateau, optim.EarlyStopping):
        with pytest.raises(config_lib.OverrideError, match="mode='maximum'"):
            controller(mode="maximum")


def test_early_stopping_stays_stopped_after_a_resume():
    stop = optim.EarlyStopping(patience=2, mode="min")
    [stop.step(v) for v in (1.0, 1.0, 1.0)]
    resumed = optim.EarlyStopping(patience=2, mode="min")
    resumed.load_state_dict(stop.state_dict())
    assert resumed.should_stop() and not optim.EarlyStopping(patience=2).should_stop()


def test_phase4_optimizer_clips_the_gradient_of_loss_plus_ewc(params):
    """With the global-norm clip on, the update == adamw on clip(grad(loss + lam * sum (theta -
    theta_P3)^2)): the EWC pull is part of the clipped gradient (eq. 13), not added after the clip."""
    c = _config(4, lr=1e-2, weight_decay=0.0, grad_clip=0.5)
    labels = phases.trainable_labels(params, c.optimizer_groups, c.phase)
    tx = optim.make_optimizer(c, params, labels, STEPS_PER_EPOCH)
    trainable, _ = phases.split_params(params, labels)
    lora = {p: x for p, x in _by_path(params).items() if p.endswith(("lora_A", "lora_B"))}
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    ref_state, ref_params = ref.init(lora), lora
    state, update = tx.init(trainable), jax.jit(tx.update)
    for step in range(3):
        grads = _by_path(phases.split_params(_grads(params, seed=step), labels)[0])
        pull = jax.grad(lambda p: losses.ewc_penalty(p, lora, lam=100.0))(ref_params)
        ref_grads = jax.tree.map(jnp.add, grads, pull)
        assert float(optax.global_norm(ref_grads)) > 0.5          # the clip is active
        updates, state = update(phases.split_params(_grads(params, seed=step), labels)[0], state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        ref_updates, ref_state = ref.update(ref_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    got = _by_path(trainable)
    assert max(float(np.abs(ref_params[p] - lora[p]).max()) for p in lora) > 1e-3   # they did move
    for p in lora:
        np.testing.assert_allclose(got[p], ref_params[p], rtol=1e-5, atol=1e-6)
