"""grain input pipeline: records -> padded examples -> batches -> global arrays on the mesh.

Use (what the trainer does):
  tok = make_tokenizer(config.data)                        # HF folder, or the cached synthetic BPE
  data = Pipeline(config.data, "train", tok, mesh)         # mesh=None: host numpy batches
  for epoch in range(start, epochs):
      it = data.epoch(epoch, join)  (or data.restore(saved_state, join) to resume mid-epoch)
      for batch in it: ...;  saved_state = it.get_state()  # JSON-able, store with the checkpoint
`join` (optional): host batch -> host batch, applied on each process to its own rows before they
are placed on the mesh, e.g. the trainer's per-record tables looked up by record_index
(training/feature_cache.py); it is no part of the iterator's state.

Per epoch, a grain `DataLoader` reads this process's shard (`jax.process_index()` of
`jax.process_count()`, or the `process_index`/`process_count` given) of the source in an order
shuffled from (seed, epoch). Records become fixed-shape examples in grain's reader threads (and
`num_workers` worker processes). A batch is a dict; B = data.batch_size (global), N = max_slices,
D = embed_dim, C = 18 classes, T = max_tokens, Tc = max_condition_tokens:
  slices            [B, N, D]  slice_dtype   zero past num_slices (volumes over N: subsampled or error)
  z_mm              [B, N]     float32       physical z of each slice (mm), 0 past num_slices
  valid             [B, N]     bool          slice i < num_slices
  num_slices        [B]        int32
  labels            [B, C]     int32         0/1
  input_ids         [B, T]     int32         chat: prompt (32 <|visual_region|>) + response + <|eot_id|>, padded
  loss_mask         [B, T]     bool          response tokens and the closing <|eot_id|> only
  attention_mask    [B, T]     bool          not padding
  condition_ids     [B, C, Tc] int32         per-condition texts (MMD / InfoNCE targets), padded
  condition_lengths [B, C]     int32         0 for absent classes
  condition_valid   [B, C]     bool          = labels
  target_ids        [B, T]     int32         the positive findings in class order, no template (InfoNCE / JEPA target)
  target_mask       [B, T]     bool
  record_index      [B]        int32         the record's index in its split
  meta              dict of host lists [B]: volume_name, response (the text trained on),
                    condition_texts ([C] strings)
With a mesh, every array is a global jax.Array with [B] on the logical 'batch' axis (mesh axes
data x fsdp), the rest replicated; `batch_spec(config)` gives the per-example shapes and dtypes.
The iterator state (epoch + grain position + the epoch's counts) goes into the checkpoint, so a
resumed run continues mid-epoch with exactly the batches it would have seen. Skipped bad records,
subsampled volumes, truncated texts and dropped remainders are counted and logged at epoch end.

Speed (benchmarks/loader.py): grain reads one element per local batch (`ChunkSource`), so its
per-element cost is paid once per batch; a .npy is read with one preadv straight into its row
of a batch buffer recycled from `BufferPool` once nothing refers to it; each volume's lexicon and
tokenizer work (sentence ids, padded per-condition block) is cached in the Pipeline
(`text_cache`, in-process readers) and an unchanged file is scanned for NaN/Inf once; per epoch a
volume costs a class-order draw (keys drawn per block of records) and an id concatenation, and
`ExampleBuilder.collate` writes a batch's fixed-shape arrays in a few vectorised steps. Host
strings travel as one opaque leaf (`HostPart`): grain walks every leaf of an element.
read_threads=0 reads in the iterating thread (one batch buffer in flight besides the caller's);
with `num_workers > 0` every epoch starts new worker processes (seconds each) that redo the text
work: use it when the in-process readers are the bottleneck.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
from typing import Any, Callable, Iterator

import flax.linen as nn
import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kervljepa_jax import findings, sharding
from kervljepa_jax.data import SPLITS, ctrate, records, synthetic, text, tokenizer as tokenizers

META_KEYS = ("volume_name", "response", "condition_texts")
_RANK_BLOCK = 1024     # records per draw of class-order keys


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

        def reports():
            return source.texts()[0]
    else:
        path = ctrate.resolve(config.root, config.reports_csv["train"])
        stat = os.stat(path) if os.path.isfile(path) else None
        key = f"ctrate|{os.path.abspath(path)}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}"

        def reports():
            return [fields["Findings_EN"] for _, fields in
                    ctrate.read_csv(path, ctrate.REPORT_COLUMNS, "reports_csv.train")]

    def corpus():
        return tokenizer_fixed_texts(config.num_visual_tokens) + reports()
    return tokenizers.build_tokenizer(config, corpus, key)


def tokenizer_fixed_texts(num_visual_tokens: int) -> list[str]:
    """What a BPE must know whatever its corpus: the chat prompt, the normal and fallback sentences."""
    return [text.chat_prompt(num_visual_tokens), findings.NORMAL_SENTENCE,
            *(f.fallback_sentence for f in findings.FINDINGS)]


def stack_slices(slices: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """[n_b, D] each -> out [B, N_max, D], zeros past n_b. Rows the source already read into
    place (see `ChunkSource`) are not copied again; the rest are copied once."""
    start, row_bytes = out.__array_interface__["data"][0], out.strides[0]
    owner = out if out.base is None else out.base
    for b, x in enumerate(slices):
        n = x.shape[0]
        in_place = (x.base is owner and x.dtype == out.dtype
                    and x.__array_interface__["data"][0] == start + b * row_bytes)
        if not in_place:
            out[b, :n] = x
        if n < out.shape[1]:
            out[b, n:] = 0
    return out


@dataclasses.dataclass(frozen=True)
class VolumeText:
    """The epoch-independent text work of one volume, done once per Pipeline (`text_cache`).

    The lexicon pass over the report and the tokenisation of its sentences and per-condition
    texts are pure functions of (report, labels); per epoch only the class order of the
    positive-findings text changes, and its ids are joined from `sentence_ids`.
    """
    segments: dict                      # positive class -> its report sentences (or fallback)
    condition_texts: list               # [C] strings, "" for absent classes
    condition_classes: np.ndarray       # [k] int64: the positive classes
    condition_block: np.ndarray         # [k, Tc] int32: their padded per-condition ids
    condition_lengths: np.ndarray       # [C] int32: kept lengths, 0 for absent classes
    condition_cuts: int                 # per-condition texts cut to Tc
    sentence_ids: dict | None           # text.sentence_token_table of the positive sentences
    report_ids: np.ndarray | None       # raw mode: the Findings_EN ids, int32
    target: tuple                       # (text, int32 ids): the findings in class order (contrastive / JEPA target)


class ExampleBuilder:
    """Record -> example, examples -> batch; one per epoch (its rng stream).

    An example holds the per-volume, variable-length parts (slices [n, D] as the source read
    them, possibly a view of the batch row they were read into; z_mm [n]; the response and
    target ids; the cached `VolumeText`); `collate` writes a batch of them into fixed-shape
    arrays in a few vectorised steps.
    """

    def __init__(self, config, tokenizer, split: str, epoch: int, text_cache: dict | None = None,
                 prompt_ids: np.ndarray | None = None):
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
        self.prompt_ids = (text.encode_prompt(tokenizer, self.num_visual_tokens) if prompt_ids is None
                           else prompt_ids)
        if len(self.prompt_ids) + 2 > self.max_tokens:
            raise records.DataError(f"data.max_tokens={self.max_tokens} leaves no room for a response after "
                                    f"the {len(self.prompt_ids)}-token prompt; raise max_tokens")
        self.rng_key = (int(config.seed), SPLITS.index(split), int(epoch))
        self._ranks: dict[int, np.ndarray] = {}     # index block -> [block, C] class sort keys
        self.text_cache = text_cache

    def volume_text(self, record: dict) -> VolumeText:
        key = int(record["index"])
        cached = self.text_cache.get(key) if self.text_cache is not None else None
        if cached is not None:
            return cached
        segments = text.class_segments(record["report"], record["labels"])
        conditions = text.condition_texts_from_segments(segments)
        batch = [conditions[c] for c in segments] + ([record["report"]] if self.text_mode == "raw" else [])
        encoded = text.encode_texts(self.tokenizer, batch)
        rows = [text.pad_ids(ids, self.max_condition_tokens, self.ids["pad"]) for ids in encoded[:len(segments)]]
        lengths = np.zeros(findings.NUM_CLASSES, np.int32)
        lengths[list(segments)] = [length for _, length, _ in rows]
        sentences = [s for c in segments for s in segments[c]] or [findings.NORMAL_SENTENCE]
        table = text.sentence_token_table(self.tokenizer, sentences)
        canonical = text.ordered_sentences(segments)
        target = (" ".join(canonical),
                  text.joined_ids(canonical, table) if table is not None else
                  np.asarray(text.encode_texts(self.tokenizer, [" ".join(canonical)])[0], np.int32))
        volume = VolumeText(
            segments, conditions, condition_classes=np.fromiter(segments, np.int64, len(segments)),
            condition_block=np.stack([row for row, _, _ in rows]) if rows else
            np.zeros((0, self.max_condition_tokens), np.int32),
            condition_lengths=lengths, condition_cuts=sum(cut for _, _, cut in rows), sentence_ids=table,
            report_ids=np.asarray(encoded[-1], np.int32) if self.text_mode == "raw" else None, target=target)
        # A report holding the literal placeholder text would add placeholders to the chat.
        texts_ids = [i for pair in (table or {}).values() for i in pair]
        texts_ids += [volume.report_ids] if volume.report_ids is not None else []
        if table is None or any((ids == self.ids["visual"]).any() for ids in texts_ids):
            self._check_placeholder_free(record, volume)
        if self.text_cache is not None:
            self.text_cache[key] = volume      # a race only repeats the same work
        return volume

    def _check_placeholder_free(self, record: dict, volume: VolumeText) -> None:
        texts = [record["report"]] if self.text_mode == "raw" else []
        texts += [s for c in volume.segments for s in volume.segments[c]]
        for ids in text.encode_texts(self.tokenizer, texts):
            if self.ids["visual"] in ids:
                raise records.DataError(f"volume {record['volume_name']}: the report contains the "
                                        f"{text.VISUAL_TOKEN} token text; remove it from the report")

    def class_ranks(self, index: int) -> list[float]:
        """[C] random sort keys of one record's classes for this epoch, a function of (seed, split,
        epoch, index) only: drawn for blocks of indices at once (one numpy call per block, not a
        seeded generator per record) and kept for the epoch."""
        block, row = divmod(index, _RANK_BLOCK)
        ranks = self._ranks.get(block)
        if ranks is None:    # a race only draws the same block twice
            rng = np.random.default_rng([*self.rng_key, block])
            ranks = self._ranks.setdefault(block, rng.random((_RANK_BLOCK, findings.NUM_CLASSES), np.float32))
        return ranks[row].tolist()

    def positive_findings(self, volume: VolumeText, record: dict) -> tuple[str, np.ndarray]:
        """This epoch's positive-findings text (class order from (seed, epoch, index)) and its ids."""
        if len(volume.segments) <= 1:     # nothing to shuffle: the same text every epoch
            return volume.target
        order = sorted(volume.segments, key=self.class_ranks(int(record["index"])).__getitem__)
        sentences = text.ordered_sentences(volume.segments, order)
        if volume.sentence_ids is not None:
            return " ".join(sentences), text.joined_ids(sentences, volume.sentence_ids)
        response = " ".join(sentences)
        return response, np.asarray(text.encode_texts(self.tokenizer, [response])[0], np.int32)

    def __call__(self, record: dict) -> dict:
        volume = self.volume_text(record)
        # The response (the LM's text) draws its class order each epoch; the contrastive / JEPA
        # target is a function of the volume alone, so that its embedding can be cached.
        target, target_ids = volume.target
        if self.text_mode == "raw":
            response, response_ids = record["report"], volume.report_ids
        else:
            response, response_ids = self.positive_findings(volume, record)
        return {"index": int(record["index"]),
                "slices": record["slices"], "z_mm": record["z_mm"], "labels": np.asarray(record["labels"], np.int32),
                "response_ids": response_ids, "target_ids": target_ids, "volume": volume,
                "subsampled": bool(record.get("subsampled")),
                "volume_name": record["volume_name"], "response": response,
                "condition_texts": volume.condition_texts}

    def collate(self, examples: list[dict], slices_out: np.ndarray | None = None) -> tuple[dict, dict]:
        """Examples -> (batch with a leading [B] on every array, strings in batch['meta'];
        the batch's event counts). Slices are padded to N_max into `slices_out` [B, N_max, D]."""
        b_size, n_max, t_max, p = len(examples), self.max_slices, self.max_tokens, len(self.prompt_ids)
        pad, room = self.ids["pad"], self.max_tokens - len(self.prompt_ids)
        z_mm = np.zeros((b_size, n_max), np.float32)
        input_ids = np.full((b_size, t_max), pad, np.int32)
        input_ids[:, :p] = self.prompt_ids
        target_ids = np.full((b_size, t_max), pad, np.int32)
        condition_ids = np.full((b_size, findings.NUM_CLASSES, self.max_condition_tokens), pad, np.int32)
        lengths = []                          # (slices, response, target) per row, Python ints
        for b, e in enumerate(examples):      # the variable-length parts: one copy each
            z, response, target, volume = e["z_mm"], e["response_ids"], e["target_ids"], e["volume"]
            z_mm[b, : len(z)] = z
            input_ids[b, p: p + min(len(response), room)] = response[:room]
            target_ids[b, : min(len(target), t_max)] = target[:t_max]
            condition_ids[b, volume.condition_classes] = volume.condition_block
            lengths.append((len(z), len(response), len(target)))
        num_slices, response_len, target_len = np.array(lengths, np.int64).T
        num_slices = num_slices.astype(np.int32)
        # Prompt + response + <|eot_id|> when it fits (a cut response has none), as text.chat_arrays.
        body, kept = np.minimum(response_len, room), np.minimum(response_len + 1, room)
        closed = np.flatnonzero(kept > body)
        input_ids[closed, p + body[closed]] = self.ids["eot"]
        tokens = np.arange(t_max)
        attention_mask = tokens < (p + kept)[:, None]
        labels = np.stack([e["labels"] for e in examples])
        if slices_out is None:
            slices_out = np.empty((b_size, n_max, examples[0]["slices"].shape[1]), self.slice_dtype)
        batch = {
            "slices": stack_slices([e["slices"] for e in examples], slices_out),
            "z_mm": z_mm, "valid": np.arange(n_max) < num_slices[:, None], "num_slices": num_slices,
            "labels": labels, "input_ids": input_ids, "loss_mask": attention_mask & (tokens >= p),
            "attention_mask": attention_mask, "condition_ids": condition_ids,
            "condition_lengths": np.stack([e["volume"].condition_lengths for e in examples]),
            "condition_valid": labels.astype(bool), "target_ids": target_ids,
            "target_mask": tokens < np.minimum(target_len, t_max)[:, None],
            "record_index": np.array([e["index"] for e in examples], np.int32),
            "meta": {k: [e[k] for e in examples] for k in META_KEYS},
        }
        events = {"subsampled_slices": sum(e["subsampled"] for e in examples),
                  "truncated_responses": int((response_len + 1 > room).sum()),
                  "truncated_condition_texts": sum(e["volume"].condition_cuts for e in examples),
                  "truncated_targets": int((target_len > t_max).sum())}
        return batch, {k: v for k, v in events.items() if v}


class ExampleSource:
    """grain RandomAccessDataSource of examples: reads a record and builds its example.

    Doing both here puts the file reading and the tokenisation in grain's reader threads.
    """

    def __init__(self, source, builder: ExampleBuilder, skip_bad_records: bool):
        self.source, self.builder, self.skip_bad_records = source, builder, skip_bad_records

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, slot: np.ndarray | None = None) -> dict:
        """Example `index`; a source with `get(index, slot)` may read its slices into slot."""
        if slot is not None and hasattr(self.source, "get"):
            record = self.source.get(index, slot)
        else:
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


def num_rows(batch: dict) -> int:
    return len(batch["meta"]["volume_name"]) if batch else 0


def split_rows(parts: list[dict], k: int) -> tuple[dict, list[dict]]:
    """The first k rows of consecutive partial batches, and the rest (rare: after skipped records)."""
    if len(parts) == 1 and num_rows(parts[0]) == k:
        return parts[0], []
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "meta"}
    joined["meta"] = {key: [v for p in parts for v in p["meta"][key]] for key in META_KEYS}
    head = {key: v[:k] for key, v in joined.items() if key != "meta"}
    head["meta"] = {key: v[:k] for key, v in joined["meta"].items()}
    if num_rows(joined) == k:
        return head, []
    rest = {key: v[k:] for key, v in joined.items() if key != "meta"}
    rest["meta"] = {key: v[k:] for key, v in joined["meta"].items()}
    return head, [rest]


class BufferPool:
    """Batch slice buffers [B, N_max, D], reused once nothing outside the pool refers to them.

    Fresh memory costs a page fault per 4 KiB on first write (in a VM about as much as reading
    the data from the page cache), so the loader recycles its batch buffers, and the page cache
    copy goes into memory that is already mapped. A buffer counts as free when only the pool
    holds it: any batch, view or in-flight device transfer of it keeps a reference, so a buffer
    is never handed out while its data can still be read. Not pickled: each grain worker
    process starts its own (empty) pool.
    """

    # Reference counts are exact only with the GIL; without it the pool always allocates.
    _ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)() and sys.implementation.name == "cpython"

    def __init__(self, max_buffers: int):
        self.max_buffers = max_buffers
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            for buffer in self._buffers:
                # 3 references: the list, `buffer` and getrefcount's argument (no enumerate: its
                # reused result tuple would hold a fourth).
                if sys.getrefcount(buffer) == 3 and buffer.shape == shape and buffer.dtype == dtype:
                    return buffer
            buffer = np.empty(shape, dtype)
            if self._ENABLED and len(self._buffers) < self.max_buffers:
                self._buffers.append(buffer)
            return buffer

    def __getstate__(self) -> dict:
        return {"max_buffers": self.max_buffers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_buffers"])


@dataclasses.dataclass
class HostPart:
    """A chunk's host-only values as one opaque leaf: grain walks every leaf of each element for
    its statistics, and the [B] x [C] condition strings alone are ~150 leaves."""
    meta: dict        # batch['meta'] ({} when every record of the chunk was skipped)
    skipped: list     # one-line messages of the chunk's skipped records
    events: dict      # event -> count (subsampled, truncated ...)


def chunk_batch(chunk: dict) -> dict:
    """The batch of a `ChunkSource` element ({} when it has no rows)."""
    return {**chunk["arrays"], "meta": chunk["host"].meta} if chunk["host"].meta else {}


class ChunkSource:
    """grain data source over one epoch's shard: element j is the collated batch of the examples
    at order[j*K:(j+1)*K] (K = the local batch size), with its skipped records and events.

    One grain element per batch, not per volume: grain's per-element cost (~0.2 ms) would
    otherwise be most of a volume's loading time, and the collation runs in the reader threads.
    """

    def __init__(self, examples: ExampleSource, order: np.ndarray, chunk: int, slice_shape: tuple[int, int],
                 slice_dtype: str, pool: BufferPool | None = None):
        self.examples, self.order, self.chunk = examples, order, chunk
        self.slice_shape, self.slice_dtype = tuple(slice_shape), np.dtype(slice_dtype)
        self.pool = pool if pool is not None else BufferPool(0)

    def __len__(self) -> int:
        return -(-len(self.order) // self.chunk)

    def __getitem__(self, j: int) -> dict:
        indices = self.order[j * self.chunk:(j + 1) * self.chunk]
        # The batch's slices, allocated first so that sources read each volume into its row.
        slices = self.pool.take((len(indices), *self.slice_shape), self.slice_dtype)
        good, skipped = [], []
        for index in indices:
            example = self.examples.get(int(index), slices[len(good)])
            if records.is_bad(example):
                skipped.append(example[records.BAD_KEY])
            else:
                good.append(example)
        batch, events = self.examples.builder.collate(good, slices[: len(good)]) if good else ({"meta": {}}, {})
        meta = batch.pop("meta")
        return {"arrays": batch, "host": HostPart(meta, skipped, events)}

    def __repr__(self) -> str:
        return f"ChunkSource({self.examples!r}, records={len(self.order)}, chunk={self.chunk})"


def batch_sharding(mesh: Mesh, ndim: int, rules=sharding.AXIS_RULES):
    """NamedSharding with the leading axis on the logical 'batch' axis, the rest replicated."""
    spec = PartitionSpec("batch", *([None] * (ndim - 1)))
    return nn.logical_to_mesh_sharding(spec, mesh, rules)


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over 'batch' (meta stays on host).

    A batch whose rows do not split evenly over the mesh's batch shards (the last validation batch
    of 12 volumes on 8 devices) is placed whole on every device instead: jit's own batch
    constraints pad an uneven split, array placement cannot. One process only: across processes
    the rows differ per process, so there the count must divide."""
    rows = next((len(v) for k, v in batch.items() if k != "meta"), 0)
    shards = sharding.batch_shards(dict(mesh.shape))
    even = rows * jax.process_count() % shards == 0
    if not even and jax.process_count() > 1:
        raise records.DataError(f"a batch of {rows} rows per process does not split over the mesh's {shards} batch "
                                f"shards; make data.batch_size and the validation volume count multiples of {shards}")
    out = {}
    for key, value in batch.items():
        if key == "meta":
            out[key] = value
            continue
        target = batch_sharding(mesh, value.ndim) if even else NamedSharding(mesh, PartitionSpec())
        out[key] = jax.make_array_from_process_local_data(target, value)
    return out


class BatchIterator:
    """One epoch of batches over this process's shard; checkpointable mid-epoch.

    grain yields one collated chunk per local batch; after skipped records a batch is made of
    the rows of consecutive chunks. Rows left over after a batch always come from the last
    chunk read, so the position is (grain state before that chunk, rows of it already used).
    """

    def __init__(self, pipeline: "Pipeline", epoch: int, state: dict | None = None,
                 join: Callable[[dict], dict] | None = None):
        self.pipeline, self.epoch, self.join = pipeline, epoch, join
        self.report = records.EpochReport()
        self.report.skipped.extend(pipeline.index_skips)
        self._loader = pipeline.grain_loader(epoch)
        self._it = iter(self._loader)
        self._pending: list[dict] = []        # partial batches not yet emitted, in order
        self._last = (self._grain_state(), 0)  # (grain state before the last chunk with rows, its rows)
        self._done = False
        if state is not None:
            self._resume(state)

    def _grain_state(self) -> str:
        return self._it.get_state().decode()

    def _resume(self, state: dict) -> None:
        self._it.set_state(state["grain"].encode())
        self.report.skipped.extend(state["skipped"])
        self.report.counts.update(state["counts"])
        used = int(state.get("rows_used", 0))
        if used:    # re-read the partly used chunk; its skips and events are already counted
            chunk = chunk_batch(next(self._it))
            self._last = (state["grain"], num_rows(chunk))
            self._pending = split_rows([chunk], used)[1]

    def _read_chunk(self) -> bool:
        """Append the next chunk's rows to the pending ones; False at the end of the epoch."""
        before = self._grain_state()
        try:
            chunk = next(self._it)
        except StopIteration:
            return False
        for message in chunk["host"].skipped:
            self.report.skip(message)
        for event, n in chunk["host"].events.items():
            self.report.count(event, n)
        batch = chunk_batch(chunk)
        if batch:
            self._pending.append(batch)
            self._last = (before, num_rows(batch))
        return True

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        size = self.pipeline.local_batch_size
        while sum(map(num_rows, self._pending)) < size:
            if not self._read_chunk():
                return self._finish()
        batch, self._pending = split_rows(self._pending, size)
        self.report.count("examples", size)
        return self._emit(batch)

    def _finish(self) -> dict:
        self._done = True
        rows = sum(map(num_rows, self._pending))
        batch = None
        if rows and not self.pipeline.config.drop_remainder:
            self.report.count("examples", rows)
            batch = self._emit(split_rows(self._pending, rows)[0])
        elif rows:
            self.report.count("dropped_remainder", rows)
        self._pending = []
        # Equal shards: the last len % process_count records of the shuffled order go unread.
        shard_rest = len(self.pipeline.source) % self.pipeline.process_count
        if shard_rest:
            self.report.count("dropped_shard_remainder", shard_rest)
        self.report.log(self.epoch, self.pipeline.split)
        if batch is None:
            raise StopIteration
        return batch

    def _emit(self, batch: dict) -> dict:
        """The host batch joined here, in the main process (`join` may hold large tables that
        worker processes never see), then placed on the mesh when the pipeline has one."""
        if self.join is not None:
            batch = self.join(batch)
        return to_global(batch, self.pipeline.mesh) if self.pipeline.mesh is not None else batch

    def get_state(self) -> dict:
        """JSON-serialisable position: save it with the checkpoint."""
        left = sum(map(num_rows, self._pending))
        grain_state, rows_used = (self._last[0], self._last[1] - left) if left else (self._grain_state(), 0)
        return {"split": self.pipeline.split, "epoch": self.epoch, "grain": grain_state, "rows_used": rows_used,
                "skipped": list(self.report.skipped[len(self.pipeline.index_skips):]),
                "counts": dict(self.report.counts)}


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """[N, C] 0/1 labels -> [N] repeat factors (LVIS repeat-factor sampling, Gupta et al. 2019).

    A class present in a fraction f_c of the records gets r_c = max(1, sqrt(threshold / f_c)); a
    record gets the largest r_c of its positive classes (1 for a normal one). Rare findings are then
    seen more often (and the common findings that share their volumes with them).
    """
    labels = np.asarray(labels) > 0
    frequency = labels.mean(axis=0) if len(labels) else np.zeros(labels.shape[1])
    per_class = np.sqrt(threshold / np.maximum(frequency, 1e-12))
    per_class = np.where(frequency > 0, np.maximum(1.0, per_class), 1.0)
    return np.where(labels, per_class[None, :], 1.0).max(axis=1, initial=1.0)


def repeat_factor_order(factors: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch of `n` record indices: record i repeated floor(r_i) times plus once more with
    probability frac(r_i), shuffled, then cut to n so that an epoch keeps its number of steps."""
    copies = np.floor(factors).astype(np.int64) + (rng.random(len(factors)) < factors - np.floor(factors))
    order = rng.permutation(np.repeat(np.arange(len(factors)), copies))
    return order[:n]


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
        for flag in ("num_workers", "read_threads", "repeat_factor_threshold"):
            if float(config.get(flag, 0)) < 0:
                raise records.DataError(f"data.{flag}={config[flag]}: must be >= 0")
        self.source = make_source(config, split)
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config)
        self.index_skips = list(getattr(self.source, "index_skips", []))
        # Epoch-independent text per volume, filled as volumes are first read. Only for in-process
        # readers: worker processes could not hand their work back, so they redo it each epoch.
        use_cache = config.get("cache_text", True) and int(config.num_workers) == 0
        self.text_cache: dict[int, VolumeText] | None = {} if use_cache else None
        # Enough for every chunk in flight (prefetch) plus the batches the trainer holds.
        self.buffer_pool = BufferPool(4 * max(1, int(config.read_threads)) + 8)
        # Fail at construction, not in a reader thread, on a template without the placeholders.
        self.prompt_ids = ExampleBuilder(config, self.tokenizer, split, 0).prompt_ids

    def text_rows(self) -> dict[str, np.ndarray]:
        """Every record's texts exactly as its batches carry them, without reading a slice:
        condition_ids [N, C, Tc], condition_lengths [N, C], target_ids [N, T], target_lengths [N].
        A record whose text is unusable gets empty rows when data.skip_bad_records (it is skipped
        when read) and raises otherwise."""
        builder = ExampleBuilder(self.config, self.tokenizer, self.split, 0, self.text_cache, self.prompt_ids)
        reports, labels = self.source.texts()
        n, c = len(reports), findings.NUM_CLASSES
        t, tc, pad = builder.max_tokens, builder.max_condition_tokens, builder.ids["pad"]
        rows = {"condition_ids": np.full((n, c, tc), pad, np.int32), "condition_lengths": np.zeros((n, c), np.int32),
                "target_ids": np.full((n, t), pad, np.int32), "target_lengths": np.zeros(n, np.int32)}
        for i, (report, label) in enumerate(zip(reports, labels)):
            record = {"index": i, "report": report, "labels": label,
                      "volume_name": f"record {i} of the {self.split} split"}
            try:
                volume = builder.volume_text(record)
            except records.DataError:
                if not self.config.skip_bad_records:
                    raise
                continue
            rows["condition_ids"][i, volume.condition_classes] = volume.condition_block
            rows["condition_lengths"][i] = volume.condition_lengths
            ids = volume.target[1][:t]
            rows["target_ids"][i, :len(ids)] = ids
            rows["target_lengths"][i] = len(ids)
        return rows

    def ordered_batches(self) -> Iterator[dict]:
        """Every record of the split once, in index order, as process-local numpy batches of
        data.batch_size / processes rows (the last one shorter): no shuffle, no repeat factors and
        no sharding over processes, so that each process sees all of them. Bad records are left
        out when data.skip_bad_records (and raise otherwise), as in an epoch."""
        builder = ExampleBuilder(self.config, self.tokenizer, self.split, 0, self.text_cache, self.prompt_ids)
        examples = ExampleSource(self.source, builder, bool(self.config.skip_bad_records))
        chunks = ChunkSource(examples, np.arange(len(self.source)), self.local_batch_size,
                             (int(self.config.max_slices), int(self.config.embed_dim)), self.config.slice_dtype)
        for j in range(len(chunks)):
            batch = chunk_batch(chunks[j])
            if batch:
                yield batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This process's record indices for an epoch: a (seed, epoch) permutation of all records
        (or, with data.repeat_factor_threshold on the train split, N draws of `repeat_factor_order`),
        cut to a multiple of process_count and dealt round-robin to the processes."""
        n = len(self.source)
        rng = np.random.default_rng([int(self.config.seed), int(epoch)])
        if self.repeat_factors is not None:
            order = repeat_factor_order(self.repeat_factors, n, rng)
        else:
            order = rng.permutation(n) if self.config.shuffle else np.arange(n)
        return order[: n - n % self.process_count][self.process_index::self.process_count]

    @functools.cached_property
    def repeat_factors(self) -> np.ndarray | None:
        """[N] per-record repeat factors of the train split when data.repeat_factor_threshold > 0."""
        threshold = float(self.config.get("repeat_factor_threshold", 0.0))
        if threshold == 0 or self.split != "train" or not self.config.shuffle:
            return None
        _, labels = self.source.texts()
        return repeat_factors(np.stack(labels) if labels else np.zeros((0, findings.NUM_CLASSES)), threshold)

    def grain_loader(self, epoch: int) -> grain.DataLoader:
        text_cache = self.text_cache if int(self.config.num_workers) == 0 else None
        examples = ExampleSource(self.source, ExampleBuilder(self.config, self.tokenizer, self.split, epoch,
                                                             text_cache, self.prompt_ids),
                                 bool(self.config.skip_bad_records))
        chunks = ChunkSource(examples, self.epoch_order(epoch), self.local_batch_size,
                             (int(self.config.max_slices), int(self.config.embed_dim)), self.config.slice_dtype,
                             self.buffer_pool)
        if self.config.num_workers > 0 and not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside app.run (notebooks, tests) none
            # were parsed, so take the defaults rather than fail in the first worker.
            flags.FLAGS.mark_as_parsed()
        # 0 threads: chunks are read in the iterating thread (no prefetch, one batch buffer in use).
        threads = int(self.config.read_threads)
        return grain.DataLoader(
            data_source=chunks, worker_count=int(self.config.num_workers),
            sampler=grain.samplers.IndexSampler(num_records=len(chunks), shard_options=grain.sharding.NoSharding(),
                                                shuffle=False, num_epochs=1),
            read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))

    def epoch(self, epoch: int, join: Callable[[dict], dict] | None = None) -> BatchIterator:
        """One epoch's batches, each host batch passed through `join` before placement."""
        return BatchIterator(self, epoch, join=join)

    def restore(self, state: dict, join: Callable[[dict], dict] | None = None) -> BatchIterator:
        """Continue the epoch saved in `state` (from `BatchIterator.get_state`) where it stopped."""
        if state.get("split") != self.split:
            raise records.DataError(f"data iterator state is for split {state.get('split')!r}, not {self.split!r}")
        return BatchIterator(self, int(state["epoch"]), state, join)

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
            "condition_valid": ((c,), bool), "target_ids": ((t,), np.int32), "target_mask": ((t,), bool),
            "record_index": ((), np.int32)}
