"""Loader throughput: the training input pipeline against a plain np.load loop, same files, one run.

Writes --num_volumes synthetic volumes of [--slices, --dim] float16 slice embeddings in the
CT-RATE layout (`data.synthetic.write_ctrate_layout`) into a temporary folder, then times, with
the page cache warm for both and alternating the order over --repeats rounds (best round each):
  raw       for each file: np.load(path)                       (reading only)
  pipeline  Pipeline(config, "train", tokenizer).epoch(e): CT-RATE source -> record checks
            (finite, width, slice count) -> full training examples (padded slices, chat
            tokens, 18 condition texts, target text) -> collated host batches of --batch_size.
            The path training uses, minus the host->device copy (mesh=None), which depends on
            the accelerator, not on the loader.
volumes_per_s is the steady state (epochs after the first: each volume's lexicon/tokenizer work
is cached and an unchanged file is not scanned for NaN/Inf again); first_epoch_volumes_per_s is
the first epoch of a fresh Pipeline, which does both.
Ends with one JSON line: {"volumes_per_s", "raw_volumes_per_s", "fraction_of_raw", ...}.

  python benchmarks/loader.py [--num_volumes=64] [--read_threads=8] [--num_workers=0]
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from kervljepa_jax.data import default_data_config, pipeline, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_volumes", 64, "Training volumes written and read.")
flags.DEFINE_integer("slices", 600, "Slices per volume (N).")
flags.DEFINE_integer("dim", 1024, "Slice embedding width (D).")
flags.DEFINE_integer("batch_size", 8, "Batch size of the pipeline.")
flags.DEFINE_integer("read_threads", 8, "grain reader threads (data.read_threads).")
flags.DEFINE_integer("num_workers", 0, "grain worker processes (data.num_workers).")
flags.DEFINE_integer("repeats", 3, "Timed rounds of each (the best is reported).")
flags.DEFINE_string("dir", "", "Folder to write into (default: a temporary folder, removed after).")


def data_config(root: str, workdir: str):
    c = default_data_config()
    c.source, c.root, c.workdir = "ctrate", root, workdir
    c.embed_dim, c.max_slices = FLAGS.dim, FLAGS.slices
    c.min_synthetic_slices = c.max_synthetic_slices = FLAGS.slices
    c.num_train, c.num_valid = FLAGS.num_volumes, 1
    c.batch_size, c.read_threads, c.num_workers = FLAGS.batch_size, FLAGS.read_threads, FLAGS.num_workers
    c.drop_remainder = False      # every volume is counted
    return c


def time_raw(files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        x = np.load(path)
        assert x.shape == (FLAGS.slices, FLAGS.dim)
    return len(files) / (time.perf_counter() - start)


def time_pipeline(loader: pipeline.Pipeline, epoch: int) -> float:
    start = time.perf_counter()
    volumes = sum(batch["slices"].shape[0] for batch in loader.epoch(epoch))
    rate = volumes / (time.perf_counter() - start)
    assert volumes == FLAGS.num_volumes, volumes
    return rate


def run(root: str) -> dict:
    config = data_config(root, os.path.join(root, "work"))
    logging.info("writing %d volumes of [%d, %d] float16 under %s", FLAGS.num_volumes, FLAGS.slices, FLAGS.dim, root)
    synthetic.write_ctrate_layout(root, config, file_format="npy", dtype="float16")
    files = sorted(glob.glob(os.path.join(root, "embeddings", "train", "*.npy")))
    tokenizer = pipeline.make_tokenizer(config)            # trained + cached once, not timed
    loader = pipeline.Pipeline(config, "train", tokenizer)  # CSV index built once, not timed
    time_raw(files)                                         # warm the page cache for both
    first = time_pipeline(loader, 0)                        # text work and NaN/Inf scans happen here
    raw, piped = [], []
    for r in range(FLAGS.repeats):
        if r % 2:
            piped.append(time_pipeline(loader, r + 1))
            raw.append(time_raw(files))
        else:
            raw.append(time_raw(files))
            piped.append(time_pipeline(loader, r + 1))
    logging.info("raw np.load volumes/s per round: %s", [round(x, 1) for x in raw])
    logging.info("pipeline volumes/s per round: %s", [round(x, 1) for x in piped])
    return {"volumes_per_s": round(max(piped), 2), "raw_volumes_per_s": round(max(raw), 2),
            "fraction_of_raw": round(max(piped) / max(raw), 3),
            "first_epoch_volumes_per_s": round(first, 2),
            "measured": "full training examples (slices + text) as host batches; volumes_per_s: epochs after "
                        "the first (per-volume text cached, unchanged files not rescanned for NaN/Inf)",
            "num_volumes": FLAGS.num_volumes, "shape": [FLAGS.slices, FLAGS.dim], "dtype": "float16",
            "batch_size": FLAGS.batch_size, "read_threads": FLAGS.read_threads,
            "num_workers": FLAGS.num_workers, "cpus": os.cpu_count()}


def main(argv) -> None:
    del argv
    if FLAGS.dir:
        os.makedirs(FLAGS.dir, exist_ok=True)
        result = run(FLAGS.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="kervljepa_loader_") as root:
            result = run(root)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
