"""MetricLog: one JSON object per write; drop_after, so that a resumed phase logs the steps it
replays once (issue 25.5)."""

import json

import jax.numpy as jnp
import numpy as np

from kervljepa_jax.training.metric_log import MetricLog


def test_metric_log_appends_one_json_object_per_write(tmp_path):
    log = MetricLog(str(tmp_path))
    log.write(2, 5, {"loss": np.float32(1.5)})
    log.write(2, 6, {"loss": jnp.asarray(1.25), "lr": 1e-3})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"phase": 2, "step": 5, "loss": 1.5}, {"phase": 2, "step": 6, "loss": 1.25, "lr": 1e-3}]


def test_drop_after_forgets_only_the_phases_records_past_the_step(tmp_path):
    log = MetricLog(str(tmp_path))
    for phase, step in ((1, 5), (2, 1), (2, 2), (2, 3), (3, 1)):
        log.write(phase, step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"phase": 2, "st')                 # the last line of a run that was killed mid-write
    log.drop_after(2, 1)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["phase"], r["step"]) for r in rows] == [(1, 5), (2, 1), (3, 1)]
    log.write(2, 2, {"loss": 0.5})                  # the replayed step, once
    assert sum(json.loads(line)["phase"] == 2 for line in open(tmp_path / "metrics.jsonl")) == 2
    MetricLog(str(tmp_path / "fresh")).drop_after(1, 0)      # no file yet: nothing to do
