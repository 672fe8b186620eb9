"""Decode throughput: our jitted `generate` vs transformers `LlamaForCausalLM.generate`, same weights.

Batch 8, 64 prompt tokens, 128 new tokens, the paper's sampling settings (temperature 0.6, top_p 0.9,
repetition_penalty 1.15, no_repeat_ngram_size 5), no eos so both produce every token; CPU, both in
this one run. Compilation is excluded (one warm-up call each); best of --repeats.
transformers runs at each of --torch_threads and keeps its best: on a busy shared machine torch's
default (one thread per core, spin-waiting) can be several times slower than one thread.
Ends with one JSON line: jax_tokens_per_s, hf_tokens_per_s, speedup (ours / theirs).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from kervljepa_jax import generate, hf  # noqa: E402
from kervljepa_jax.model import llama  # noqa: E402
from kervljepa_jax.sampling import SamplingConfig  # noqa: E402

flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (best is reported).")
flags.DEFINE_integer("hidden", 64, "Hidden size of the tiny Llama (the llama.tiny preset's size).")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("vocab", 2048, "Vocabulary size.")
flags.DEFINE_list("torch_threads", None, "torch thread counts to time HF at (its best is kept); default: 1 and "
                  "torch's default.")
FLAGS = flags.FLAGS


def build_hf(folder: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=2 * FLAGS.hidden,
        num_hidden_layers=FLAGS.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=FLAGS.hidden // 4, tie_word_embeddings=True, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time of each named run; the repeats interleave the runs so that a load change on a
    shared machine hits every side alike. One untimed warm-up each (jax compilation, torch allocator)."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], fn())
    return best


def main(argv):
    del argv
    sampling = SamplingConfig(temperature=0.6, top_p=0.9, repetition_penalty=1.15, no_repeat_ngram_size=5,
                              do_sample=True, max_new_tokens=FLAGS.new_tokens)
    ids = np.random.default_rng(0).integers(0, FLAGS.vocab, (FLAGS.batch, FLAGS.prompt_len))
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf(tmp)
        cfg, params = hf.load_llama(tmp)
    gen = generate.Generator(generate.llama_decode_model(llama.Llama(cfg)), sampling)
    prompt = jnp.asarray(ids, jnp.int32)
    counter = iter(range(10**6))

    def run_jax():
        out = gen({"params": params}, prompt, prompt, None, jax.random.key(next(counter)))
        jax.block_until_ready(out.tokens)
        assert int(out.lengths.min()) == FLAGS.new_tokens

    torch_ids = torch.tensor(ids)

    def run_hf():
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=torch_ids, attention_mask=torch.ones_like(torch_ids), do_sample=True,
                temperature=0.6, top_p=0.9, top_k=None, repetition_penalty=1.15, no_repeat_ngram_size=5,
                max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens, eos_token_id=None,
                pad_token_id=0)
        assert out.shape[1] == FLAGS.prompt_len + FLAGS.new_tokens

    tokens = FLAGS.batch * FLAGS.new_tokens

    def hf_at(threads):
        def run():
            torch.set_num_threads(threads)
            return timed(run_hf)
        return run

    thread_counts = sorted({int(t) for t in FLAGS.torch_threads or (1, torch.get_num_threads())})
    best = best_times({"jax": lambda: timed(run_jax), **{t: hf_at(t) for t in thread_counts}}, FLAGS.repeats)
    jax_s = best.pop("jax")
    threads, hf_s = min(best.items(), key=lambda item: item[1])
    result = {"jax_tokens_per_s": round(tokens / jax_s, 1), "hf_tokens_per_s": round(tokens / hf_s, 1),
              "speedup": round(hf_s / jax_s, 2), "batch": FLAGS.batch, "prompt_len": FLAGS.prompt_len,
              "new_tokens": FLAGS.new_tokens, "torch_threads": threads,
              "hf_tokens_per_s_by_threads": {t: round(tokens / s, 1) for t, s in best.items()},
              "device": jax.devices()[0].platform}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
