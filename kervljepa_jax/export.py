"""Export a trained phase to Hugging Face PyTorch (issue 26): `python -m kervljepa_jax.export`.

    python -m kervljepa_jax.export --workdir=DIR --out=OUT [--phase=4] [--checkpoint=best|latest|STEP]
        [--dtype=bf16|f32] [--with_base]

restores the phase's checkpoint (best by its validation metric, the latest, or a step) with the
config it was trained with, and writes OUT:

  llm/      the decoder with LoRA merged: a transformers LlamaForCausalLM folder (config.json,
            generation_config.json with the paper's sampling settings, safetensors sharded at 5 GB,
            the run's tokenizer with <|visual_region|>)
  adapter/  the LoRA alone as a PEFT adapter (adapter_config.json + adapter_model.safetensors)
  base/     with --with_base: the unmerged decoder the adapter belongs on (the checkpoint's own
            base weights: its embeddings carry the rows the run's tokenizer added)
  bridge/   bridge.safetensors (compressor, predictor, calibrator alpha, cross-attention adapters,
            projectors, heads, text whitening) in torch layouts + config.json: what
            `kervljepa_jax.torch_runner` rebuilds the bridge from
  README.md the model card

Everything is written into a staging folder beside OUT and renamed to OUT at the end: a mistake
(no such phase or step, OUT not empty) or a failure halfway leaves nothing behind. The base LLM's
weights are read only for the frozen tensors a checkpoint leaves out (one at a time, checked against
its record), and the decoder tensors are written one at a time from the restored params
(`hf.save_llama`): writing adds one tensor, not a second copy of the model (peak host memory:
docs/export.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, evaluate, hf
from kervljepa_jax import whitening as whitening_lib
from kervljepa_jax.data import pipeline as pipeline_lib, text as text_lib, tokenizer as tokenizers
from kervljepa_jax.data.records import DataError
from kervljepa_jax.model import llama as llama_lib, vlm as vlm_lib
from kervljepa_jax.sampling import SamplingConfig
from kervljepa_jax.training import checkpoint as ckpt_lib, run as run_lib

DTYPES = {"bf16": "bfloat16", "f32": "float32"}
BRIDGE_FILE = "bridge.safetensors"
# The paper's decoding (IV-B): what generation_config.json and the torch runner use.
PAPER_SAMPLING = SamplingConfig()


class ExportError(ValueError):
    """A user mistake found by the exporter: one line, non-zero exit."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    workdir: str
    out: str
    phase: int = 4
    checkpoint: str = "best"          # best | latest | a step number
    dtype: str = "bf16"               # stored dtype of llm/ and base/ (the bridge stays float32)
    with_base: bool = False
    max_shard_bytes: int = hf.SHARD_BYTES


@dataclasses.dataclass
class Trained:
    """A restored phase: its config, tokenizer, VLM config, step, params (on the host) and alpha."""

    config: Any
    tokenizer: Any
    vcfg: vlm_lib.VLMConfig
    step: int
    params: Any
    alpha: float
    checkpoint_metrics: dict


# ----------------------------------------------------------------------------- restoring the phase


def check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out={out} exists and is not an empty folder; pass a new folder")


def resolve_step(ckpt: ckpt_lib.PhaseCheckpointer, which: str) -> int:
    """`best` (by the phase's validation metric; the latest if none has one), `latest`, or a saved step."""
    steps = sorted(ckpt.all_steps())
    if not steps:          # every step folder damaged: the checkpointer hides them all
        raise ExportError(f"phase {ckpt.phase}: no readable checkpoint in {ckpt.directory} "
                          f"(damaged: {ckpt.skipped_steps})")
    if which == "best":
        best = ckpt.best_step()
        return steps[-1] if best is None else best
    if which == "latest":
        return steps[-1]
    if not which.isdigit() or int(which) not in steps:
        raise ExportError(f"--checkpoint={which}: phase {ckpt.phase} has steps {steps}; pass best, latest or one "
                          "of them")
    return int(which)


def llm_config(config, tokenizer, workdir: str) -> llama_lib.LlamaConfig:
    """The decoder's config as the run built it (training/run.load_base_llm), from the base LLM's
    config.json alone: no weight is read here (`restore` reads the frozen ones the checkpoint leaves out)."""
    folder = config.model.llm_path or os.path.join(workdir, "base_llm")
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        raise ExportError(f"{file}: missing; the export needs the base LLM's config.json that phase trained from")
    preset = llama_lib.preset(config.model.preset)
    injection = tuple(int(i) for i in config.model.injection_layers) or preset.injection_layers
    with open(file, encoding="utf-8") as f:
        cfg = hf.config_from_hf(json.load(f), file, lora=run_lib.lora_config(config), injection_layers=injection,
                                dtype=preset.dtype, param_dtype=preset.param_dtype)
    return cfg.replace(vocab_size=max(cfg.vocab_size, tokenizers.vocab_size(tokenizer)))


def host_target(vcfg: vlm_lib.VLMConfig) -> Any:
    """The param tree's ShapeDtypeStructs on the host CPU: the export reads from host memory."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    d, k = vcfg.compressor.d_visual, vcfg.num_visual_tokens
    abstract = jax.eval_shape(lambda key: vlm_lib.VLM(vcfg).init(
        key, jnp.zeros((1, 4, d)), jnp.zeros((1, 4)), jnp.ones((1, 4), bool),
        jnp.full((1, k), vcfg.visual_token_id, jnp.int32)), jax.random.key(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), nn.unbox(abstract)["params"])


def restore(options: ExportOptions) -> Trained:
    """The phase's checkpoint `options.checkpoint` with the config it was trained with."""
    evaluate.check_phase(options.workdir, options.phase)
    config = evaluate.phase_eval_config(options.workdir, options.phase)
    config.data.workdir = options.workdir
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(options.workdir, config, options.phase, read_only=True)
    try:
        step = resolve_step(ckpt, options.checkpoint)
        folder = config.model.llm_path or os.path.join(options.workdir, "base_llm")
        tokenizer = pipeline_lib.make_tokenizer(run_lib.tokenizer_config(config, folder))
        vcfg = run_lib.make_vlm_config(config, tokenizer, llm_config(config, tokenizer, options.workdir))
        # The base LLM's frozen leaves, which the checkpoint leaves out, are read only if it does.
        restored = ckpt.restore(step, host_target(vcfg),
                                base=lambda: run_lib.load_base_llm(config, tokenizer, options.workdir, None)[1])
        metrics = ckpt.metrics(step) or {}
    finally:
        ckpt.close()
    logging.info("export: phase %d step %d restored from %s", options.phase, step, ckpt.directory)
    return Trained(config=config, tokenizer=tokenizer, vcfg=vcfg, step=step, params=restored.params,
                   alpha=float(restored.alpha or 1.0), checkpoint_metrics=dict(metrics))


# ----------------------------------------------------------------------------- the bridge in torch layouts


def _np(x: Any) -> np.ndarray:
    return np.array(jax.device_get(x), np.float32)        # a 0-d gate stays 0-d (ascontiguousarray would not)


def _linear(prefix: str, p: dict) -> dict[str, np.ndarray]:
    """flax Dense {kernel [in, out], bias} -> torch Linear {weight [out, in], bias}."""
    return {f"{prefix}.weight": _np(p["kernel"]).T.copy(), f"{prefix}.bias": _np(p["bias"])}


def _layer_norm(prefix: str, p: dict) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": _np(p["scale"]), f"{prefix}.bias": _np(p["bias"])}


def _mha(prefix: str, p: dict) -> dict[str, np.ndarray]:
    """TorchMultiheadAttention -> nn.MultiheadAttention (the inverse of compressor.torch_mha_to_params)."""
    qkv = [_np(p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")]          # [d, H, hd] each
    d = qkv[0].shape[0]
    return {f"{prefix}.in_proj_weight": np.concatenate([k.reshape(d, d).T for k in qkv]),
            f"{prefix}.in_proj_bias": np.concatenate([_np(p[n]["bias"]).reshape(d) for n in ("q_proj", "k_proj",
                                                                                               "v_proj")]),
            f"{prefix}.out_proj.weight": _np(p["out_proj"]["kernel"]).reshape(d, d).T.copy(),
            f"{prefix}.out_proj.bias": _np(p["out_proj"]["bias"])}


def _cross_attention(prefix: str, p: dict) -> dict[str, np.ndarray]:
    """GatedCrossAttention -> bias-free torch Linears q/k/v [H*hd, D], o [D, H*hd], the LN, the gate [] if any."""
    out = {f"{prefix}.{n}.weight": _np(p[n]["kernel"]).reshape(_np(p[n]["kernel"]).shape[0], -1).T.copy()
           for n in ("q_proj", "k_proj", "v_proj")}
    o = _np(p["o_proj"]["kernel"])                                                # [H, hd, D]
    out[f"{prefix}.o_proj.weight"] = o.reshape(-1, o.shape[-1]).T.copy()
    if "gate" in p:                                   # an ungated adapter (xattn gate "none") has none
        out[f"{prefix}.gate"] = _np(p["gate"])
    return {**out, **_layer_norm(f"{prefix}.layer_norm", p["layer_norm"])}


def bridge_tensors(params: Any, vcfg: vlm_lib.VLMConfig, alpha: float,
                   whitening: whitening_lib.Whitening | None) -> dict[str, np.ndarray]:
    """Every non-decoder weight of the VLM as torch module state (names: torch_runner.Bridge)."""
    c = params["compressor"]
    out = {"compressor.region_queries": _np(c["queries"]), **_mha("compressor.zone_attn", c["zone_attn"]),
           **_mha("compressor.global_layer.self_attn", c["global_layer"]["self_attn"])}
    for name in ("linear1", "linear2"):
        out.update(_linear(f"compressor.global_layer.{name}", c["global_layer"][name]))
    for name in ("norm1", "norm2"):
        out.update(_layer_norm(f"compressor.global_layer.{name}", c["global_layer"][name]))
    out.update({**_linear("predictor.linear", params["predictor"]["linear"]),
                **_layer_norm("predictor.norm", params["predictor"]["norm"])})
    out["calibrator.alpha"] = np.asarray(alpha, np.float32)
    for layer in vcfg.llm.injection_layers:
        out.update(_linear(f"projectors.{layer}", params[f"projector_{layer}"]))
        out.update(_cross_attention(f"xattn.{layer}", params[f"xattn_{layer}"]))
    head = params["jepa_head"]
    out.update({**_linear("jepa_head.linear1", head["linear1"]), **_layer_norm("jepa_head.norm", head["norm"]),
                **_linear("jepa_head.linear2", head["linear2"]),
                **_linear("visual_classifier.linear", params["visual_classifier"]["linear"]),
                **_linear("llm_classifier.linear", params["llm_classifier"]["linear"]),
                "log_temperature": _np(params["log_temperature"])})
    if whitening is not None:
        out["whitening.mean"] = np.asarray(whitening.mean, np.float32)
        out["whitening.projection"] = np.asarray(whitening.projection, np.float32)
    return out


def bridge_sizes(v: vlm_lib.VLMConfig) -> dict[str, Any]:
    """Every size `torch_runner.Bridge` is built from (the part of bridge/config.json a model needs)."""
    return {
        "visual_token_id": v.visual_token_id, "num_visual_tokens": v.num_visual_tokens,
        "injection_layers": list(v.llm.injection_layers), "dtype": "float32",
        "compressor": {k: getattr(v.compressor, k) for k in ("d_visual", "num_zones", "num_heads", "ffn_dim",
                                                              "layer_norm_eps", "pe_base", "z_relative_to_first")},
        "bridge": {k: getattr(v.bridge, k) for k in ("d_visual", "d_llm", "jepa_hidden", "jepa_dim", "num_classes",
                                                     "layer_norm_eps")},
        "xattn": {**{k: getattr(v.xattn, k) for k in ("d_model", "num_heads", "head_dim", "layer_norm_eps")},
                  "gate": getattr(v.xattn, "gate", "tanh")},
    }


def bridge_config(trained: Trained) -> dict[str, Any]:
    """What the torch runner needs besides the tensors: every size, the prompt and the special ids."""
    v = trained.vcfg
    ids = tokenizers.special_ids(trained.tokenizer)
    return {
        "format": "kervljepa-bridge/1", "phase": int(trained.config.phase), "step": trained.step,
        **bridge_sizes(v), "prompt": text_lib.chat_prompt(v.num_visual_tokens),
        "prompt_ids": [int(i) for i in text_lib.encode_prompt(trained.tokenizer, v.num_visual_tokens)],
        "eos_token_ids": [ids["eot"], ids["eos"]], "pad_token_id": ids["pad"],
    }


# ----------------------------------------------------------------------------- writing OUT


def generation_config(tokenizer, visual_token_id: int, sampling: SamplingConfig = PAPER_SAMPLING) -> dict:
    """generation_config.json: the paper's sampling; <|visual_region|> is an input slot, never a word
    (the JAX decoder masks it the same way, vlm.VLM._no_placeholder)."""
    ids = tokenizers.special_ids(tokenizer)
    return {"do_sample": sampling.do_sample, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty,
            "no_repeat_ngram_size": sampling.no_repeat_ngram_size, "max_new_tokens": sampling.max_new_tokens,
            "bos_token_id": ids["bos"], "eos_token_id": [ids["eot"], ids["eos"]], "pad_token_id": ids["pad"],
            "suppress_tokens": [visual_token_id]}


def write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def write_hf_folder(trained: Trained, folder: str, lora: str, options: ExportOptions) -> list[str]:
    """A complete transformers folder: weights (LoRA merged or dropped), generation config, tokenizer."""
    names = hf.save_llama(trained.vcfg.llm, trained.params["llm"], folder, lora=lora,
                          dtype=DTYPES[options.dtype], max_shard_bytes=options.max_shard_bytes)
    write_json(os.path.join(folder, "generation_config.json"),
               generation_config(trained.tokenizer, trained.vcfg.visual_token_id))
    trained.tokenizer.save_pretrained(folder)
    return names


def write_bridge(trained: Trained, folder: str, workdir: str) -> None:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(workdir, "whitening.npz")
    whitening = whitening_lib.load(path) if os.path.isfile(path) else None
    tensors = bridge_tensors(trained.params, trained.vcfg, trained.alpha, whitening)
    hf.save_safetensors(tensors, os.path.join(folder, BRIDGE_FILE))
    shape = None if whitening is None else list(np.shape(whitening.projection))      # [D, k]
    write_json(os.path.join(folder, "config.json"), {**bridge_config(trained), "whitening_shape": shape})


def phase_metrics(workdir: str, phase: int, step: int) -> dict | None:
    """The phase's metrics.json headline numbers when it evaluated this very step, else None."""
    path = os.path.join(workdir, f"phase{phase}", "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("checkpoint_step") != step or "report" not in payload:
        return None
    return evaluate.headline_numbers(payload)


def export(options: ExportOptions) -> str:
    """The whole export; returns OUT. Nothing is left behind on an error."""
    out = os.path.abspath(options.out)
    check_out(out)
    if options.dtype not in DTYPES:
        raise ExportError(f"--dtype={options.dtype}: choose one of {sorted(DTYPES)}")
    trained = restore(options)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    try:
        shards = write_hf_folder(trained, os.path.join(staging, "llm"), "merge", options)
        base = None
        if options.with_base:
            write_hf_folder(trained, os.path.join(staging, "base"), "drop", options)
            base = "../base"
        hf.save_peft_lora(trained.vcfg.llm, trained.params["llm"], os.path.join(staging, "adapter"),
                          base or (trained.config.model.llm_path or None))
        write_bridge(trained, os.path.join(staging, "bridge"), options.workdir)
        metrics = phase_metrics(options.workdir, options.phase, trained.step)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(trained, options, metrics, len(shards)))
        if os.path.isdir(out):
            os.rmdir(out)                                  # empty (check_out): the rename takes its place
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- the model card

_PHASES = {1: "visual alignment (compressor, visual classifier, JEPA head)",
           2: "contrastive bridge (compressor, predictor, JEPA head, temperature)",
           3: "generation (predictor, LoRA, cross-attention adapters, projectors, heads)",
           4: "narrative (LoRA only, EWC to phase 3)"}


def _metrics_section(trained: Trained, metrics: dict | None, workdir: str, phase: int) -> str:
    lines = []
    if metrics is not None:
        ci = metrics["macro_f1_ci"]
        lines.append(f"Validation ({metrics['num_volumes']} volumes, `phase{phase}/metrics.json`): macro F1 "
                     f"{metrics['macro_f1']:.3f} (bootstrap 95% CI {ci['low']:.3f}-{ci['high']:.3f}), precision "
                     f"{metrics['precision']:.3f}, recall {metrics['recall']:.3f}.")
        for mode, a in sorted(metrics.get("ablations", {}).items()):
            lines.append(f"- visual tokens {mode}: macro F1 {a['macro_f1']:.3f} on {a['num_volumes']} volumes "
                         f"(full model {a['full_macro_f1']:.3f} on the same)")
        lines.append("\n| class | F1 |\n|---|---|")
        lines += [f"| {name} | {f1:.3f} |" for name, f1 in metrics["per_class_f1"].items()]
    else:
        lines.append(f"`{workdir}/phase{phase}/metrics.json` does not evaluate step {trained.step} (it scores the "
                     "phase's best checkpoint): run `python -m kervljepa_jax.evaluate` on this step for its numbers.")
    if trained.checkpoint_metrics:
        saved = ", ".join(f"{k} {v:.4g}" for k, v in sorted(trained.checkpoint_metrics.items()))
        lines.append(f"\nMetrics saved with the checkpoint during training: {saved}.")
    return "\n".join(lines)


def model_card(trained: Trained, options: ExportOptions, metrics: dict | None, num_shards: int) -> str:
    v, c, s = trained.vcfg, trained.config, PAPER_SAMPLING
    llm = v.llm
    data = "synthetic CT-RATE stand-in (kervljepa_jax.data.synthetic)" if c.data.source == "synthetic" \
        else f"CT-RATE ({c.data.source}, {c.data.get('root', '')})"
    base = c.model.llm_path or f"the packaged/stand-in `{c.model.preset}` decoder (WORKDIR/base_llm)"
    return f"""# Ker-VLJEPA export: phase {options.phase}, step {trained.step}

Exported by `python -m kervljepa_jax.export` from `{options.workdir}`: a Llama-architecture decoder
({llm.num_hidden_layers} layers, hidden {llm.hidden_size}, vocabulary {llm.vocab_size}) with LoRA
(r={llm.lora.rank if llm.lora else 0}, alpha={llm.lora.alpha if llm.lora else 0}), grafted with a CT slice-encoder
bridge: a zone-constrained compressor ({v.num_visual_tokens} tokens from slice embeddings of width
{v.compressor.d_visual}), the JEPA predictor, the norm calibrator (alpha {trained.alpha:.6g}) and gated
cross-attention adapters after decoder layers {list(llm.injection_layers)} (0-based).

Trained: the curriculum up to phase {options.phase}, {_PHASES.get(options.phase, '')}, on the {data};
base LLM {base}. Weights stored as {DTYPES[options.dtype]} (llm/, base/) and float32 (adapter/, bridge/).

## Validation metrics of this checkpoint

{_metrics_section(trained, metrics, options.workdir, options.phase)}

## Sampling (paper IV-B, in llm/generation_config.json)

temperature {s.temperature}, top_p {s.top_p}, repetition_penalty {s.repetition_penalty},
no_repeat_ngram_size {s.no_repeat_ngram_size}, max_new_tokens {s.max_new_tokens}, do_sample true;
`<|visual_region|>` (id {v.visual_token_id}) is suppressed: it is an input slot, not a word.

## Files

- `llm/`: LoRA merged; `transformers.LlamaForCausalLM.from_pretrained("llm", use_safetensors=True)`
  ({num_shards} safetensors file(s)), with the tokenizer (`AutoTokenizer.from_pretrained("llm")`).
- `adapter/`: the PEFT LoRA adapter; `peft.PeftModel.from_pretrained(base, "adapter")` on
  {'`base/` (the unmerged decoder)' if options.with_base else 'the unmerged decoder (--with_base writes it as base/)'}.
- `bridge/`: `bridge.safetensors` + `config.json` (compressor, predictor, calibrator, adapters,
  projectors, heads{', whitening' if os.path.isfile(os.path.join(options.workdir, 'whitening.npz')) else ''}).

## Generating a report in PyTorch

```bash
python -m kervljepa_jax.torch_runner --export=OUT --slices=slices.npy [--z_mm=z_mm.npy]
```

```python
from kervljepa_jax import torch_runner
runner = torch_runner.load("OUT")                       # or load("OUT", use_adapter=True): base + PEFT
print(runner.generate_reports(slices, z_mm)[0])         # slices [B, N, {v.compressor.d_visual}], z_mm [B, N] mm
```

The visual tokens replace the embeddings at the {v.num_visual_tokens} `<|visual_region|>` placeholders of
the chat prompt (bridge/config.json `prompt_ids`), and the adapters run as forward hooks on
`model.model.layers[i]` at every decode step.
"""


# ----------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the CLI starts, not at import: train.py defines --workdir/--phase of its own, and a
    process (a notebook, the tests) may import both modules."""
    flags.DEFINE_string("workdir", None, "Training workdir (holds phaseN/checkpoints).")
    flags.DEFINE_integer("phase", 4, "Curriculum phase to export (1-4).")
    flags.DEFINE_string("checkpoint", "best", "best (by the phase's validation metric), latest, or a step number.")
    flags.DEFINE_string("out", None, "Output folder: new or empty.")
    flags.DEFINE_enum("dtype", "bf16", sorted(DTYPES), "Stored dtype of llm/ and base/.")
    flags.DEFINE_bool("with_base", False, "Also write the unmerged decoder as OUT/base (the adapter's base).")


def _fail(message: str, code: int = 1):
    cli_lib.fail("export", message, code)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --workdir, --out, --phase, --checkpoint, ...", 2)
    for name in ("workdir", "out"):
        if not FLAGS[name].value:
            _fail(f"--{name} is required (python -m kervljepa_jax.export --workdir=DIR --out=OUT)", 2)
    if not 1 <= FLAGS.phase <= 4:
        _fail(f"--phase={FLAGS.phase}: choose 1, 2, 3 or 4", 2)
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    options = ExportOptions(workdir=FLAGS.workdir, out=FLAGS.out, phase=FLAGS.phase, checkpoint=FLAGS.checkpoint,
                            dtype=FLAGS.dtype, with_base=FLAGS.with_base)
    try:
        out = export(options)
    except (ExportError, evaluate.EvalError, ckpt_lib.CheckpointError, hf.HFLoadError, DataError,
            run_lib.TrainError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps({"out": out, "phase": options.phase, "checkpoint": options.checkpoint}))


def cli() -> None:
    _define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("export"))


if __name__ == "__main__":
    cli()
