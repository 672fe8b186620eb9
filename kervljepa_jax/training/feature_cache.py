"""Per-record features computed once and joined to a split's batches by record_index.

A table has a row per record of one split, indexed by `record_index` ([B] int32 in every batch,
the record's index in its split): the frozen LLM's whitened text targets
(`text_targets.TextTable`) and, here, a frozen compressor's V' (`VisualTokens`). The pipeline
knows nothing of them: `join(pipe, *tables)` is the `join` its epochs apply to each process-local
host batch before the batch is placed on the mesh, so that each process looks up its own rows.

    visual = compressor_tokens(config, run.vcfg.compressor, params, labels, train_pipe)  # None: not cached
    for batch in train_pipe.epoch(e, join(train_pipe, run.targets.table(train_pipe), visual)):
        ...                        # batch["visual_tokens"] [B, K, d_v], batch["target_embedding"] [B, D_w]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np

from kervljepa_jax import sharding
from kervljepa_jax.data import pipeline as pipeline_lib
from kervljepa_jax.model import compressor as compressor_lib
from kervljepa_jax.training import phases as phases_lib


class Table(Protocol):
    """Rows per record of a split: len() records; lookup([B] record indices) -> {name: [B, ...]}."""

    def __len__(self) -> int: ...

    def lookup(self, record_index: np.ndarray) -> dict[str, np.ndarray]: ...


def join(pipe: pipeline_lib.Pipeline, *tables: Table | None) -> Callable[[dict], dict] | None:
    """The `join` of `pipe`'s batches (`Pipeline.epoch`, `restore`): a host batch plus every table's
    rows for its record_index. A None table (those features not cached) is left out; None when no
    table is left. ValueError when a table has not one row per record of `pipe`'s split."""
    tables = tuple(t for t in tables if t is not None)
    for table in tables:
        if len(table) != len(pipe.source):
            raise ValueError(f"{type(table).__name__} of {len(table)} records: the {pipe.split} split has "
                             f"{len(pipe.source)} records")
    if not tables:
        return None

    def add_rows(batch: dict) -> dict:
        out = dict(batch)
        for table in tables:
            out.update(table.lookup(batch["record_index"]))
        return out
    return add_rows


@dataclasses.dataclass(frozen=True)
class VisualTokens:
    """A frozen compressor's V' [N, K, d_v] of every record of a split."""

    tokens: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 3:
            raise ValueError(f"visual tokens {self.tokens.shape}: need [N, K, d_v]")

    def __len__(self) -> int:
        return len(self.tokens)

    def lookup(self, record_index: np.ndarray) -> dict[str, np.ndarray]:
        """visual_tokens [B, K, d_v]: the rows of `record_index` [B]."""
        return {"visual_tokens": self.tokens[record_index]}


def _compress(compressor: compressor_lib.ZoneCompressor, weights: Any, slices, z_mm, valid):
    return compressor.apply({"params": weights}, slices, z_mm, valid)


# Compiled once per compressor config (a flax module hashes by its config), not once per phase.
_compress_jit = jax.jit(_compress, static_argnums=0)


def compressor_tokens(config, cfg: compressor_lib.CompressorConfig, params: Any, labels: Any,
                      pipe: pipeline_lib.Pipeline) -> VisualTokens | None:
    """V' of every record of `pipe`'s split (the training split), for a phase whose compressor is
    frozen (train.cache_visual_tokens; None otherwise): the frozen compressor is a fixed function of
    the slices, so its forward runs once per volume and phase instead of once per step
    (docs/embedded_profile.md, "Where the time goes"). Deterministic: a frozen compressor's dropout
    trains nothing. Each process computes all N (an epoch draws any record); a skipped record
    keeps zeros."""
    trainable = [p for p, label in zip(phases_lib.leaf_paths(params), jax.tree.leaves(labels))
                 if p.startswith("compressor/") and label == phases_lib.TRAINABLE]
    if not config.train.cache_visual_tokens or trainable:
        return None
    compressor = compressor_lib.ZoneCompressor(cfg)
    weights = sharding.host_copy(params["compressor"])
    table = np.zeros((len(pipe.source), cfg.num_zones, cfg.d_visual), np.dtype(cfg.dtype))
    rows = pipe.local_batch_size
    for batch in pipe.ordered_batches():
        n = len(batch["record_index"])
        padded = [np.pad(batch[k], [(0, rows - n)] + [(0, 0)] * (batch[k].ndim - 1))
                  for k in ("slices", "z_mm", "valid")]
        padded[2][n:, 0] = True            # a padding row needs one valid slice (its output is dropped)
        # Under the run's mesh the output may span every process's devices: gathered, not read.
        table[batch["record_index"]] = sharding.as_host_f32(_compress_jit(compressor, weights, *padded))[:n]
    return VisualTokens(table)
