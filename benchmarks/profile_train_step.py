"""Where the phase-3 training step of benchmarks/train_step_vs_torch.py spends its time, JAX vs PyTorch.

Same model, weights and batch as that benchmark; each part is timed in both frameworks in
alternating rounds (best round kept; a shared machine only makes a round slower):
  fwd      the loss only (torch: autograd graph built, no backward)
  fwd_bwd  loss + gradients of the trainable weights (no optimizer)
  step     fwd_bwd + AdamW (the benchmark's step)
  head     the LM head + cross entropy alone, forward + gradient w.r.t. the last hidden states
           (JAX: step.lm_loss_frozen_head over the step's chunks, what the step runs; torch: the
           head on the target positions only)
  head_recompute  JAX: losses.lm_loss_from_hidden (logits recomputed in the backward), the step's
           LM term before lm_loss_frozen_head; torch: the same head as above
Ends with one JSON line of seconds per part and framework.

  python benchmarks/profile_train_step.py [--rounds=3] [--steps=1]
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl import app, flags

import train_step_vs_torch as bench
from kervljepa_jax import losses
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.training import step as step_lib

FLAGS = flags.FLAGS


def jax_parts(vcfg, variables, batch) -> dict:
    """name -> a no-argument callable that runs that part once and waits for it."""
    loss_fn, trainable, frozen = bench.jax_loss(vcfg, variables, batch)
    step, t0, opt0 = bench.jax_step(vcfg, variables, batch)
    fwd, grad = jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn))
    model = vlm_lib.VLM(vcfg)
    ids, mask = jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["loss_mask"])
    params = variables["params"]
    head = lambda h: model.apply({"params": params, "calibration": variables["calibration"]}, h,  # noqa: E731
                                 method=vlm_lib.VLM.token_logits)
    head_recompute = jax.jit(jax.value_and_grad(
        lambda h: losses.lm_loss_from_hidden(h, ids, mask, head, step_lib.LM_CHUNK)))
    w = step_lib.head_weight(vcfg.llm, params)
    head_grad = jax.jit(jax.value_and_grad(
        lambda h: step_lib.lm_loss_frozen_head(h, w, ids, mask, vcfg.llm.jnp_dtype, step_lib.LM_CHUNK)))
    hidden = jnp.asarray(np.random.default_rng(2).standard_normal(ids.shape + (vcfg.llm.hidden_size,)), jnp.float32)
    state = {"t": t0, "opt": opt0}

    def run_step():
        state["t"], state["opt"], loss = step(state["t"], state["opt"])
        jax.block_until_ready(loss)

    return {"fwd": lambda: jax.block_until_ready(fwd(trainable)),
            "fwd_bwd": lambda: jax.block_until_ready(grad(trainable)),
            "step": run_step,
            "head": lambda: jax.block_until_ready(head_grad(hidden)),
            "head_recompute": lambda: jax.block_until_ready(head_recompute(hidden))}


def torch_parts(runner, optimizer, batch, d: int) -> dict:
    ids = torch.from_numpy(batch["input_ids"])
    targets = torch.from_numpy(batch["loss_mask"][:, 1:])
    hidden = torch.randn(*ids.shape, d, requires_grad=True)

    def fwd_bwd():
        optimizer.zero_grad(set_to_none=True)
        bench.torch_loss(runner, batch).backward()

    def head():
        logits = runner.model.lm_head(hidden[:, :-1][targets])
        torch.nn.functional.cross_entropy(logits, ids[:, 1:][targets]).backward()

    return {"fwd": lambda: bench.torch_loss(runner, batch),
            "fwd_bwd": fwd_bwd,
            "step": lambda: bench.torch_step(runner, optimizer, batch),
            "head": head, "head_recompute": head}


def main(argv):
    del argv
    torch.manual_seed(0)
    vcfg = bench.vlm_config()
    batch = bench.batch_arrays(vcfg)
    variables = bench.jax_params(vcfg)
    with tempfile.TemporaryDirectory() as folder:
        runner, optimizer, _ = bench.torch_side(vcfg, variables, folder)
    sides = {"jax": jax_parts(vcfg, variables, batch), "torch": torch_parts(runner, optimizer, batch,
                                                                            vcfg.llm.hidden_size)}
    for parts in sides.values():                  # compile / warm up
        for fn in parts.values():
            fn()
    best = {side: {name: float("inf") for name in parts} for side, parts in sides.items()}
    for _ in range(FLAGS.rounds):
        for name in best["jax"]:
            for side, parts in sides.items():
                start = time.perf_counter()
                for _ in range(FLAGS.steps):
                    parts[name]()
                best[side][name] = min(best[side][name], (time.perf_counter() - start) / FLAGS.steps)
    out = {f"{side}_{name}_s": round(v, 3) for side, parts in best.items() for name, v in parts.items()}
    out.update({f"ratio_{name}": round(best["torch"][name] / best["jax"][name], 2) for name in best["jax"]})
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
