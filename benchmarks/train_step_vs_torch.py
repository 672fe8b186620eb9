"""One phase-3 training step in JAX vs the same step in PyTorch (issue 26.4), on the CPU.

A mid-size Llama shape (8 layers x 512 wide, 8 heads / 4 kv heads of 64, MLP 1536, vocabulary
32000, adapters after layers 2, 4, 6) with the paper's bridge sizes (32 visual tokens of width 1024),
batch 8 x 256 tokens; trainable: LoRA (r=16 on q/k/v/o/gate/up/down), the cross-attention adapters
and their projectors, the JEPA predictor; AdamW (lr 2e-5, weight decay 0.01) on exactly those.
The compressor is frozen in phase 3 and the trainer feeds the step its output V' computed once
per volume (feature_cache.compressor_tokens), so both steps start from the same V' [B, 32, 1024].
  jax    VLM forward (kervljepa_jax.model), the LM loss from the last hidden states as the
         trainer's step takes it (step.lm_term: the frozen head's closed-form gradient,
         step.lm_loss_frozen_head), grad w.r.t. the trainable half only, optax.adamw; one jitted
         function. `jax_recompute_head`: the same through losses.lm_loss_from_hidden (each chunk's
         logits recomputed in the backward), the step before lm_loss_frozen_head
  torch  the same weights exported as the export writes them (hf.save_llama, hf.save_peft_lora,
         export.bridge_tensors) and loaded by transformers + peft + torch_runner's Bridge and
         decoder hooks; the LM head on the target positions only; torch.optim.AdamW
Both sides without dropout (the JAX step's dropout rngs cost it ~10%, benchmarks/train_step.py;
peft's LoRA dropout is set to 0 to match). The first step's loss on the same weights and batch is
compared (`loss_abs_diff`) so the two measure the same computation. Rounds alternate the two
(--rounds, --steps per round) and the best round of each is reported: a shared machine only ever
makes a round slower. Ends with one JSON line: jax_step_s, torch_step_s, speedup = torch / jax.

  python benchmarks/train_step_vs_torch.py [--rounds=3] [--steps=2] [--vocab=32000] [--noscan_layers]

Measured (docs/performance.md, with the profile by part: benchmarks/profile_train_step.py): on one
pinned core, one thread each (OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
taskset -c 1; other jobs' load average 7-15) jax 22.2 s, torch 18.9 s a step, speedup 0.85; the
step before lm_loss_frozen_head 28.1 s (0.67). The first version of this benchmark, 2 threads, load
1.5-8: 6.94 vs 5.58 s (0.80). With 2 threads under load 10-22, PyTorch's threads stall on each
other (32.5 s) and the speedup reads 2.09: compare single-thread runs. First-step losses agree
(|diff| <= 1e-6) on 5,707,779 trainable weights each.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl import app, flags
from flax import traverse_util

from kervljepa_jax import export, hf, torch_runner
from kervljepa_jax.model import llama as llama_lib, lora as lora_lib, vlm as vlm_lib, xattn as xattn_lib
from kervljepa_jax.training import phases, step as step_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "Alternating rounds; the best of each side is reported.")
flags.DEFINE_integer("steps", 2, "Timed steps per side per round.")
flags.DEFINE_integer("layers", 8, "Decoder layers.")
flags.DEFINE_integer("hidden", 512, "Decoder width.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary.")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
flags.DEFINE_bool("scan_layers", True, "JAX decoder layers under nn.scan (the trainer's default); --noscan_layers "
                  "unrolls them.")

TRAINABLE = (r"predictor/.*", lora_lib.LORA_PATTERN, xattn_lib.XATTN_PATTERN, xattn_lib.PROJECTOR_PATTERN)
LR, WEIGHT_DECAY, VISUAL_ID, PROMPT = 2e-5, 0.01, 5, 48       # PROMPT: tokens before the response


def injection_layers(layers: int) -> tuple[int, ...]:
    """At a quarter, half and three quarters of the depth, as 7, 14, 21 of the 3B's 28 (8 -> 2, 4, 6)."""
    return tuple(sorted({min(layers - 2, max(0, round(layers * i / 4))) for i in (1, 2, 3)}))


def vlm_config() -> vlm_lib.VLMConfig:
    heads = FLAGS.hidden // 64
    llm = llama_lib.tiny(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=3 * FLAGS.hidden,
                         num_hidden_layers=FLAGS.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         head_dim=64, injection_layers=injection_layers(FLAGS.layers), max_position_embeddings=4096,
                         lora=lora_lib.LoraConfig(rank=16, alpha=32.0, dropout=0.0), scan_layers=FLAGS.scan_layers)
    return vlm_lib.make_config(visual_token_id=VISUAL_ID, d_visual=1024, num_visual_tokens=32, llm_config=llm)


def batch_arrays(vcfg: vlm_lib.VLMConfig) -> dict[str, np.ndarray]:
    """Random ids with the 32 placeholders after the first token, a response after PROMPT, and V'."""
    rng = np.random.default_rng(0)
    b, t, k = FLAGS.batch, FLAGS.seq_len, vcfg.num_visual_tokens
    ids = rng.integers(10, FLAGS.vocab, (b, t))
    ids[:, 1:1 + k] = VISUAL_ID
    return {"input_ids": ids, "loss_mask": np.arange(t)[None].repeat(b, 0) >= PROMPT,
            "visual_tokens": rng.standard_normal((b, k, vcfg.compressor.d_visual)).astype(np.float32)}


def jax_params(vcfg: vlm_lib.VLMConfig) -> dict:
    """A fresh VLM with LoRA B and the adapter gates moved off zero (a trained bridge's computation)."""
    variables = vlm_lib.init(vcfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(variables["params"])
    for path, leaf in flat.items():
        if path[-1] == "lora_B":
            flat[path] = jnp.asarray(0.01 * rng.standard_normal(leaf.shape), leaf.dtype)
        elif path[-1] == "gate":
            flat[path] = jnp.asarray(0.5, leaf.dtype)
    return {"params": traverse_util.unflatten_dict(flat), "calibration": variables["calibration"]}


def jax_loss(vcfg: vlm_lib.VLMConfig, variables: dict, batch: dict, recompute_head: bool = False):
    """(loss(trainable) -> scalar, trainable, frozen): the phase-3 LM loss as a function of the trainable
    half. recompute_head: the LM term through losses.lm_loss_from_hidden (the step before the frozen
    head's closed-form gradient, step.lm_loss_frozen_head), for the before/after figure."""
    labels = phases.trainable_labels(variables["params"], TRAINABLE, 3)
    trainable, frozen = phases.split_params(variables["params"], labels)
    model = vlm_lib.VLM(vcfg)
    ids, mask = jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["loss_mask"])
    tokens = jnp.asarray(batch["visual_tokens"])
    dummy = jnp.zeros((ids.shape[0], 1, vcfg.compressor.d_visual))      # unread: V' is given
    head_frozen = step_lib.head_is_frozen(vcfg.llm, trainable) and not recompute_head  # as make_train_step

    def loss_fn(t):
        v = {"params": phases.merge_params(t, frozen), "calibration": variables["calibration"]}
        out = model.apply(v, dummy, dummy[..., 0], dummy[..., 0] == 0, ids, jnp.ones_like(mask), mask,
                          return_logits=False, visual_tokens=tokens)
        return step_lib.lm_term(model, v, out.hidden, {"input_ids": ids, "loss_mask": mask}, head_frozen)

    return loss_fn, trainable, frozen


def jax_step(vcfg: vlm_lib.VLMConfig, variables: dict, batch: dict, recompute_head: bool = False):
    """(step(trainable, opt_state) -> (trainable, opt_state, loss), trainable, opt_state)."""
    loss_fn, trainable, _ = jax_loss(vcfg, variables, batch, recompute_head)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    @jax.jit
    def step(t, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    return step, trainable, tx.init(trainable)


def torch_side(vcfg: vlm_lib.VLMConfig, variables: dict, folder: str):
    """The same weights through the export's writers into transformers + peft + the runner's bridge."""
    import peft
    import transformers

    params = variables["params"]
    hf.save_llama(vcfg.llm, params["llm"], os.path.join(folder, "base"), lora="drop")
    hf.save_peft_lora(vcfg.llm, params["llm"], os.path.join(folder, "adapter"))
    base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(folder, "base"), use_safetensors=True)
    model = peft.PeftModel.from_pretrained(  # safe-load: the adapter hf.save_peft_lora has just written
        base, os.path.join(folder, "adapter"), is_trainable=True).get_base_model()
    alpha = float(variables["calibration"]["calibrator"]["alpha"])
    bridge = torch_runner.Bridge(export.bridge_sizes(vcfg))
    tensors = export.bridge_tensors(params, vcfg, alpha, None)
    bridge.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    runner = torch_runner.Runner(model.train(), bridge.train(), export.bridge_sizes(vcfg))
    for p in bridge.parameters():
        p.requires_grad_(False)
    for module in (bridge.predictor, bridge.projectors, bridge.xattn):
        for p in module.parameters():
            p.requires_grad_(True)
    trainable = [p for p in (*model.parameters(), *bridge.parameters()) if p.requires_grad]
    return runner, torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY), trainable


def torch_loss(runner: torch_runner.Runner, batch: dict) -> torch.Tensor:
    """V' -> V~ -> grafted embeddings -> decoder with the adapter hooks -> LM loss on the response
    targets (head on those positions only)."""
    ids = torch.from_numpy(batch["input_ids"])
    targets = torch.from_numpy(batch["loss_mask"][:, 1:])
    calibrated = runner.bridge.calibrator(runner.bridge.predictor(torch.from_numpy(batch["visual_tokens"])))
    llm = runner.model
    embeds = torch_runner.graft(llm.get_input_embeddings()(ids), ids, calibrated, VISUAL_ID)
    with runner.visual_context(calibrated):
        hidden = llm.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).last_hidden_state
    logits = llm.lm_head(hidden[:, :-1][targets])
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:][targets])


def torch_step(runner: torch_runner.Runner, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One step: `torch_loss`, backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    loss = torch_loss(runner, batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def timed_sides(vcfg, variables, batch, runner, optimizer) -> tuple[dict, dict, float]:
    """{side: one-step callable} after each side's first step, {side: first loss}, JAX compile + step 1 s."""
    sides, first, compile_s = {}, {}, 0.0
    for name, recompute in (("jax", False), ("jax_recompute_head", True)):
        step, *state = jax_step(vcfg, variables, batch, recompute)

        def run(step=step, state=state):
            state[0], state[1], loss = step(state[0], state[1])
            return jax.block_until_ready(loss)

        start = time.perf_counter()
        first[name] = float(run())
        compile_s = compile_s or time.perf_counter() - start
        sides[name] = run
    sides["torch"] = lambda: torch_step(runner, optimizer, batch)
    first["torch"] = sides["torch"]()
    return sides, first, compile_s


def main(argv):
    del argv
    torch.manual_seed(0)
    vcfg = vlm_config()
    batch = batch_arrays(vcfg)
    variables = jax_params(vcfg)
    with tempfile.TemporaryDirectory() as folder:
        runner, optimizer, torch_trainable = torch_side(vcfg, variables, folder)
    sides, first, compile_s = timed_sides(vcfg, variables, batch, runner, optimizer)
    best = {name: float("inf") for name in sides}
    for _ in range(FLAGS.rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / FLAGS.steps)
    trainable = jax_loss(vcfg, variables, batch)[1]
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    print(json.dumps({
        "jax_step_s": round(best["jax"], 3), "torch_step_s": round(best["torch"], 3),
        "speedup": round(best["torch"] / best["jax"], 2),
        "jax_recompute_head_step_s": round(best["jax_recompute_head"], 3),
        "speedup_recompute_head": round(best["torch"] / best["jax_recompute_head"], 2),
        "jax_compile_and_first_step_s": round(compile_s, 1), "loss_jax": first["jax"], "loss_torch": first["torch"],
        "loss_abs_diff": abs(first["jax"] - first["torch"]),
        "loss_abs_diff_recompute_head": abs(first["jax_recompute_head"] - first["torch"]),
        "trainable_params_jax": n_trainable, "trainable_params_torch": sum(p.numel() for p in torch_trainable),
        "shape": {"layers": FLAGS.layers, "hidden": FLAGS.hidden, "vocab": FLAGS.vocab, "batch": FLAGS.batch,
                  "seq_len": FLAGS.seq_len}, "jax_scan_layers": FLAGS.scan_layers, "rounds": FLAGS.rounds,
        "steps_per_round": FLAGS.steps,
        "device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    app.run(main)
