"""Ahead-of-time proof of a phase's train step at scale: `python -m kervljepa_jax.aot`.

    python -m kervljepa_jax.aot --preset=llama3_2_3b --phase=3 --mesh=data:1,fsdp:8,tensor:1 \\
        --batch_per_device=8 --seq_len=544

Lowers and compiles the trainer's own phase-N step (`training.step.make_train_step` with the
phase's paper config, optimizer and trainable table, and the batch keys the trainer feeds it: the
cached text targets, and V' for a phase whose compressor is frozen) on abstract shapes placed on
the mesh by `sharding.AXIS_RULES`. No weight is materialised: a 3B step compiles on a laptop with
forced host CPU devices (set here before JAX starts, one per mesh position).

Prints per-device argument, output, temp and total bytes, compile seconds, and the FLOPs of the
step and of the forward (the phase's loss without gradients), then one JSON line. XLA's cost
analysis counts a scanned body once, so the FLOPs come from a second lowering with the layers
unrolled (`scan_layers=False`, analysed before optimisation, not compiled); the scanned program is
the one compiled and measured for memory. Frozen weights get no weight gradient, so a step costs
about 2x its forward (forward + input gradients); 3x would mean weight gradients of frozen layers.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags


def _forced_devices(argv: list[str]) -> int:
    """How many host devices to force, before JAX is imported: --devices when an axis of --mesh is
    -1 (the rest of the devices), else the product of the mesh's sizes."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), "data:1,fsdp:8,tensor:1")
    devices = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
    sizes = [item.partition(":")[2] for item in filter(None, spec.split(","))]
    if "-1" in sizes:
        return max(int(devices), 1) if devices.isdigit() else 8
    return max(int(np.prod([int(s) for s in sizes if s.isdigit()] or [1])), 1)


if __name__ == "__main__" and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    flag = f"--xla_force_host_platform_device_count={_forced_devices(sys.argv)}"
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flag]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from kervljepa_jax import cli as cli_lib, findings, sharding  # noqa: E402
from kervljepa_jax.data import pipeline as pipeline_lib  # noqa: E402
from kervljepa_jax.model import llama as llama_lib  # noqa: E402
from kervljepa_jax.model import vlm as vlm_lib  # noqa: E402
from kervljepa_jax.training import config as config_lib, optim, phases  # noqa: E402
from kervljepa_jax.training import run as run_lib, step as step_lib, text_targets  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """At `python -m` time only: importing this module defines no flag."""
    flags.DEFINE_enum("preset", "llama3_2_3b", sorted(llama_lib.PRESETS), "LLM preset.")
    flags.DEFINE_integer("phase", 3, "Curriculum phase whose train step is compiled (1-4).")
    flags.DEFINE_string("mesh", "data:1,fsdp:8,tensor:1", "Mesh, as --config.mesh (data:D,fsdp:F,tensor:T).")
    flags.DEFINE_integer("devices", 8, "Devices in all when a mesh axis is -1 (host CPU devices are forced to match).")
    flags.DEFINE_integer("batch_per_device", 8, "Training examples per device (global batch = this x devices).")
    flags.DEFINE_integer("seq_len", 544, "Token positions per example (data.max_tokens).")
    flags.DEFINE_integer("num_slices", 0, "Slices per volume (data.max_slices); 0 = the config's.")
    flags.DEFINE_string("lora", "paper", "LoRA variant: paper (r=16) or card (r=64).")
    flags.DEFINE_string("remat_policy", "", "Layer remat policy (model/llama.py REMAT_POLICIES); '' = the preset's.")
    flags.DEFINE_bool("flops", True, "Also lower the step and forward with unrolled layers to count FLOPs.")


GiB = 1024 ** 3


class AotError(ValueError):
    """A flag that cannot describe a step: one line, exit 2."""


def phase_config(phase: int, preset: str, batch_per_device: int, seq_len: int, num_slices: int, lora: str,
                 mesh: str):
    """The phase's paper config at the requested shapes (what `train` would run with)."""
    config = config_lib.load_phase_config(phase, f"paper,lora={lora}")
    config.model.preset = preset
    config.mesh = mesh
    config.train.batch_per_device = batch_per_device
    config.data.max_tokens = seq_len
    if num_slices:
        config.data.max_slices = num_slices
    if preset == "tiny":
        config.model.whiten_layer = -1
    config_lib.resolve_batch(config, jax.device_count())
    run_lib.check_layout(config)
    return config


def vlm_config(config, scan_layers: bool = True, remat_policy: str = "") -> vlm_lib.VLMConfig:
    """The trainer's VLM config for the preset, with <|visual_region|> appended to the vocabulary."""
    base = llama_lib.preset(config.model.preset)
    llm = base.replace(vocab_size=base.vocab_size + 1, lora=run_lib.lora_config(config), scan_layers=scan_layers,
                       remat_policy=remat_policy or base.remat_policy)
    return vlm_lib.make_config(visual_token_id=base.vocab_size, d_visual=int(config.data.embed_dim),
                               num_visual_tokens=int(config.data.num_visual_tokens),
                               jepa_dim=int(config.model.jepa_dim), llm_config=llm)


def _on(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(vcfg: vlm_lib.VLMConfig, mesh) -> dict:
    """Unboxed ShapeDtypeStructs of every param, each with its NamedSharding from AXIS_RULES."""
    d = vcfg.compressor.d_visual
    boxed = jax.eval_shape(lambda key: vlm_lib.VLM(vcfg).init(
        key, jnp.zeros((1, 4, d)), jnp.zeros((1, 4)), jnp.ones((1, 4), bool),
        jnp.full((1, vcfg.num_visual_tokens), vcfg.visual_token_id, jnp.int32)), jax.random.key(0))
    shardings = sharding.named_shardings(boxed, mesh)["params"]
    return _on(nn.unbox(boxed)["params"], shardings)


def abstract_batch(config, vcfg: vlm_lib.VLMConfig, mesh, phase: int) -> dict:
    """The train step's batch as the trainer feeds it: the pipeline's arrays, the cached whitened
    text targets, and V' for a phase whose compressor is frozen (phases 3-4)."""
    batch_size = int(config.train.batch_size)
    spec = dict(pipeline_lib.batch_spec(config.data))
    jepa = vcfg.bridge.jepa_dim
    if config.train.cache_text_targets:
        spec["target_embedding"] = ((jepa,), np.float32)
        spec["condition_embedding"] = ((findings.NUM_CLASSES, jepa), np.float32)
    if config.train.cache_visual_tokens and phase in (3, 4):
        spec["visual_tokens"] = ((vcfg.num_visual_tokens, vcfg.compressor.d_visual), np.dtype(vcfg.compressor.dtype))
    return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype,
                                    sharding=pipeline_lib.batch_sharding(mesh, 1 + len(shape)))
            for k, (shape, dtype) in spec.items()}


def build(config, phase: int, mesh, scan_layers: bool = True, remat_policy: str = "") -> dict:
    """Abstract arguments and the trainer's step and forward for `phase`, unlowered."""
    vcfg = vlm_config(config, scan_layers, remat_policy)
    params = abstract_params(vcfg, mesh)
    labels = phases.trainable_labels(params, config.optimizer_groups, phase)
    trainable, frozen = phases.split_params(params, labels)
    tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch=1000)
    with sharding.use_mesh(mesh):
        opt_state = jax.jit(tx.init).eval_shape(trainable)
    replicated = sharding.replicated(mesh)
    rep = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)  # noqa: E731
    calibration = rep({"calibrator": {"alpha": jax.ShapeDtypeStruct((), jnp.float32)}})
    d_llm, jepa = vcfg.llm.hidden_size, vcfg.bridge.jepa_dim
    consts = rep({"whitening": {"mean": jax.ShapeDtypeStruct((d_llm,), jnp.float32),
                                "projection": jax.ShapeDtypeStruct((d_llm, jepa), jnp.float32)},
                  "pos_weight": jax.ShapeDtypeStruct((findings.NUM_CLASSES,), jnp.float32)})
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    batch = abstract_batch(config, vcfg, mesh, phase)
    weights = dict(config.loss_weights)
    encoder = step_lib.TextEncoder(vcfg.llm, text_targets.whiten_layer(config, vcfg.llm))   # as the trainer's
    train_step = step_lib.make_train_step(phase, vlm_lib.VLM(vcfg, deterministic=False), encoder, tx, weights)
    eval_step = step_lib.make_eval_step(phase, vlm_lib.VLM(vcfg), encoder, weights)
    return {"step": (jax.jit(train_step, donate_argnums=(0, 2)),
                     (trainable, frozen, opt_state, calibration, batch, rng, consts)),
            "forward": (jax.jit(eval_step), (params, calibration, batch, consts)),
            "trainable": trainable, "remat_policy": vcfg.llm.remat_policy}


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def analyse(config, phase: int, mesh, count_flops: bool = True, remat_policy: str = "") -> dict:
    """Compile the scanned step (memory, compile time); count FLOPs on unrolled lowerings."""
    built = build(config, phase, mesh, remat_policy=remat_policy)
    fn, args = built["step"]
    with sharding.use_mesh(mesh):
        t0 = time.time()
        lowered = fn.lower(*args)
        compiled = lowered.compile()
        compile_seconds = time.time() - t0
    memory = compiled.memory_analysis()
    per_device = {"argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
                  "temp_bytes": int(memory.temp_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes)}
    per_device["per_device_bytes"] = (per_device["argument_bytes"] + per_device["output_bytes"]
                                      + per_device["temp_bytes"] - per_device["alias_bytes"])
    trainable = [x for x in jax.tree.leaves(built["trainable"])]
    out = {"preset": config.model.preset, "phase": phase, "mesh": dict(mesh.shape),
           "remat_policy": built["remat_policy"],
           "global_batch": int(config.train.batch_size), "seq_len": int(config.data.max_tokens),
           "num_slices": int(config.data.max_slices), "compile_seconds": round(compile_seconds, 1), **per_device,
           "trainable_params": int(sum(np.prod(x.shape) for x in trainable)),
           "trainable_dtypes": sorted({str(x.dtype) for x in trainable})}
    if count_flops:
        unrolled = build(config, phase, mesh, scan_layers=False, remat_policy=remat_policy)
        with sharding.use_mesh(mesh):
            step_fn, step_args = unrolled["step"]
            fwd_fn, fwd_args = unrolled["forward"]
            out["step_flops"] = _flops(step_fn.lower(*step_args).cost_analysis())
            out["forward_flops"] = _flops(fwd_fn.lower(*fwd_args).cost_analysis())
        out["step_over_forward"] = round(out["step_flops"] / max(out["forward_flops"], 1.0), 3)
    return out


def report(figures: dict) -> str:
    lines = [f"{figures['preset']} phase {figures['phase']} train step, mesh {figures['mesh']}, global batch "
             f"{figures['global_batch']} x {figures['seq_len']} tokens, {figures['num_slices']} slices, "
             f"remat {figures['remat_policy']}",
             f"  trainable: {figures['trainable_params'] / 1e6:.1f}M params in {figures['trainable_dtypes']}",
             f"  compile: {figures['compile_seconds']:.1f} s"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "per_device_bytes"):
        lines.append(f"  per device {key[:-6]:>9}: {figures[key] / GiB:8.2f} GiB")
    if "step_flops" in figures:
        lines.append(f"  FLOPs (all devices, unrolled layers): step {figures['step_flops']:.3e}, forward "
                     f"{figures['forward_flops']:.3e}, ratio {figures['step_over_forward']:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli_lib.fail("aot", f"unexpected arguments {argv[1:]}; flags are --preset, --phase, --mesh, ...", 2)
    if FLAGS.phase not in config_lib.PHASES:
        cli_lib.fail("aot", f"--phase={FLAGS.phase}: choose one of {list(config_lib.PHASES)}", 2)
    for name in ("batch_per_device", "seq_len"):
        if FLAGS[name].value < 1:
            cli_lib.fail("aot", f"--{name}={FLAGS[name].value}: must be >= 1", 2)
    try:
        config = phase_config(FLAGS.phase, FLAGS.preset, FLAGS.batch_per_device, FLAGS.seq_len, FLAGS.num_slices,
                              FLAGS.lora, FLAGS.mesh)
    except (ValueError, run_lib.TrainError) as e:
        cli_lib.fail("aot", str(e).splitlines()[0].replace("--config.mesh", "--mesh"), 2)
    mesh = sharding.mesh_from_spec(FLAGS.mesh)
    if FLAGS.remat_policy and FLAGS.remat_policy not in llama_lib.REMAT_POLICIES:
        cli_lib.fail("aot", f"--remat_policy={FLAGS.remat_policy}: choose one of {sorted(llama_lib.REMAT_POLICIES)}", 2)
    figures = analyse(config, FLAGS.phase, mesh, FLAGS.flops, FLAGS.remat_policy)
    print(report(figures))
    print(json.dumps(figures))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("aot"))
