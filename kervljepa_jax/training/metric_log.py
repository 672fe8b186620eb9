"""The run's metric log: metrics.jsonl (one JSON object per line) + TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging


class MetricLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard event files, per workdir."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
        except ImportError:  # an optional nicety; the JSONL is the record
            logging.warning("tensorboardX not installed: metrics go to %s only", self.path)

    def write(self, phase: int, step: int, values: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        record = {"phase": phase, "step": int(step), **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"phase{phase}/{k}", float(v), int(step))
            self._tb.flush()

    def drop_after(self, phase: int, step: int) -> None:
        """Forget the phase's records past `step`: a phase resumed from its step-`step` checkpoint (or
        restarted, step 0) runs those steps again and logs them anew, one record per step as before.
        (TensorBoard's event files are append-only; there the replayed steps show twice.)"""
        if jax.process_index() != 0 or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if not self._replayed(line, phase, step)]
        if len(kept) < len(lines):
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)      # a crash mid-write leaves the old file whole

    @staticmethod
    def _replayed(line: str, phase: int, step: int) -> bool:
        try:
            record = json.loads(line)
        except ValueError:       # a line cut short by a crash: not a record, nothing to keep
            return True
        return record.get("phase") == phase and record.get("step", 0) > step
