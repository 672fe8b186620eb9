"""grain input pipeline: records -> padded examples -> batches -> global arrays on the mesh.

Per epoch, a grain `DataLoader` reads this process's shard (`jax.process_index()` of
`jax.process_count()`) of the source in an order shuffled from (seed, epoch). Records are
turned into fixed-shape examples in grain's reader threads (and `num_workers` processes):
  slices [N_max, D]  z_mm [N_max]  valid [N_max] bool  num_slices []  labels [C]
  input_ids / loss_mask / attention_mask [T]      chat sequence, loss on the assistant turn
  condition_ids [C, Tc]  condition_lengths [C]  condition_valid [C]   per-condition texts (MMD)
  target_ids [T]  target_mask [T]                  positive-findings-only text (InfoNCE)
Batches add a leading [B]; `meta` carries the host-side strings (volume names, responses).
The iterator state (epoch + grain position + the epoch's counts) goes into the checkpoint, so
a resumed run continues mid-epoch with exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import flax.linen as nn
import grain
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from kervljepa_jax import findings, sharding
from kervljepa_jax.data import SPLITS, ctrate, records, synthetic, text, tokenizer as tokenizers

META_KEYS = ("volume_name", "response", "condition_texts")
_EVENTS_KEY = "events"


def make_source(config, split: str):
    """The configured record source for a split (a grain RandomAccessDataSource)."""
    if split not in SPLITS:
        raise records.DataError(f"split {split!r}: use one of {SPLITS}")
    if config.source == "synthetic":
        return synthetic.SyntheticSource(config, split)
    if config.source == "ctrate":
        return ctrate.CtRateSource(config, split)
    raise records.DataError(f"data.source={config.source!r}: use synthetic or ctrate")


def make_tokenizer(config):
    """The HF tokenizer at data.tokenizer_path, or the BPE trained on the training reports."""
    if config.tokenizer_path:
        return tokenizers.load_hf(config.tokenizer_path)
    if config.source == "synthetic":
        key = f"synthetic|seed={config.seed}|n={config.num_train}"
        source = synthetic.SyntheticSource(config, "train")
        reports = source.reports
    else:
        path = ctrate.resolve(config.root, config.reports_csv["train"])
        stat = os.stat(path) if os.path.isfile(path) else None
        key = f"ctrate|{os.path.abspath(path)}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}"

        def reports():
            return [fields["Findings_EN"] for _, fields in
                    ctrate.read_csv(path, ctrate.REPORT_COLUMNS, "reports_csv.train")]

    def corpus():
        fixed = [text.chat_prompt(config.num_visual_tokens), findings.NORMAL_SENTENCE,
                 *(f.fallback_sentence for f in findings.FINDINGS)]
        return fixed + reports()
    return tokenizers.build_tokenizer(config, corpus, key)


def pad_slices(slices: np.ndarray, z_mm: np.ndarray, max_slices: int, dtype: np.dtype):
    """[N, D], [N] -> [N_max, D] (dtype), [N_max] float32, [N_max] bool; zeros past N."""
    n, d = slices.shape
    if n == max_slices and slices.dtype == dtype:
        padded = slices
    else:
        padded = np.zeros((max_slices, d), dtype)
        padded[:n] = slices
    z = np.zeros(max_slices, np.float32)
    z[:n] = z_mm
    valid = np.zeros(max_slices, bool)
    valid[:n] = True
    return padded, z, valid


class ExampleBuilder:
    """Record -> fixed-shape example (numpy + a few host strings); one per epoch (its rng stream)."""

    def __init__(self, config, tokenizer, split: str, epoch: int):
        self.max_slices = int(config.max_slices)
        self.slice_dtype = np.dtype(config.slice_dtype)
        self.text_mode = config.text_mode
        if self.text_mode not in text.TEXT_MODES:
            raise records.DataError(f"data.text_mode={self.text_mode!r}: use one of {text.TEXT_MODES}")
        self.max_tokens = int(config.max_tokens)
        self.max_condition_tokens = int(config.max_condition_tokens)
        self.num_visual_tokens = int(config.num_visual_tokens)
        self.tokenizer = tokenizer
        self.ids = tokenizers.special_ids(tokenizer)
        self.prompt_ids = text.encode_prompt(tokenizer, self.num_visual_tokens)
        if len(self.prompt_ids) + 2 > self.max_tokens:
            raise records.DataError(f"data.max_tokens={self.max_tokens} leaves no room for a response after "
                                    f"the {len(self.prompt_ids)}-token prompt; raise max_tokens")
        self.rng_key = (int(config.seed), SPLITS.index(split), int(epoch))

    def __call__(self, record: dict) -> dict:
        rng = np.random.default_rng([*self.rng_key, int(record["index"])])
        labels = np.asarray(record["labels"], np.int32)
        n = record["slices"].shape[0]
        slices, z_mm, valid = pad_slices(record["slices"], record["z_mm"], self.max_slices, self.slice_dtype)
        response = text.response_text(record["report"], labels, self.text_mode, rng)
        chat, response_cut = text.encode_chat(self.tokenizer, self.prompt_ids, response, self.max_tokens,
                                              self.ids["pad"], self.ids["eot"])
        text.check_visual_placeholders(chat["input_ids"], self.ids["visual"], self.num_visual_tokens,
                                       f"volume {record['volume_name']}")
        conditions = text.condition_texts(record["report"], labels)
        cond_ids, cond_lengths, cond_cut = [], [], 0
        for condition in conditions:
            ids, length, cut = text.encode_padded(self.tokenizer, condition, self.max_condition_tokens,
                                                  self.ids["pad"])
            cond_ids.append(ids)
            cond_lengths.append(length)
            cond_cut += cut
        target = response if self.text_mode == "positive_findings" else text.positive_findings_text(
            record["report"], labels, rng)
        target_ids, target_length, target_cut = text.encode_padded(self.tokenizer, target, self.max_tokens,
                                                                   self.ids["pad"])
        return {
            "slices": slices, "z_mm": z_mm, "valid": valid, "num_slices": np.int32(n), "labels": labels,
            **chat,
            "condition_ids": np.stack(cond_ids), "condition_lengths": np.asarray(cond_lengths, np.int32),
            "condition_valid": labels.astype(bool),
            "target_ids": target_ids, "target_mask": np.arange(self.max_tokens) < target_length,
            "volume_name": record["volume_name"], "response": response, "condition_texts": conditions,
            _EVENTS_KEY: {"subsampled_slices": int(bool(record.get("subsampled"))),
                          "truncated_responses": int(response_cut), "truncated_condition_texts": cond_cut,
                          "truncated_targets": int(target_cut)},
        }


class ExampleSource:
    """grain RandomAccessDataSource of examples: reads a record and builds its example.

    Doing both here puts the file reading and the tokenisation in grain's reader threads.
    """

    def __init__(self, source, builder: ExampleBuilder, skip_bad_records: bool):
        self.source, self.builder, self.skip_bad_records = source, builder, skip_bad_records

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        if records.is_bad(record):
            return record
        try:
            return self.builder(record)
        except records.DataError as e:
            if not self.skip_bad_records:
                raise
            return records.bad_record(index, record["volume_name"], str(e))

    def __repr__(self) -> str:
        return f"ExampleSource({self.source!r})"


def collate(examples: list[dict]) -> dict:
    """Stack examples into a batch: arrays get a leading [B]; strings go to batch['meta']."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]
             if k not in META_KEYS and k != _EVENTS_KEY}
    batch["meta"] = {k: [e[k] for e in examples] for k in META_KEYS}
    return batch


def batch_sharding(mesh: Mesh, ndim: int, rules=sharding.AXIS_RULES):
    """NamedSharding with the leading axis on the logical 'batch' axis, the rest replicated."""
    spec = PartitionSpec("batch", *([None] * (ndim - 1)))
    return nn.logical_to_mesh_sharding(spec, mesh, rules)


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over 'batch' (meta stays on host)."""
    out = {}
    for key, value in batch.items():
        if key == "meta":
            out[key] = value
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


class BatchIterator:
    """One epoch of batches over this process's shard; checkpointable mid-epoch."""

    def __init__(self, pipeline: "Pipeline", epoch: int, state: dict | None = None):
        self.pipeline, self.epoch = pipeline, epoch
        self.report = records.EpochReport()
        self.report.skipped.extend(pipeline.index_skips)
        self._loader = pipeline.grain_loader(epoch)
        self._it = iter(self._loader)
        self._done = False
        if state is not None:
            self._it.set_state(state["grain"].encode())
            self.report.skipped.extend(state["skipped"])
            self.report.counts.update(state["counts"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        examples: list[dict] = []
        while len(examples) < self.pipeline.local_batch_size:
            try:
                example = next(self._it)
            except StopIteration:
                return self._finish(examples)
            if records.is_bad(example):
                self.report.skip(example[records.BAD_KEY])
                continue
            for event, n in example[_EVENTS_KEY].items():
                if n:
                    self.report.count(event, n)
            examples.append(example)
        self.report.count("examples", len(examples))
        return self.pipeline.finalize(collate(examples))

    def _finish(self, examples: list[dict]) -> dict:
        self._done = True
        if examples and not self.pipeline.config.drop_remainder:
            self.report.count("examples", len(examples))
            batch = self.pipeline.finalize(collate(examples))
        else:
            if examples:
                self.report.count("dropped_remainder", len(examples))
            batch = None
        self.report.log(self.epoch, self.pipeline.split)
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position: save it with the checkpoint."""
        return {"split": self.pipeline.split, "epoch": self.epoch,
                "grain": self._it.get_state().decode(),
                "skipped": list(self.report.skipped[len(self.pipeline.index_skips):]),
                "counts": dict(self.report.counts)}


class Pipeline:
    """The loader for one split: `epoch(e)` iterates it, `restore(state)` resumes mid-epoch."""

    def __init__(self, config, split: str, tokenizer=None, mesh: Mesh | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        self.config, self.split, self.mesh = config, split, mesh
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if config.batch_size % self.process_count:
            raise records.DataError(f"data.batch_size={config.batch_size} is not divisible by the "
                                    f"{self.process_count} processes; make it a multiple")
        self.local_batch_size = config.batch_size // self.process_count
        if config.num_workers < 0:
            raise records.DataError(f"data.num_workers={config.num_workers}: must be >= 0")
        self.source = make_source(config, split)
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config)
        self.index_skips = list(getattr(self.source, "index_skips", []))
        # Fail at construction, not in a reader thread, on a template without the placeholders.
        ExampleBuilder(config, self.tokenizer, split, 0)

    def grain_loader(self, epoch: int) -> grain.DataLoader:
        sampler = grain.samplers.IndexSampler(
            num_records=len(self.source),
            shard_options=grain.sharding.ShardOptions(
                shard_index=self.process_index, shard_count=self.process_count, drop_remainder=True),
            shuffle=bool(self.config.shuffle), num_epochs=1,
            seed=int(np.random.SeedSequence([int(self.config.seed), int(epoch)]).generate_state(1)[0] >> 1))
        examples = ExampleSource(self.source, ExampleBuilder(self.config, self.tokenizer, self.split, epoch),
                                 bool(self.config.skip_bad_records))
        return grain.DataLoader(
            data_source=examples, sampler=sampler, operations=(), worker_count=int(self.config.num_workers),
            read_options=grain.ReadOptions(num_threads=max(1, int(self.config.read_threads)),
                                           prefetch_buffer_size=max(8, 4 * self.local_batch_size)))

    def finalize(self, batch: dict) -> dict:
        return to_global(batch, self.mesh) if self.mesh is not None else batch

    def epoch(self, epoch: int) -> BatchIterator:
        return BatchIterator(self, epoch)

    def restore(self, state: dict) -> BatchIterator:
        """Continue the epoch saved in `state` (from `BatchIterator.get_state`) where it stopped."""
        if state.get("split") != self.split:
            raise records.DataError(f"data iterator state is for split {state.get('split')!r}, not {self.split!r}")
        return BatchIterator(self, int(state["epoch"]), state)

    def steps_per_epoch(self) -> int:
        """Batches per epoch before bad-record skips (shard size // local batch)."""
        return (len(self.source) // self.process_count) // self.local_batch_size

    @property
    def vocab_size(self) -> int:
        return tokenizers.vocab_size(self.tokenizer)


def state_to_json(state: dict) -> str:
    return json.dumps(state)


def state_from_json(payload: str) -> dict:
    return json.loads(payload)


def batch_spec(config, embed_dim: int | None = None) -> dict[str, Any]:
    """Per-example shapes/dtypes of a batch's arrays (without the leading [B])."""
    d = embed_dim or config.embed_dim
    c, t, tc, n = findings.NUM_CLASSES, config.max_tokens, config.max_condition_tokens, config.max_slices
    return {"slices": ((n, d), np.dtype(config.slice_dtype)), "z_mm": ((n,), np.float32),
            "valid": ((n,), bool), "num_slices": ((), np.int32), "labels": ((c,), np.int32),
            "input_ids": ((t,), np.int32), "loss_mask": ((t,), bool), "attention_mask": ((t,), bool),
            "condition_ids": ((c, tc), np.int32), "condition_lengths": ((c,), np.int32),
            "condition_valid": ((c,), bool), "target_ids": ((t,), np.int32), "target_mask": ((t,), bool)}
