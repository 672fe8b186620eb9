"""The frozen LLM's text targets (paper III-B4): what the text side of every loss compares with.

The base LLM without LoRA embeds a text as the mean of its hidden states at layer
`model.whiten_layer` (`TextTargets.encoder`, step.TextEncoder); a PCA whitening, fitted on the
training split's texts (`model.whiten_texts`) or loaded from WORKDIR/whitening.npz, maps that to
the JEPA space [D_w] (the identity under `model.whiten=false`). With train.cache_text_targets,
every record's whitened targets are embedded once per split and text setting (`TextTable`) and
`feature_cache.join` adds them to the batches by record_index; the step embeds a batch without
them itself, with the same values. pos_weight (from the training labels) lives here too: the
step's constants are the whitening and pos_weight (`consts`).

    targets = TextTargets(config, llm_cfg, llm_params, jepa_dim, workdir, replicated)   # Run.targets
    targets.prepare(config, train_pipe)       # pos_weight, whitening
    join(pipe, targets.table(pipe))           # batches with target_embedding, condition_embedding
                                              # (train.py asks only when a weighted term reads them)
    step(..., targets.consts())
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kervljepa_jax import findings, losses, sharding, whitening as whitening_lib
from kervljepa_jax.data import pipeline as pipeline_lib
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.training import step as step_lib
from kervljepa_jax.training.pretrain import TrainError, training_texts


@dataclasses.dataclass(frozen=True)
class TextTable:
    """A split's whitened text targets, ~5 KB per CT-RATE volume: target [N, D_w] (each record's
    class-ordered findings text); the present classes' condition texts as condition_rows [M, D_w],
    with condition_index [N, C] pointing into them (-1 for an absent class)."""

    target: np.ndarray
    condition_rows: np.ndarray
    condition_index: np.ndarray

    def __post_init__(self):
        n = len(self.target)
        if self.condition_index.shape != (n, findings.NUM_CLASSES) or \
                self.condition_index.max(initial=-1) >= len(self.condition_rows):
            raise ValueError(f"text targets: target {self.target.shape}, condition_index "
                             f"{self.condition_index.shape} (max {self.condition_index.max(initial=-1)}) for "
                             f"{len(self.condition_rows)} condition rows; need [N, D_w] and [N, C]")

    def __len__(self) -> int:
        return len(self.target)

    def lookup(self, record_index: np.ndarray) -> dict[str, np.ndarray]:
        """target_embedding [B, D_w] and condition_embedding [B, C, D_w] (zeros for absent classes)
        of the records `record_index` [B]."""
        idx = self.condition_index[record_index]                                          # [B, C]
        rows, target = self.condition_rows, self.target
        gathered = rows[np.maximum(idx, 0)] if len(rows) else np.zeros((*idx.shape, target.shape[-1]), target.dtype)
        return {"target_embedding": target[record_index],
                "condition_embedding": np.where(idx[..., None] >= 0, gathered, 0).astype(target.dtype)}


def whiten_layer(config, llm_cfg: llama_lib.LlamaConfig) -> int:
    """The hidden layer that embeds texts: model.whiten_layer, -1 for the middle one; else TrainError."""
    layers = llm_cfg.num_hidden_layers
    layer = int(config.model.whiten_layer) if config.model.whiten_layer >= 0 else layers // 2
    if layer > layers:
        raise TrainError(f"--config.model.whiten_layer={layer}: the LLM has {layers} layers; choose 0..{layers} "
                         f"or -1 for the middle one")
    return layer


def identity_whitening(hidden_size: int, jepa_dim: int) -> whitening_lib.Whitening:
    """--config.model.whiten=false: the raw text embeddings as targets, TrainError when the JEPA
    space is narrower than the LLM (the identity keeps every feature)."""
    try:
        return whitening_lib.identity(hidden_size, jepa_dim)
    except ValueError:
        raise TrainError(f"--config.model.whiten=false: set --config.model.jepa_dim={hidden_size} "
                         f"(the LLM width; now {jepa_dim}) so the raw embeddings fit") from None


def _text_key(pipe: pipeline_lib.Pipeline) -> str:
    """What a split's text targets depend on: its records and text settings, not batching."""
    data = {k: v for k, v in pipe.config.to_dict().items()
            if k not in ("batch_size", "shuffle", "drop_remainder", "read_threads", "num_workers")}
    return json.dumps([pipe.split, data], sort_keys=True, default=str)


class TextTargets:
    """The run's text targets: `encoder`, `whitening` and `pos_weight` once `prepare`d, and with
    train.cache_text_targets each split's `TextTable`."""

    def __init__(self, config, llm_cfg: llama_lib.LlamaConfig, llm_params: Any, jepa_dim: int, workdir: str,
                 replicated: jax.sharding.Sharding):
        self.layer = whiten_layer(config, llm_cfg)
        self.encoder = step_lib.TextEncoder(llm_cfg, self.layer)
        self.llm_params, self.jepa_dim, self.workdir, self.replicated = llm_params, jepa_dim, workdir, replicated
        self.whitening: dict[str, jax.Array] | None = None      # {"mean": [D], "projection": [D, D_w]}
        self.pos_weight: jax.Array | None = None                 # [C]
        self.cached = False                                      # train.cache_text_targets, as prepared
        self._tables: dict[str, TextTable] = {}                  # _text_key -> the split's table
        self._embed = None
        self._consts: dict | None = None                         # consts(), once prepared

    def prepare(self, config, train: pipeline_lib.Pipeline) -> None:
        """pos_weight from the training labels; the whitening (fitted and saved to
        WORKDIR/whitening.npz, loaded from there, or the identity). A fit on the text targets keeps
        the training split's table it embedded on the way (`train`: its pipeline); otherwise
        `table` embeds a split when first asked. Once per run: a later call does nothing."""
        if self.whitening is not None:
            return
        _, labels = training_texts(config.data)
        self.pos_weight = jnp.asarray(losses.pos_weight_from_labels(np.stack(labels)))
        self.cached = bool(config.train.cache_text_targets)
        path = os.path.join(self.workdir, "whitening.npz")
        train_raw = None
        if not config.model.get("whiten", True):       # the ablation: never saved, never loaded
            w = identity_whitening(self.llm_hidden_size, self.jepa_dim)
        elif os.path.isfile(path):
            w = whitening_lib.load(path)
        else:
            w, _, train_raw = self.fit_whitening(config, train)
            whitening_lib.save(w, path)
        self.whitening = {"mean": jnp.asarray(w.mean, jnp.float32),
                          "projection": jnp.asarray(w.projection, jnp.float32)}
        if train_raw is not None:
            self.table(train, train_raw)

    @property
    def llm_hidden_size(self) -> int:
        return self.encoder.llm.hidden_size

    def fit_whitening(self, config, train: pipeline_lib.Pipeline
                      ) -> tuple[whitening_lib.Whitening, dict[str, float], dict[str, np.ndarray] | None]:
        """Fit the PCA whitening on the training split's texts chosen by `model.whiten_texts` and
        measure it: mean pairwise cosine and d' before and after (a pair is "same" when its label
        rows match), retained variance, and `texts`, which texts it was fitted on:

          "targets"  the text targets (per-condition texts, labelled with their class, and the
                     class-ordered findings texts, with their volume's labels) as `train`'s
                     batches carry them
          "reports"  the training reports (Findings_EN) with their volume's labels: the paper's
                     22,773 training report embeddings (III-B4)

        Returns (whitening, stats, `train`'s `embedded_rows` when they were computed, else None)."""
        texts = str(config.model.get("whiten_texts", "targets"))
        _, labels = training_texts(config.data)
        labels = np.stack(labels).astype(np.int32)
        raw = None
        if texts == "reports":
            emb, label_rows = self._report_rows(config, train.tokenizer), labels
        elif texts == "targets":
            raw = self.embedded_rows(train)
            classes = np.nonzero(raw["condition_index"] >= 0)[1]     # row-major: the order of condition_rows
            label_rows = np.concatenate([np.eye(findings.NUM_CLASSES, dtype=np.int32)[classes], labels])
            emb = np.concatenate([raw["condition_rows"], raw["target"]])
        else:
            raise TrainError(f"--config.model.whiten_texts={texts!r}: use 'targets' or 'reports'")
        w, stats = whitening_lib.fit_and_report(emb, label_rows, dim=self.jepa_dim)
        stats = {"texts": texts, "num_texts": len(emb), **stats}
        logging.info("whitening (layer %d, %d training %s): %s", self.layer, len(emb), texts, json.dumps(stats))
        return w, stats, raw

    def _report_rows(self, config, tokenizer) -> np.ndarray:
        """Unwhitened embeddings [N, D] of the training reports, tokenised as a raw-text phase's
        batches carry them (a text-only pipeline of its own: nothing else of it is embedded); more
        than jepa_dim of them, else TrainError before any is embedded."""
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.text_mode = "raw"
        rows = pipeline_lib.Pipeline(data, "train", tokenizer).text_rows()
        n, t = rows["target_ids"].shape
        if n <= self.jepa_dim:     # a miniature split (the targets are ~5 texts a volume)
            raise TrainError(f"--config.model.whiten_texts=reports: {n} training reports cannot fit a "
                             f"{self.jepa_dim}-dimensional whitening (it needs more than {self.jepa_dim}); use "
                             "more volumes or --config.model.whiten_texts=targets")
        return self.embed_ids(rows["target_ids"], np.arange(t) < rows["target_lengths"][:, None])

    def embedded_rows(self, pipe: pipeline_lib.Pipeline) -> dict[str, np.ndarray]:
        """Unwhitened embeddings of a split's records: target [N, D]; the present classes' condition
        texts as condition_rows [M, D] with condition_index [N, C] (their row, -1 when absent)."""
        rows = pipe.text_rows()
        present = rows["condition_lengths"] > 0
        tc, t = rows["condition_ids"].shape[-1], rows["target_ids"].shape[-1]
        index = np.full(present.shape, -1, np.int32)
        index[present] = np.arange(int(present.sum()), dtype=np.int32)
        return {"target": self.embed_ids(rows["target_ids"], np.arange(t) < rows["target_lengths"][:, None]),
                "condition_rows": self.embed_ids(rows["condition_ids"][present],
                                                 np.arange(tc) < rows["condition_lengths"][present][:, None]),
                "condition_index": index}

    def table(self, pipe: pipeline_lib.Pipeline, raw: dict[str, np.ndarray] | None = None) -> TextTable | None:
        """The whitened text targets of `pipe`'s split, embedded on the first ask per split and text
        setting (`raw`: the split's `embedded_rows` when already computed); None before `prepare`
        or with train.cache_text_targets off. Every process asks for the same splits in the same
        order: the embedding runs on the LLM's sharded params."""
        if not self.cached or self.whitening is None:
            return None
        key = _text_key(pipe)
        if key not in self._tables:
            raw = raw if raw is not None else self.embedded_rows(pipe)
            mean, projection = (np.asarray(self.whitening[k], np.float32) for k in ("mean", "projection"))
            whiten = lambda x: ((x - mean) @ projection).astype(np.float32)  # noqa: E731
            self._tables[key] = TextTable(whiten(raw["target"]), whiten(raw["condition_rows"]),
                                          raw["condition_index"])
        return self._tables[key]

    def embed_ids(self, ids: np.ndarray, mask: np.ndarray, batch: int = 256) -> np.ndarray:
        """[M, T] ids with their mask -> [M, D] unwhitened embeddings by the base LLM (fixed-size
        batches: one compilation per length)."""
        if self._embed is None:
            self._embed = jax.jit(lambda p, i, m: self.encoder(p, i, m, None))
        llm = step_lib.base_llm_params({"llm": self.llm_params})
        out = [np.zeros((0, self.llm_hidden_size), np.float32)]
        for start in range(0, len(ids), batch):
            i, m = ids[start:start + batch], mask[start:start + batch]
            n = len(i)
            i, m = np.pad(i, ((0, batch - n), (0, 0))), np.pad(m, ((0, batch - n), (0, 0)))
            out.append(sharding.as_host_f32(self._embed(llm, jnp.asarray(i), jnp.asarray(m)))[:n])
        return np.concatenate(out)

    def consts(self) -> dict:
        """The step's constants on every device: whitening and pos_weight, placed once (every step
        and validation batch reads them; a placement per call copied them to each device again)."""
        if self.whitening is None:
            raise ValueError("TextTargets.consts() before prepare(): no whitening or pos_weight yet")
        if self._consts is None:
            self._consts = jax.device_put({"whitening": self.whitening, "pos_weight": self.pos_weight},
                                          self.replicated)
        return self._consts
