"""The embedded phase-3 training step, and the two savings in it measured against what they replace.

On the embedded default (tiny decoder, batch 8 x 256 tokens, real batches of the synthetic
pipeline, a fresh bridge: the step's cost does not depend on the weights' values), one process:
  step            the phase-3 train step as the trainer jits it: ms/step and volumes/s, with the
                  text targets and the frozen compressor's V' cached per record (what the trainer
                  does) vs the text targets embedded by the frozen LLM inside the step
                  (train.cache_text_targets=False) vs the compressor run inside the step, with its
                  dropout (train.cache_visual_tokens=False)
  dropout         the dropout masks of one step's 28 LoRA sites ([B, T, in] of q/k/v/o/gate/up/down
                  x 4 layers): jax.random.bernoulli (flax.linen.Dropout's 32 bits per element)
                  vs model.dropout.keep_mask (16 bits per element)
  lm_head         value and gradient of the LM loss from the decoder's last hidden states on the
                  batch's own targets: full logits + losses.lm_loss vs losses.lm_loss_from_hidden
                  (logits only for chunks of target positions)
Pairs alternate over --repeats rounds and the best round of each is reported (a shared machine
only ever makes a round slower). Ends with one JSON line of the figures.

  python benchmarks/train_step.py [--steps=20] [--repeats=3]
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from kervljepa_jax import evaluate, losses, train
from kervljepa_jax.model import dropout as dropout_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.model.lora import LORA_TARGETS
from kervljepa_jax.training import feature_cache, optim, phases
from kervljepa_jax.training import step as step_lib
from kervljepa_jax.training.run import Run

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "Timed calls per round.")
flags.DEFINE_integer("repeats", 3, "Rounds (alternating the pair; the best round of each is reported).")


def best_ms(fns: dict, args: dict, steps: int, repeats: int) -> dict[str, float]:
    """Best-round milliseconds per call of each jitted fn(*args[name]), rounds alternating."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))                      # compile outside the clock
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = fn(*args[name])
            jax.block_until_ready(out)
            best[name] = min(best[name], 1000 * (time.perf_counter() - start) / steps)
    return best


def main(argv):
    del argv
    workdir = tempfile.mkdtemp(prefix="train_step_bench_")
    config = train.phase_config(3, None, {})
    run = Run(config, workdir)
    run.configs = {3: config}
    pipe = run.pipeline(config, "train")
    run.targets.prepare(config, pipe)
    variables = run.place(train.starting_variables(run, train.phase_config(1, None, {}), 1, ""))
    labels = phases.trainable_labels(variables["params"], config.optimizer_groups, 3)
    visual = feature_cache.compressor_tokens(config, run.vcfg.compressor, variables["params"], labels, pipe)
    batch = evaluate.as_jnp(next(iter(pipe.epoch(0, feature_cache.join(pipe, run.targets.table(pipe), visual)))))
    trainable, frozen = phases.split_params(variables["params"], labels)
    tx = optim.make_optimizer(config, trainable, labels, pipe.steps_per_epoch())
    opt_state = jax.jit(tx.init)(trainable)
    model = vlm_lib.VLM(run.vcfg, deterministic=False)
    train_step = jax.jit(step_lib.make_train_step(3, model, run.targets.encoder, tx, dict(config.loss_weights)))
    rng = jax.random.key(0)
    step_args = (trainable, frozen, opt_state, variables["calibration"], batch, rng, run.targets.consts())
    # The batch as the trainer joins it (text targets embedded once per run, V' once per
    # phase) vs the same batch without the text targets (the step runs the frozen LLM on the report
    # text) or without V' (the step runs the frozen compressor).
    without = lambda drop: (*step_args[:4], {k: v for k, v in batch.items() if not drop(k)},  # noqa: E731
                            *step_args[5:])
    loss = lambda *a: train_step(*a)[2]["loss"]  # noqa: E731
    steps = best_ms({"cached": loss, "embedded": loss, "compressor": loss},
                    {"cached": step_args, "embedded": without(lambda k: k.endswith("_embedding")),
                     "compressor": without(lambda k: k == "visual_tokens")},
                    FLAGS.steps, FLAGS.repeats)
    step_ms = steps["cached"]
    logging.info("phase-3 step: %.1f ms (%.1f ms embedding the text targets in the step, %.1f ms running "
                 "the compressor in it)", step_ms, steps["embedded"], steps["compressor"])

    # The dropout masks of one step's LoRA sites.
    llm = run.vcfg.llm
    b, t = batch["input_ids"].shape
    widths = {"down_proj": llm.intermediate_size, "o_proj": llm.num_attention_heads * llm.head_dim}
    shapes = [(b, t, widths.get(name, llm.hidden_size)) for name in LORA_TARGETS] * llm.num_hidden_layers
    rate = float(config.model.lora.dropout)

    def masks(draw):
        def all_sites(key):
            return sum(jnp.sum(draw(k, s)) for k, s in zip(jax.random.split(key, len(shapes)), shapes))
        return jax.jit(all_sites)
    drop = best_ms({"bernoulli": masks(lambda k, s: jax.random.bernoulli(k, 1.0 - rate, s)),
                    "16bit": masks(lambda k, s: dropout_lib.keep_mask(k, rate, s))},
                   {"bernoulli": (rng,), "16bit": (rng,)}, FLAGS.steps, FLAGS.repeats)

    # The LM loss from the decoder's last hidden states, forward and backward.
    params = phases.merge_params(trainable, frozen)
    fixed = {"params": params, "calibration": variables["calibration"]}
    hidden = jax.jit(lambda v, bt: vlm_lib.VLM(run.vcfg).apply(
        v, bt["slices"], bt["z_mm"], bt["valid"], bt["input_ids"], bt["attention_mask"],
        return_logits=False).hidden)(fixed, batch)
    head = lambda v, h: vlm_lib.VLM(run.vcfg).apply(v, h, method=vlm_lib.VLM.token_logits)  # noqa: E731
    ids, mask = batch["input_ids"], batch["loss_mask"]
    full = jax.jit(jax.value_and_grad(lambda h, v: losses.lm_loss(head(v, h), ids, mask)))
    chunked = jax.jit(jax.value_and_grad(lambda h, v: losses.lm_loss_from_hidden(
        h, ids, mask, lambda x: head(v, x), step_lib.LM_CHUNK)))
    lm = best_ms({"full": full, "chunked": chunked}, {"full": (hidden, fixed), "chunked": (hidden, fixed)},
                 FLAGS.steps, FLAGS.repeats)
    same = abs(float(full(hidden, fixed)[0]) - float(chunked(hidden, fixed)[0]))

    figures = {
        "step_ms": round(step_ms, 1), "volumes_per_s": round(1000 * b / step_ms, 1), "batch": [b, t],
        "step_embedding_targets_ms": round(steps["embedded"], 1),
        "step_running_compressor_ms": round(steps["compressor"], 1),
        "dropout_sites": len(shapes), "dropout_bernoulli_ms": round(drop["bernoulli"], 2),
        "dropout_16bit_ms": round(drop["16bit"], 2), "dropout_speedup": round(drop["bernoulli"] / drop["16bit"], 2),
        "lm_full_ms": round(lm["full"], 2), "lm_chunked_ms": round(lm["chunked"], 2),
        "lm_speedup": round(lm["full"] / lm["chunked"], 2), "lm_loss_abs_diff": same,
        "target_fraction": round(float(jnp.mean(mask)), 3), "lm_chunk": step_lib.LM_CHUNK,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
