"""Optimizer-group tables -> label trees, the trainable/frozen split, scheduled freezes, the start-up table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kervljepa_jax.model.lora import LORA_PATTERN
from kervljepa_jax.model.xattn import PROJECTOR_PATTERN, XATTN_PATTERN
from kervljepa_jax.training import phases
from tests.training import toy_params

PHASE3 = [r"predictor/.*", LORA_PATTERN, XATTN_PATTERN, PROJECTOR_PATTERN, r"llm_classifier/.*", r"jepa_head/.*"]


@pytest.fixture(scope="module")
def params():
    return toy_params()


def _trainable_paths(labels):
    return {p for p, label in zip(phases.leaf_paths(labels), jax.tree.leaves(labels)) if label == phases.TRAINABLE}


def test_labels_follow_the_patterns(params):
    labels = phases.trainable_labels(params, PHASE3, phase=3)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    got = _trainable_paths(labels)
    assert "llm/model/layers_0_1/self_attn/q_proj/lora_A" in got
    assert "llm/model/layers_2_3/mlp/down_proj/lora_B" in got
    assert {"xattn_1/gate", "projector_1/kernel", "predictor/norm/scale", "jepa_head/linear2/bias"} <= got
    # Frozen: the compressor, the base LLM weights, its norms, the visual classifier, the temperature.
    assert not any(p.startswith(("compressor/", "visual_classifier/")) for p in got)
    assert not any(p.endswith(("/kernel",)) and p.startswith("llm/") for p in got)
    assert "llm/model/layers_0_1/input_layernorm/weight" not in got and "log_temperature" not in got
    # 2 scanned segments x 7 projections x (A, B) + adapter 7 + projector 2 + predictor 4 + llm_classifier 2
    # + head 6.
    assert len(got) == 2 * 7 * 2 + 7 + 2 + 4 + 2 + 6


def test_patterns_fullmatch_only(params):
    labels = phases.trainable_labels(params, [r"log_temperature"], phase=2)
    assert _trainable_paths(labels) == {"log_temperature"}


def test_unmatched_pattern_is_a_one_line_error(params):
    with pytest.raises(ValueError) as err:
        phases.trainable_labels(params, [r"compressor/.*", r"visual_clasifier/.*"], phase=1)
    msg = str(err.value)
    assert "\n" not in msg and "'visual_clasifier/.*'" in msg and "phase 1" in msg
    with pytest.raises(ValueError, match=r"^optimizer_groups\[0\]: pattern '\(' is not a regex"):
        phases.trainable_labels(params, ["("], phase=2)


@pytest.mark.parametrize("row, message", [
    (dict(pattern="a", lr=2.0), r"^optimizer_groups\[0\]: unknown field\(s\) \['lr'\]"),
    (dict(lr_mult=2.0), r"^optimizer_groups\[0\]: no pattern"),
    (dict(pattern="a", trust_ratio=[30.0, 1.0]), r"^optimizer_groups\[0\]: trust_ratio=\[30.0, 1.0\]"),
    (dict(pattern="a", ewc=-1.0), r"^optimizer_groups\[0\]: ewc=-1.0 must be >= 0"),
])
def test_a_bad_row_is_a_one_line_error(row, message):
    with pytest.raises(ValueError, match=message) as err:
        phases.group_rows([row])
    assert "\n" not in str(err.value)


def test_rows_get_every_field_and_profiles_edit_them_by_pattern():
    rows = phases.group_rows(["a/.*", dict(pattern="b", ewc=1)])
    assert rows[0] == {"pattern": "a/.*", **phases.GROUP_DEFAULTS}
    assert rows[1]["ewc"] == 1.0 and isinstance(rows[1]["ewc"], float)
    edited = phases.update_groups(rows, {"b": dict(lr_mult=0.1)})
    assert edited[1]["lr_mult"] == 0.1 and edited[0] == rows[0]
    with pytest.raises(ValueError, match=r"no row has pattern\(s\) \['c'\]"):
        phases.update_groups(rows, {"c": dict(lr_mult=0.1)})


def test_freeze_epoch_is_one_per_phase():
    assert phases.freeze_epoch(["a", dict(pattern="b", freeze_after_epoch=6)]) == 6
    assert phases.freeze_epoch(["a"]) == 0
    with pytest.raises(ValueError, match=r"different epochs \[2, 6\]"):
        phases.freeze_epoch([dict(pattern="a", freeze_after_epoch=2), dict(pattern="b", freeze_after_epoch=6)])


def test_split_and_merge_round_trip(params):
    labels = phases.trainable_labels(params, PHASE3, phase=3)
    trainable, frozen = phases.split_params(params, labels)
    n_t, n_f = len(jax.tree.leaves(trainable)), len(jax.tree.leaves(frozen))
    assert n_t == len(_trainable_paths(labels)) and n_t + n_f == len(jax.tree.leaves(params))
    merged = phases.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_gradient_only_for_trainable_leaves(params):
    labels = phases.trainable_labels(params, [r"projector_1/.*", r"compressor/queries"], phase=0)
    trainable, frozen = phases.split_params(params, labels)

    def loss(t):
        p = phases.merge_params(t, frozen)
        return jnp.sum(p["projector_1"]["kernel"] ** 2) + jnp.sum(p["compressor"]["queries"]) \
            + jnp.sum(p["llm"]["model"]["norm"]["weight"] ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    assert len(jax.tree.leaves(grads)) == 3      # projector kernel, bias, queries: nothing else exists
    np.testing.assert_allclose(grads["projector_1"]["kernel"], 2 * params["projector_1"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(grads["projector_1"]["bias"], 0.0)
    np.testing.assert_array_equal(grads["compressor"]["queries"], 1.0)
    assert isinstance(grads["llm"]["model"]["norm"]["weight"], optax.MaskedNode)


def test_scheduled_freeze_relabels_its_rows_leaves(params):
    table = [dict(pattern=LORA_PATTERN, freeze_after_epoch=6)] + PHASE3
    labels = phases.trainable_labels(params, table, phase=3)
    after = phases.freeze_scheduled(labels, table)
    got = _trainable_paths(after)
    assert not any(p.endswith(("lora_A", "lora_B")) for p in got)
    assert got == {p for p in _trainable_paths(labels) if not p.endswith(("lora_A", "lora_B"))}


def test_trainable_table_counts_and_bytes(params):
    patterns = [r"projector_1/.*", LORA_PATTERN]
    labels = phases.trainable_labels(params, patterns, phase=3)
    table = phases.trainable_table(params, labels, patterns)
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()}
    # projector_1: kernel 6x6 + bias 6 = 42 f32 = 168 B.
    assert rows["projector_1/.*"][1:] == ["2", "42", "168B"]
    lora_params = 4 * 7 * (6 * 2 + 2 * 6)
    # 2 scanned segments x 7 projections x (A, B) = 28 leaves.
    assert rows[LORA_PATTERN][1:] == ["28", f"{lora_params}", f"{lora_params * 4 / 1000:.2f}KB"]
    trainable_row = next(v for k, v in rows.items() if k.startswith("= trainable"))
    assert trainable_row[-3:] == ["30", "714", "2.86KB"]       # 42 + 672 f32 parameters
    # Abstract trees (jax.eval_shape of an init) give the same table.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert phases.trainable_table(abstract, labels, patterns) == table
