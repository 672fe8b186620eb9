"""Peak host memory of `python -m kervljepa_jax.export` on a mid-size model (issue 26.1: the export
never holds two full copies of the model).

Builds a phase-4 workdir around a Llama-shaped base LLM of ~470 MB of float32 weights (10 layers x
1024 wide, MLP 2816, the packaged stand-in's tokenizer; --layers/--hidden change it) with one
checkpoint whose LoRA and bridge are random, then runs the export CLI in a subprocess and reads its
peak RSS (VmHWM) from /proc while it runs. The baseline is a subprocess that imports the
export module and initialises JAX's CPU backend, i.e. what any export costs before a weight is read.
  model_mb         the restored LLM's float32 params (base + LoRA), what one copy of the model costs
  extra_over_model (peak - baseline) / model, RSS (VmHWM, memory-mapped file pages included)
  anon_extra_over_model  the same for anonymous memory (RssAnon): ~1 when the export holds one copy
                   (plus one tensor at a time); 2 or more would mean two copies
The checkpoint is saved as the trainer saves it (the base LLM's frozen tensors left out, restored
from its folder); --full_checkpoint saves every weight in the step instead.
Ends with one JSON line.

  python benchmarks/export_memory.py [--layers=10] [--hidden=1024] [--dtype=bf16] [--with_base]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from kervljepa_jax import hf, stand_in, train
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.training import checkpoint as ckpt_lib, run as run_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 10, "Decoder layers of the base LLM.")
flags.DEFINE_integer("hidden", 1024, "Decoder width (MLP 2.75x, heads of 64, half as many kv heads).")
flags.DEFINE_enum("dtype", "bf16", ["bf16", "f32"], "The export's --dtype.")
flags.DEFINE_bool("with_base", False, "Pass --with_base (also writes the unmerged decoder).")
flags.DEFINE_bool("full_checkpoint", False, "Save every weight in the step (no frozen record), as "
                  "checkpoints did before they left the base LLM out.")

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
OVERRIDES = {"checkpoint.async_save": "false", "data.embed_dim": "32", "data.num_visual_tokens": "8"}


def base_llm(folder: str) -> None:
    """The stand-in's folder (its tokenizer) with the weights of a wider, deeper random Llama."""
    stand_in.install(folder)
    small = hf.load_llama(folder)[0]
    heads = FLAGS.hidden // 64
    cfg = small.replace(hidden_size=FLAGS.hidden, intermediate_size=FLAGS.hidden * 11 // 4,
                        num_hidden_layers=FLAGS.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                        head_dim=64, injection_layers=(), lora=None)
    shapes = jax.eval_shape(lambda: llama_lib.Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])
    for name in os.listdir(folder):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.remove(os.path.join(folder, name))
    hf.save_llama(cfg, params, folder)


def workdir(root: str) -> tuple[str, int]:
    """A phase-4 workdir with one checkpoint (step 1) on the mid-size LLM; returns (workdir, model bytes)."""
    folder = os.path.join(root, "llm")
    base_llm(folder)
    config = train.phase_config(4, None, {**OVERRIDES, "model.llm_path": folder})
    run = run_lib.Run(config, os.path.join(root, "work"))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (0.01 * rng.standard_normal(s.shape)).astype(s.dtype), run.abstract_params)
    params["llm"] = jax.tree_util.tree_map_with_path(
        lambda p, x, r: r if p[-1].key in ("lora_A", "lora_B") else x, run.llm_params, params["llm"])
    # As the trainer saves it: the base LLM's frozen weights left out, a record of where they come from
    # (--full_checkpoint: every weight in the step, as checkpoints were before).
    labels = train.trainable_labels(params, config, 4)
    frozen = None if FLAGS.full_checkpoint else train.base_llm_record(run, config, params, labels)
    with ckpt_lib.PhaseCheckpointer.from_config(run.workdir, config, 4) as ckpt:
        ckpt.save(1, params=params, alpha=1.0, config=config, metrics={"val_gen_f1": 0.5}, frozen=frozen)
    model_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(run.llm_params))
    return run.workdir, model_bytes


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS, peak anonymous RSS) of a child process in MB, polled from /proc until it exits.
    RSS (VmHWM) also counts the pages of memory-mapped safetensors files it has read, which the
    kernel may drop at any time; RssAnon is the memory the process itself holds (polled: a peak
    shorter than the 20 ms period can be missed). (os.wait4's ru_maxrss would not do: Linux carries
    the forking parent's high-water mark into the child's.)"""
    with tempfile.TemporaryFile() as err:          # not a pipe: the export's log would fill it and stall
        child = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        peak = anon = 0.0
        while child.poll() is None:
            try:
                with open(f"/proc/{child.pid}/status", encoding="ascii") as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "RssAnon")))
                peak = max(peak, int(fields["VmHWM"].split()[0]) / 1024)      # monotonic
                anon = max(anon, int(fields["RssAnon"].split()[0]) / 1024)
            except (OSError, KeyError, ValueError):                            # exiting between poll() and open()
                pass
            time.sleep(0.02)
        if child.returncode:
            err.seek(0)
            raise RuntimeError(f"{args} failed: {err.read().decode()[-2000:]}")
    return peak, anon


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        work, model_bytes = workdir(root)
        baseline, baseline_anon = peak_rss_mb(["-c", "import jax, kervljepa_jax.export; "
                                                     "jax.numpy.zeros(1).block_until_ready()"])
        flags_ = [f"--workdir={work}", f"--out={os.path.join(root, 'out')}", f"--dtype={FLAGS.dtype}",
                  "--checkpoint=latest"] + (["--with_base"] if FLAGS.with_base else [])
        peak, anon = peak_rss_mb(["-m", "kervljepa_jax.export", *flags_])
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "out"))
                      for f in fs)
    model_mb = model_bytes / 2**20
    print(json.dumps({"model_mb": round(model_mb, 1), "baseline_rss_mb": round(baseline, 1),
                      "export_peak_rss_mb": round(peak, 1), "extra_over_model": round((peak - baseline) / model_mb, 2),
                      "peak_over_model": round(peak / model_mb, 2),
                      "anon_peak_mb": round(anon, 1), "anon_extra_over_model": round((anon - baseline_anon) / model_mb, 2),
                      "written_mb": round(written / 2**20, 1),
                      "layers": FLAGS.layers, "hidden": FLAGS.hidden, "dtype": FLAGS.dtype,
                      "with_base": FLAGS.with_base, "full_checkpoint": FLAGS.full_checkpoint}))


if __name__ == "__main__":
    app.run(main)
