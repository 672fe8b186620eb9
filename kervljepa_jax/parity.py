"""Check this decoder against transformers on the same weights: full forward and KV-cache decoding.

    python -m kervljepa_jax.parity                       # a tiny random Llama, made on the spot
    python -m kervljepa_jax.parity --hf_path=/models/Llama-3.2-3B-Instruct --dtype=float32

Prints the max abs logit difference of the full forward and of prefill + one-token extends, then
one JSON line. Exits non-zero when a difference exceeds --atol. Needs the `[torch]` extra.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, hf
from kervljepa_jax.model import llama

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_path", None, "Local HF Llama folder; default: a tiny random Llama built here.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and param dtype for both sides.")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_integer("seq_len", 32, "Tokens in the full forward; the last quarter is decoded one by one.")
flags.DEFINE_float("atol", 1e-4, "Largest accepted max abs logit difference.")
flags.DEFINE_integer("seed", 0, "Seed for the random model and token ids.")


def _tiny_hf_llama(folder: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def compare(hf_path: str, dtype: str, batch: int, seq_len: int, seed: int) -> dict:
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cfg, params = hf.load_llama(hf_path, dtype=dtype, param_dtype=dtype)   # first: its errors name the file
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_path, dtype=torch_dtype, use_safetensors=True).eval()
    model = llama.Llama(cfg)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids)).logits.float().numpy()
    t0 = time.perf_counter()
    full = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(params, jnp.asarray(ids)))
    forward_s = time.perf_counter() - t0
    decoded = _decode_logits(model, cfg, params, jnp.asarray(ids), prefill=seq_len - seq_len // 4)
    return {"model": os.path.basename(os.path.normpath(hf_path)), "dtype": dtype,
            "forward_max_abs_diff": float(np.abs(full - ref).max()),
            "decode_max_abs_diff": float(np.abs(decoded - ref).max()),
            "forward_seconds_incl_compile": round(forward_s, 3)}


def _decode_logits(model, cfg, params, ids, prefill: int) -> np.ndarray:
    """Logits of prefill(ids[:, :prefill]) then one-token extends over the rest."""
    batch, seq_len = ids.shape
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    out = apply(params, ids[:, :prefill], llama.init_cache(cfg, batch, seq_len))
    logits, cache = [np.asarray(out.logits)], out.cache
    for t in range(prefill, seq_len):
        out = apply(params, ids[:, t:t + 1], cache)
        logits.append(np.asarray(out.logits))
        cache = out.cache
    return np.concatenate(logits, axis=1)


def main(argv):
    del argv
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("parity: needs PyTorch; install the extra: pip install -e '.[torch]'")
    if FLAGS.hf_path and not os.path.isfile(os.path.join(FLAGS.hf_path, "config.json")):
        cli_lib.fail("parity", f"--hf_path={FLAGS.hf_path}: no config.json there; pass a local Hugging Face "
                               "Llama folder", 2)
    if FLAGS.batch < 1 or FLAGS.seq_len < 4:
        cli_lib.fail("parity", f"--batch={FLAGS.batch} --seq_len={FLAGS.seq_len}: need batch >= 1 and seq_len >= 4 "
                               "(the last quarter is decoded one token at a time)", 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = FLAGS.hf_path
        if path is None:
            path = os.path.join(tmp, "tiny-llama")
            _tiny_hf_llama(path, FLAGS.seed)
            logging.info("parity: built a tiny random Llama in %s", path)
        try:
            result = compare(path, FLAGS.dtype, FLAGS.batch, FLAGS.seq_len, FLAGS.seed)
        except hf.HFLoadError as e:
            sys.exit(f"parity: {e}")
    ok = max(result["forward_max_abs_diff"], result["decode_max_abs_diff"]) <= FLAGS.atol
    print(f"full forward: max |logit diff| = {result['forward_max_abs_diff']:.2e}")
    print(f"prefill + one-token extends: max |logit diff| = {result['decode_max_abs_diff']:.2e}")
    print(json.dumps(dict(result, ok=ok)))
    if not ok:
        sys.exit(f"parity: difference above --atol={FLAGS.atol}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli_lib.flags_parser("parity"))
