"""Loader throughput: the training input pipeline against a plain np.load loop, same files, one run.

Writes --num_volumes synthetic volumes of [--slices, --dim] float16 slice embeddings in the
CT-RATE layout (`data.synthetic.write_ctrate_layout`) into a temporary folder, then times, with
the page cache warm for both and alternating the order over --repeats rounds (best round each;
the medians and the CPU time per volume, which other processes on a shared machine disturb
less than wall time, are reported too):
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

  python benchmarks/loader.py [--num_volumes=256] [--read_threads=0] [--num_workers=0]
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
flags.DEFINE_integer("num_volumes", 256, "Training volumes written and read (~1.2 MB each at the default shape).")
flags.DEFINE_integer("slices", 600, "Slices per volume (N).")
flags.DEFINE_integer("dim", 1024, "Slice embedding width (D).")
flags.DEFINE_integer("batch_size", 8, "Batch size of the pipeline.")
flags.DEFINE_integer("read_threads", 0, "grain reader threads (data.read_threads; 0 = read in the iterating "
                     "thread, the least CPU per volume on a busy 2-core machine).")
flags.DEFINE_integer("num_workers", 0, "grain worker processes (data.num_workers).")
flags.DEFINE_integer("repeats", 5, "Timed rounds of each (the best is reported, and the median).")
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


def timed(fn) -> tuple[float, float]:
    """(volumes/s wall, CPU microseconds per volume of this process, all threads) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    volumes = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert volumes == FLAGS.num_volumes, volumes
    return volumes / wall, 1e6 * cpu / volumes


def read_raw(files: list[str]) -> int:
    for path in files:
        x = np.load(path)
        assert x.shape == (FLAGS.slices, FLAGS.dim)
    return len(files)


def read_pipeline(loader: pipeline.Pipeline, epoch: int) -> int:
    return sum(batch["slices"].shape[0] for batch in loader.epoch(epoch))


def run(root: str) -> dict:
    config = data_config(root, os.path.join(root, "work"))
    logging.info("writing %d volumes of [%d, %d] float16 under %s", FLAGS.num_volumes, FLAGS.slices, FLAGS.dim, root)
    synthetic.write_ctrate_layout(root, config, file_format="npy", dtype="float16")
    files = sorted(glob.glob(os.path.join(root, "embeddings", "train", "*.npy")))
    tokenizer = pipeline.make_tokenizer(config)            # trained + cached once, not timed
    loader = pipeline.Pipeline(config, "train", tokenizer)  # CSV index built once, not timed
    read_raw(files)                                         # warm the page cache for both
    first = timed(lambda: read_pipeline(loader, 0))[0]      # text work and NaN/Inf scans happen here
    raw, piped = [], []
    for r in range(FLAGS.repeats):
        rounds = [(raw, lambda: read_raw(files)), (piped, lambda: read_pipeline(loader, r + 1))]
        for out, fn in (rounds[::-1] if r % 2 else rounds):
            out.append(timed(fn))
    logging.info("raw np.load volumes/s per round: %s", [round(x, 1) for x, _ in raw])
    logging.info("pipeline volumes/s per round: %s", [round(x, 1) for x, _ in piped])
    best_raw, best_piped = max(x for x, _ in raw), max(x for x, _ in piped)
    cpu_raw, cpu_piped = min(c for _, c in raw), min(c for _, c in piped)
    return {"volumes_per_s": round(best_piped, 2), "raw_volumes_per_s": round(best_raw, 2),
            "fraction_of_raw": round(best_piped / best_raw, 3),
            "median_fraction_of_raw": round(float(np.median([x for x, _ in piped]) / np.median([x for x, _ in raw])), 3),
            "cpu_us_per_volume": round(cpu_piped, 1), "raw_cpu_us_per_volume": round(cpu_raw, 1),
            "cpu_fraction_of_raw": round(cpu_raw / cpu_piped, 3),
            "first_epoch_volumes_per_s": round(first, 2),
            "measured": "full training examples (slices + text) as host batches; volumes_per_s: epochs after "
                        "the first (per-volume text cached, unchanged files not rescanned for NaN/Inf); "
                        "cpu: process CPU time (all threads) per volume, best round",
            "num_volumes": FLAGS.num_volumes, "shape": [FLAGS.slices, FLAGS.dim], "dtype": "float16",
            "batch_size": FLAGS.batch_size, "read_threads": FLAGS.read_threads,
            "num_workers": FLAGS.num_workers, "repeats": FLAGS.repeats, "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


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
