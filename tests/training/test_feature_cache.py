"""Per-record feature tables joined to the batches by record_index: each batch row gets its own
record's rows, a table of another size is refused, and the frozen compressor's cached V' is what
the step computes."""

import jax
import numpy as np
import pytest

from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import feature_cache
from kervljepa_jax.training import phases as phases_lib
from kervljepa_jax.training import run as run_lib
from kervljepa_jax.training import step as step_lib


def test_join_gives_each_batch_row_its_records_rows(tiny_run, tiny_config):
    pipe = tiny_run.pipeline(tiny_config(), "train")
    n = len(pipe.source)
    # A table whose rows name their record.
    table = feature_cache.VisualTokens(np.repeat(np.arange(n, dtype=np.float32)[:, None, None], 4, axis=1)
                                       .repeat(2, axis=2))
    got = next(iter(pipe.epoch(0, feature_cache.join(pipe, table, None))))
    tokens, records = np.asarray(got["visual_tokens"]), np.asarray(got["record_index"])
    assert tokens.shape == (len(records), 4, 2)
    for row, record in enumerate(records):
        assert (tokens[row] == record).all()
    assert feature_cache.join(pipe, None) is None                   # nothing cached: plain batches
    with pytest.raises(ValueError, match="VisualTokens of 23 records: the train split has 24 records"):
        feature_cache.join(pipe, feature_cache.VisualTokens(table.tokens[:-1]))
    with pytest.raises(ValueError, match=r"need \[N, K, d_v\]"):
        feature_cache.VisualTokens(table.tokens[0])


def test_frozen_compressor_tokens_are_what_the_step_computes(tiny_run, tiny_config):
    # Phase 3 freezes the compressor: its V' of every training volume is computed once and joined
    # to the batches. Without dropout the step's loss must be the same either way.
    config = tiny_config()
    pipe = tiny_run.pipeline(config, "train")
    tiny_run.targets.prepare(config, pipe)
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    params = jax.tree.map(lambda s: 0.05 * jax.random.normal(next(keys), s.shape, s.dtype), tiny_run.abstract_params)
    variables = tiny_run.place(run_lib.restored_variables(params, 1.7))
    labels = phases_lib.trainable_labels(variables["params"], config.optimizer_groups, 3)
    visual = feature_cache.compressor_tokens(config, tiny_run.vcfg.compressor, variables["params"], labels, pipe)
    cfg = tiny_run.vcfg.compressor
    assert visual.tokens.shape == (config.data.num_train, cfg.num_zones, cfg.d_visual)
    assert np.abs(visual.tokens).min(axis=(1, 2)).all()              # every record computed
    batch = next(iter(pipe.epoch(0, feature_cache.join(pipe, tiny_run.targets.table(pipe), visual))))
    eval_step = jax.jit(step_lib.make_eval_step(3, vlm_lib.VLM(tiny_run.vcfg), tiny_run.targets.encoder,
                                                dict(config.loss_weights)))
    batch = {k: v for k, v in batch.items() if k != "meta"}
    bare = {k: v for k, v in batch.items() if k != "visual_tokens"}
    got = eval_step(variables["params"], variables["calibration"], batch, tiny_run.targets.consts())
    want = eval_step(variables["params"], variables["calibration"], bare, tiny_run.targets.consts())
    for name in want:
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, err_msg=name)
    # A phase that trains the compressor, or the flag off: no table.
    phase1 = tiny_config(phase=1)
    assert feature_cache.compressor_tokens(phase1, cfg, variables["params"], phases_lib.trainable_labels(
        variables["params"], phase1.optimizer_groups, 1), pipe) is None
    off = tiny_config(**{"train.cache_visual_tokens": "false"})
    assert feature_cache.compressor_tokens(off, cfg, variables["params"], labels, pipe) is None
