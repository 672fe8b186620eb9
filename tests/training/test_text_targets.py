"""The frozen LLM's text targets: a split's table gives each record its own rows, the cached
targets equal what the step embeds, one table per split and text setting, and the whitening's
identity ablation needs a JEPA space as wide as the LLM."""

import numpy as np
import pytest

from kervljepa_jax import findings
from kervljepa_jax.training import feature_cache
from kervljepa_jax.training import step as step_lib
from kervljepa_jax.training import text_targets
from kervljepa_jax.training.pretrain import TrainError


def test_a_table_gives_each_record_its_own_rows():
    # Values that name their record (target) and their condition row (1-based; absent: 0).
    n, c = 6, findings.NUM_CLASSES
    present = np.zeros((n, c), bool)
    present[np.arange(n), np.arange(n) % c] = True
    present[0, 5], present[3] = True, False                          # two classes; a normal volume
    index = np.where(present, np.cumsum(present).reshape(present.shape) - 1, -1).astype(np.int32)
    condition_rows = np.repeat(np.arange(1, present.sum() + 1, dtype=np.float32)[:, None], 3, axis=1)
    target = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    table = text_targets.TextTable(target, condition_rows, index)
    records = np.array([4, 0, 3, 4], np.int32)
    got = table.lookup(records)
    assert len(table) == n and got["condition_embedding"].shape == (4, c, 3)
    for row, record in enumerate(records):
        np.testing.assert_array_equal(got["target_embedding"][row], [record] * 3)
        want = np.where(index[record] >= 0, index[record] + 1, 0).astype(np.float32)
        np.testing.assert_array_equal(got["condition_embedding"][row], np.repeat(want[:, None], 3, axis=1))
    none = text_targets.TextTable(target, np.zeros((0, 3), np.float32), np.full((n, c), -1, np.int32))
    assert not none.lookup(records)["condition_embedding"].any()    # no record has a condition text
    with pytest.raises(ValueError, match=r"need \[N, D_w\] and \[N, C\]"):
        text_targets.TextTable(target[:-1], condition_rows, index)
    with pytest.raises(ValueError, match=r"\(max 5\) for 5 condition rows"):
        text_targets.TextTable(target, condition_rows[:-1], index)


def test_without_whitening_the_targets_need_a_jepa_space_as_wide_as_the_llm():
    """The Table XI ablation (--config.model.whiten=false): the identity keeps every feature."""
    with pytest.raises(TrainError, match="--config.model.jepa_dim=8"):
        text_targets.identity_whitening(8, 4)
    np.testing.assert_array_equal(text_targets.identity_whitening(8, 8).projection, np.eye(8))


def test_cached_text_targets_equal_what_the_step_embeds(tiny_run, tiny_config):
    # A split's texts are embedded once, on its first ask (a fit on the targets keeps the training
    # split's, which it embedded anyway); joined
    # to the batches, the step uses them instead of running the frozen LLM: the values must be the
    # step's own.
    config = tiny_config()
    targets = tiny_run.targets
    train = tiny_run.pipeline(config, "train")
    targets.prepare(config, train)
    params = {"llm": tiny_run.llm_params}
    for split in ("train", "valid"):
        pipe = tiny_run.pipeline(config, split, shuffle=False)
        batch = next(iter(pipe.epoch(0, feature_cache.join(pipe, targets.table(pipe)))))
        assert {"target_embedding", "condition_embedding"} <= set(batch)
        bare = {k: v for k, v in batch.items() if not k.endswith("_embedding")}
        want_target = step_lib.report_targets(targets.encoder, params, bare, targets.whitening)
        want_cond = step_lib.condition_targets(targets.encoder, params, bare, targets.whitening)
        np.testing.assert_allclose(np.asarray(batch["target_embedding"]), np.asarray(want_target), atol=2e-4)
        present = np.asarray(batch["condition_valid"])
        assert present.any() and not np.asarray(batch["condition_embedding"])[~present].any()
        np.testing.assert_allclose(np.asarray(batch["condition_embedding"])[present],
                                   np.asarray(want_cond)[present], atol=2e-4)
        # The cached path returns the batch's arrays unchanged.
        assert step_lib.report_targets(targets.encoder, params, batch, targets.whitening) is batch["target_embedding"]
    # Another batch size (or shuffle) shares the split's table; turned off, there is none.
    assert targets.table(tiny_run.pipeline(tiny_config(**{"train.batch_size": "4"}), "train")) is \
        targets.table(train)
    off_config = tiny_config(**{"train.cache_text_targets": "false"})
    off = text_targets.TextTargets(off_config, tiny_run.llm_cfg, tiny_run.llm_params, tiny_run.vcfg.bridge.jepa_dim,
                                   tiny_run.workdir, tiny_run.replicated)
    off.prepare(off_config, train)
    assert off.table(train) is None and off.whitening is not None and off.pos_weight is not None


def test_the_step_constants_are_placed_once_and_only_after_prepare(tiny_run, tiny_config, tmp_path):
    config = tiny_config()
    tiny_run.targets.prepare(config, tiny_run.pipeline(config, "train"))
    consts = tiny_run.targets.consts()
    assert consts is tiny_run.targets.consts()       # every step reads the same placed arrays
    assert set(consts) == {"whitening", "pos_weight"}
    fresh = text_targets.TextTargets(config, tiny_run.llm_cfg, tiny_run.llm_params, tiny_run.vcfg.bridge.jepa_dim,
                                     str(tmp_path), tiny_run.replicated)
    with pytest.raises(ValueError, match=r"consts\(\) before prepare\(\)"):
        fresh.consts()
