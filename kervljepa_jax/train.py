"""The four-phase curriculum (paper III-C, IV-B): `python -m kervljepa_jax.train`.

    python -m kervljepa_jax.train --phase=all --workdir=/tmp/kervljepa        # embedded default
    python -m kervljepa_jax.train --phase=3 --workdir=DIR --config=configs/phase3.py:paper \\
        --config.model.llm_path=/models/Llama-3.2-3B-Instruct --config.data.root=/data/ct-rate

With no data flags it runs the synthetic CT-RATE stand-in and the tiny preset. The tiny decoder
stands in for Llama 3.2 3B, which arrives knowing English: when no `model.llm_path` is given, a
"phase 0" pretrains it on the training reports (text only) and saves it as a HF Llama folder in
WORKDIR/base_llm, which every later phase then loads exactly like a real checkpoint.

Per phase N (WORKDIR/phaseN): resume from its latest checkpoint if any, else start from
--init_from or the best checkpoint of phase N-1 (phase 1: the base LLM + fresh bridge, with SVD
query/predictor init and alpha calibration); train with the phase table; evaluate; keep the best
and latest checkpoints; write metrics.jsonl + TensorBoard events. `--phase=all` runs 1-4, then
writes WORKDIR/report.json and the figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from flax import linen as nn
from ml_collections import config_flags

from kervljepa_jax import cli as cli_lib, evaluate, figures, hf, losses, sharding, whitening as whitening_lib
from kervljepa_jax.data import pipeline as pipeline_lib
from kervljepa_jax.data import text as text_lib
from kervljepa_jax.data import tokenizer as tokenizers
from kervljepa_jax.data.records import DataError
from kervljepa_jax.generate import ReportGenerator
from kervljepa_jax.model import bridge as bridge_lib
from kervljepa_jax.model import compressor as compressor_lib
from kervljepa_jax.model import llama as llama_lib
from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.sampling import SamplingConfig
from kervljepa_jax.training import checkpoint as ckpt_lib
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import optim, phases, step as step_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("phase", "all", ["1", "2", "3", "4", "all"], "Curriculum phase to run, or all four.")
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, logs, tokenizer, report.json.")
flags.DEFINE_string("init_from", "", "Checkpoint to start the phase from (default: best of phase N-1).")
flags.DEFINE_string("warm_bridge_from", "", "Phase-3 checkpoint whose bridge (projectors, adapters, LoRA) "
                    "overwrites ours at the start of phase 3.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host GPU / TPU pod).")


def _default_config_file(argv: list[str]) -> str:
    """configs/phaseN.py for `--phase=N` (so `--config.x` may name a field only phase N has), else phase 1."""
    phase = next((a.split("=", 1)[1] for a in argv if a.startswith("--phase=")), None)
    if phase is None and "--phase" in argv[:-1]:
        phase = argv[argv.index("--phase") + 1]
    return str(config_lib.CONFIGS_DIR / f"phase{phase if phase in ('1', '2', '3', '4') else 1}.py")


try:  # config_flags applies --config.a.b=v right here, at definition: a missing field fails now
    config_flags.DEFINE_config_file("config", _default_config_file(sys.argv),
                                    "Phase config file[:arg]; with --phase=all its arg (profile) applies to every phase.")
except (KeyError, AttributeError) as _error:
    cli_lib.bad_config_field(cli_lib.program_name(), sys.argv, _error)

GENERATING_PHASES = (3, 4)


class TrainError(ValueError):
    """A user mistake found by the trainer: one line, non-zero exit."""


# ----------------------------------------------------------------------------- configs


def phase_config(phase: int, arg: str | None, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """configs/phase{phase}.py:{arg} with the command line's `--config.a.b=v` overrides."""
    return config_lib.apply_overrides(config_lib.load_phase_config(phase, arg), overrides)


# ----------------------------------------------------------------------------- logging


class MetricLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard event files, per workdir."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
        except ImportError:  # an optional nicety; the JSONL is the record
            logging.warning("tensorboardX not installed: metrics go to %s only", self.path)

    def write(self, phase: int, step: int, values: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        record = {"phase": phase, "step": int(step), **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"phase{phase}/{k}", float(v), int(step))
            self._tb.flush()


# ----------------------------------------------------------------------------- the model


def lora_config(config) -> lora_lib.LoraConfig:
    c = config.model.lora
    return lora_lib.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout))


def pretrain_base_llm(config, tokenizer, workdir: str, metric_log: MetricLog) -> str:
    """Phase 0 for the tiny preset: LM-pretrain the decoder on the training reports; save as a HF folder."""
    out = os.path.join(workdir, "base_llm")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    steps = int(config.model.pretrain_steps)
    cfg = llama_lib.preset(config.model.preset, vocab_size=tokenizers.vocab_size(tokenizer), lora=None)
    texts = pretraining_corpus(config.data, int(config.train.seed))
    if not texts:
        raise TrainError("model.llm_path is empty and the data source has no report corpus to pretrain on; "
                         "pass --config.model.llm_path=HF_DIR")
    # Plain text, no chat template. (Wrapping it in the chat template was tried: the LLM then leaned
    # on its prior and zeroing the visual tokens no longer hurt, F1 0.114 vs 0.120 zeroed, against
    # 0.100 vs 0.007 with plain text; plain text it is.)
    eot = tokenizers.special_ids(tokenizer)["eot"]
    tokens = pack_documents(text_lib.encode_texts(tokenizer, texts), eot, int(config.model.pretrain_seq_len))
    mask = np.ones_like(tokens, bool)
    model = llama_lib.Llama(cfg)
    params = jax.jit(model.init)(jax.random.key(int(config.train.seed)), jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(params)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, config.model.pretrain_lr, max(1, steps // 10), max(steps, 2)), 0.9,
                                 0.95, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch_tokens, batch_mask):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch_tokens, attention_mask=batch_mask).logits
            return losses.lm_loss(logits, batch_tokens, batch_mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(int(config.train.seed))
    batch = int(config.model.pretrain_batch_size)
    bar = tqdm.tqdm(range(steps), desc="phase 0 (base LLM)", disable=jax.process_index() != 0)
    for s in bar:
        idx = rng.integers(0, len(tokens), batch)
        params, opt_state, loss = train_step(params, opt_state, tokens[idx], mask[idx])
        if s % 20 == 0 or s == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
            metric_log.write(0, s, {"loss": loss})
    hf.save_llama(cfg, params, out)
    logging.info("phase 0: base LLM (%d steps, final LM loss %.3f) saved to %s", steps, float(loss), out)
    return out


def pack_documents(docs: list[list[int]], eot: int, seq_len: int) -> np.ndarray:
    """[M, seq_len] int32: the documents, each followed by `eot`, concatenated and cut into rows.

    Packing, not one padded row per document: a synthetic report (~290 tokens) is not truncated
    and a findings text (~45 tokens) does not leave most of its row as padding.
    """
    stream = np.fromiter((t for doc in docs for t in (*doc, eot)), np.int32)
    rows = len(stream) // seq_len
    if rows == 0:
        raise TrainError(f"phase 0: the corpus has {len(stream)} tokens, fewer than one "
                         f"model.pretrain_seq_len={seq_len} row; lower it or add training reports")
    return stream[: rows * seq_len].reshape(rows, seq_len)


def training_reports(data) -> list[str]:
    """The training split's Findings_EN texts (the phase-0 corpus)."""
    if data.source == "synthetic":
        return list(pipeline_lib.synthetic.SyntheticSource(data, "train").reports())
    path = pipeline_lib.ctrate.resolve(data.root, data.reports_csv["train"])
    return [f["Findings_EN"] for _, f in pipeline_lib.ctrate.read_csv(path, pipeline_lib.ctrate.REPORT_COLUMNS,
                                                                       "reports_csv.train")]


def pretraining_corpus(data, seed: int) -> list[str]:
    """Phase-0 documents: every training report, and a conversation per volume whose prompt names its
    positive findings and whose answer is its positive-findings text (`text.findings_by_name_chat`).

    A real Llama already writes fluent radiology prose and follows its prompt; the tiny stand-in
    learns both here. (Plain findings texts without the names were tried: fluent, but the LLM then
    wrote plausible findings whatever the image, zeroed visual tokens F1 0.23 vs 0.27.)
    """
    reports, labels = training_texts(data)
    rng = np.random.default_rng(seed)
    corpus = reports + [text_lib.findings_by_name_chat(y, text_lib.positive_findings_text(r, y, rng))
                        for r, y in zip(reports, labels)]
    return [corpus[i] for i in rng.permutation(len(corpus))]   # mixed, for packing


def training_texts(data) -> tuple[list[str], list[np.ndarray]]:
    """(Findings_EN, labels) of every training volume, without reading slices."""
    source = pipeline_lib.make_source(data, "train")
    if data.source == "synthetic":
        volumes = [pipeline_lib.synthetic.sample_volume_text(source.seed, "train", i) for i in range(len(source))]
        return [v["report"] for v in volumes], [np.asarray(v["labels"]) for v in volumes]
    entries = source._entries
    return [e["report"] for e in entries], [np.asarray(e["labels"]) for e in entries]


def load_base_llm(config, tokenizer, workdir: str, metric_log: MetricLog) -> tuple[llama_lib.LlamaConfig, Any]:
    """The LLM (HF folder or the phase-0 tiny model), its vocabulary grown to the tokenizer's."""
    path = config.model.llm_path or pretrain_base_llm(config, tokenizer, workdir, metric_log)
    preset = llama_lib.preset(config.model.preset)
    cfg, params = hf.load_llama(path, lora=lora_config(config), rng=jax.random.key(int(config.train.seed) + 1),
                                injection_layers=preset.injection_layers, remat_policy=preset.remat_policy,
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


def make_vlm_config(config, tokenizer, llm_cfg: llama_lib.LlamaConfig) -> vlm_lib.VLMConfig:
    return vlm_lib.make_config(visual_token_id=tokenizers.special_ids(tokenizer)["visual"],
                               d_visual=int(config.model.d_visual),
                               num_visual_tokens=int(config.model.num_visual_tokens),
                               jepa_dim=int(config.model.jepa_dim), llm_config=llm_cfg)


def fresh_params(vcfg: vlm_lib.VLMConfig, llm_params: Any, batch: dict, text_rows: np.ndarray,
                 seed: int) -> dict:
    """Phase 1's starting point: base LLM + fresh bridge with SVD query and predictor inits."""
    variables = vlm_lib.init(vcfg, jax.random.key(seed))
    params = dict(variables["params"])
    params["llm"] = llm_params
    valid = np.asarray(batch["valid"]).astype(bool)
    sample = np.asarray(batch["slices"], np.float32)[valid]
    params["compressor"] = {**params["compressor"],
                            "queries": jnp.asarray(compressor_lib.svd_init_queries(sample, vcfg.num_visual_tokens))}
    kernel = bridge_lib.svd_init_predictor_kernel(text_rows, d_visual=vcfg.compressor.d_visual)
    params["predictor"] = {**params["predictor"],
                           "linear": {**params["predictor"]["linear"], "kernel": jnp.asarray(kernel)}}
    return {"params": params, "calibration": variables["calibration"]}


def calibrate(model: vlm_lib.VLM, variables: dict, batch: dict, text_rows: np.ndarray) -> dict:
    """alpha := mean ||e_text|| / mean ||V^|| on this batch (eq. 6)."""
    unit = bridge_lib.with_alpha(variables, 1.0, vlm_lib.CALIBRATOR_PATH)
    visual = jax.jit(lambda v, s, z, m: model.apply(v, s, z, m, method="encode_visual").calibrated)(
        unit, batch["slices"], batch["z_mm"], batch["valid"])
    alpha = bridge_lib.calibrate_alpha(text_rows, np.asarray(visual))
    return bridge_lib.with_alpha(variables, alpha, vlm_lib.CALIBRATOR_PATH)


def alpha_of(variables: dict) -> float:
    return float(variables["calibration"]["calibrator"]["alpha"])


# ----------------------------------------------------------------------------- shared run state


class Run:
    """What the phases share: workdir, mesh, tokenizer, model config, whitening, pos_weight, logs."""

    def __init__(self, config, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        config.data.workdir = workdir
        self.mesh = sharding.make_mesh(data=-1)
        self.tokenizer = pipeline_lib.make_tokenizer(config.data)
        self.log = MetricLog(workdir)
        self.llm_cfg, self.llm_params = load_base_llm(config, self.tokenizer, workdir, self.log)
        self.vcfg = make_vlm_config(config, self.tokenizer, self.llm_cfg)
        emb = np.asarray(self.llm_params["model"]["embed_tokens"]["weight"], np.float32)
        special = set(tokenizers.special_ids(self.tokenizer).values())
        self.text_rows = emb[[i for i in range(min(len(emb), len(self.tokenizer))) if i not in special]]
        self.whiten_layer = int(config.model.whiten_layer) if config.model.whiten_layer >= 0 else \
            self.llm_cfg.num_hidden_layers // 2
        self.encoder = step_lib.TextEncoder(self.llm_cfg, self.whiten_layer)
        self.whitening = None
        self.pos_weight = None
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
        self.replicated = sharding.replicated(self.mesh)

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
        """Jitted (variables, batch) -> [B, C] visual-classifier logits (compiled once per run)."""
        if self._classifier_logits is None:
            model = vlm_lib.VLM(self.vcfg)
            self._classifier_logits = jax.jit(
                lambda v, b: model.apply(v, b["slices"], b["z_mm"], b["valid"]).visual.cls_logits)
        return self._classifier_logits

    def prepare_targets(self, config, params: Any) -> None:
        """pos_weight from the training labels; the PCA whitening of the LLM's text embeddings.

        Text only (no slice is read): the per-condition texts and the positive-findings texts of
        the training split, embedded by the frozen base LLM (layer `whiten_layer`, mean-pooled).
        """
        if self.whitening is not None:
            return
        path = os.path.join(self.workdir, "whitening.npz")
        reports, labels = training_texts(config.data)
        self.pos_weight = jnp.asarray(losses.pos_weight_from_labels(np.stack(labels)))
        if os.path.isfile(path):
            w = whitening_lib.load(path)
        else:
            rng = np.random.default_rng(int(config.data.seed))
            conditions = [t for r, l in zip(reports, labels) for t in text_lib.condition_texts(r, l) if t]
            targets = [text_lib.positive_findings_text(r, l, rng) for r, l in zip(reports, labels)]
            params = {"llm": self.llm_params}
            emb = np.concatenate([self.embed_texts(conditions, int(config.data.max_condition_tokens), params),
                                  self.embed_texts(targets, int(config.data.max_tokens), params)])
            w, stats = whitening_lib.fit_and_report(emb, dim=self.vcfg.bridge.jepa_dim)
            whitening_lib.save(w, path)
            logging.info("whitening (layer %d, %d texts): %s", self.whiten_layer, len(emb), json.dumps(stats))
        self.whitening = {"mean": jnp.asarray(w.mean, jnp.float32), "projection": jnp.asarray(w.projection, jnp.float32)}

    def embed_texts(self, texts: list[str], max_len: int, params: Any, batch: int = 256) -> np.ndarray:
        """[M, D] unwhitened text embeddings (fixed-size batches: one compilation)."""
        pad = tokenizers.special_ids(self.tokenizer)["pad"]
        rows = [text_lib.encode_padded(self.tokenizer, t, max_len, pad) for t in texts]
        ids = np.stack([r[0] for r in rows])
        mask = np.arange(max_len)[None] < np.array([r[1] for r in rows])[:, None]
        embed = jax.jit(lambda p, i, m: self.encoder(p, i, m, None))
        llm = step_lib.base_llm_params(params)
        out = []
        for start in range(0, len(ids), batch):
            i, m = ids[start:start + batch], mask[start:start + batch]
            n = len(i)
            i, m = np.pad(i, ((0, batch - n), (0, 0)), constant_values=pad), np.pad(m, ((0, batch - n), (0, 0)))
            out.append(np.asarray(embed(llm, jnp.asarray(i), jnp.asarray(m)))[:n])
        return np.concatenate(out)

    def consts(self) -> dict:
        return jax.device_put({"whitening": self.whitening, "pos_weight": self.pos_weight}, self.replicated)


# ----------------------------------------------------------------------------- one phase


def restored_variables(params: Any, alpha: float | None) -> dict:
    return {"params": params, "calibration": {"calibrator": {"alpha": jnp.asarray(alpha or 1.0, jnp.float32)}}}


def starting_variables(run: Run, config, phase: int, init_from: str) -> dict:
    """--init_from, else the best checkpoint of phase N-1, else (phase 1) a fresh bridge."""
    if init_from:
        params, meta = ckpt_lib.restore_params(init_from, run.abstract_params)
        return restored_variables(params, meta.get("alpha"))
    if phase > 1:
        prev_config = run.configs.get(phase - 1) or config_lib.load_phase_config(phase - 1, config.profile)
        prev = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, prev_config, phase - 1, read_only=True)
        restored = prev.restore_best(run.abstract_params)
        prev.close()
        if restored is None:
            raise TrainError(f"phase {phase}: no checkpoint of phase {phase - 1} in {run.workdir}; run phase "
                             f"{phase - 1} first or pass --init_from=PATH")
        return restored_variables(restored.params, restored.alpha)
    first = next(iter(run.pipeline(config, "train", shuffle=False).epoch(0)))
    template = fresh_params(run.vcfg, run.llm_params, first, run.text_rows, int(config.train.seed))
    return calibrate(vlm_lib.VLM(run.vcfg), template, first, run.text_rows)


def sampling_config(config) -> SamplingConfig:
    e = config.eval
    return SamplingConfig(temperature=float(e.temperature), top_p=float(e.top_p),
                          repetition_penalty=float(e.repetition_penalty),
                          no_repeat_ngram_size=int(e.no_repeat_ngram_size), max_new_tokens=int(e.max_new_tokens))


def validate(run: Run, config, phase: int, variables: dict, eval_step, modes=("normal",)) -> dict:
    """Validation metrics of the phase: loss always; classifier F1 (1); generation F1 (3, 4)."""
    pipe = run.pipeline(config, "valid", shuffle=False)
    batches = evaluate.collect(pipe.epoch(0), int(config.eval.num_examples))
    terms = [jax.device_get(eval_step(variables["params"], variables["calibration"], evaluate.as_jnp(b), run.consts()))
             for b in batches]
    out = {"val_loss": float(np.mean([t["loss"] for t in terms]))}
    if phase == 1:
        scored = evaluate.classifier_eval(run.classifier_logits(), variables, [evaluate.as_jnp(b) for b in batches])
        out["val_macro_f1"] = scored["macro_f1"]
    if phase in GENERATING_PHASES:
        results = evaluate.generation_eval(run.report_generator(config), variables, batches, modes)
        out["val_gen_f1"] = results["normal"]["macro_f1"]
        out["generation"] = results
    return out


def train_phase(run: Run, config, phase: int, init_from: str = "", warm_bridge_from: str = "") -> dict:
    t0 = time.time()
    config.phase = phase
    run.prepare_targets(config, {"llm": run.llm_params})
    train_pipe = run.pipeline(config, "train")
    steps_per_epoch = train_pipe.steps_per_epoch()
    if steps_per_epoch < 1:
        raise TrainError(f"phase {phase}: data.batch_size={config.data.batch_size} exceeds the training set; "
                         "lower --config.train.batch_size")
    total = optim.total_steps(config.train, steps_per_epoch)
    variables = starting_variables(run, config, phase, init_from)
    if warm_bridge_from:
        params, n = ckpt_lib.restore_bridge(warm_bridge_from, variables["params"])
        variables = {**variables, "params": params}
        logging.info("warm bridge: restored %d tensors from %s", n, warm_bridge_from)
    variables = run.place(variables)
    labels = phases.trainable_labels(variables["params"], config.trainable, phase)
    logging.info("phase %d trainable set:\n%s", phase, phases.trainable_table(variables["params"], labels,
                                                                              config.trainable))
    trainable, frozen = phases.split_params(variables["params"], labels)
    tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch)
    opt_state = jax.jit(tx.init)(trainable)
    rng = jax.random.key(int(config.train.seed) + 100 * phase)
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, config, phase)
    step, epoch, iterator_state, plateau = 0, 0, None, optim.ReduceLROnPlateau.from_config(config.plateau)
    best = {}
    restored = ckpt.restore_latest(run.abstract_params, opt_state)
    if restored is not None:
        trainable, frozen = phases.split_params(run.place({**variables, "params": restored.params})["params"], labels)
        opt_state, step, rng = restored.opt_state, restored.step, (restored.rng if restored.rng is not None else rng)
        variables = bridge_lib.with_alpha(variables, restored.alpha or alpha_of(variables), vlm_lib.CALIBRATOR_PATH)
        epoch, iterator_state = restored.host.get("epoch", 0), restored.host.get("iterator")
        plateau.load_state_dict(restored.host.get("plateau", plateau.state_dict()))
        best = restored.host.get("best", {})
        logging.info("phase %d: resumed at step %d (epoch %d) from %s", phase, step, epoch, ckpt.directory)

    train_model = vlm_lib.VLM(run.vcfg, deterministic=False)
    eval_model = vlm_lib.VLM(run.vcfg)
    weights = dict(config.loss_weights)
    train_step = jax.jit(step_lib.make_train_step(phase, train_model, run.encoder, tx, weights), donate_argnums=(0, 2))
    eval_step = jax.jit(step_lib.make_eval_step(phase, eval_model, run.encoder, weights))
    epochs = int(config.train.epochs)
    bar = tqdm.tqdm(total=total, initial=step, desc=f"phase {phase}", disable=jax.process_index() != 0)
    last_metrics: dict = {}
    lora_frozen = False
    while step < total and epoch < epochs:
        if config.lora_freeze_epoch and epoch >= config.lora_freeze_epoch and not lora_frozen:
            labels = phases.freeze(labels, [lora_lib.LORA_PATTERN])
            params = phases.merge_params(trainable, frozen)
            trainable, frozen = phases.split_params(params, labels)
            new_tx = optim.make_optimizer(config, trainable, labels, steps_per_epoch)
            opt_state = optim.transfer_state(opt_state, new_tx, trainable)
            tx, lora_frozen = new_tx, True
            train_step = jax.jit(step_lib.make_train_step(phase, train_model, run.encoder, tx, weights),
                                 donate_argnums=(0, 2))
            logging.info("phase %d: LoRA frozen after epoch %d (one recompilation)", phase, epoch)
        iterator = train_pipe.restore(iterator_state) if iterator_state else train_pipe.epoch(epoch)
        iterator_state = None
        t_epoch, n_steps = time.time(), 0
        for batch in iterator:
            rng, key = jax.random.split(rng)
            host_batch = evaluate.as_jnp(batch)
            trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, variables["calibration"],
                                                       host_batch, key, run.consts())
            step += 1
            n_steps += 1
            if step % int(config.train.log_every) == 0 or step == total:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last_metrics["lr"] = optim.learning_rate(opt_state)
                last_metrics["skipped_steps"] = optim.skipped_steps(opt_state)
                run.log.write(phase, step, last_metrics)
                rate = n_steps * int(config.train.batch_size) / max(time.time() - t_epoch, 1e-6)
                bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", vol_s=f"{rate:.1f}")
            bar.update(1)
            if ckpt.should_save(step):
                ckpt.save(step, params=phases.merge_params(trainable, frozen), opt_state=opt_state, rng=rng,
                          alpha=alpha_of(variables), config=config,
                          host={"epoch": epoch, "iterator": iterator.get_state(), "plateau": plateau.state_dict(),
                                "best": best})
            if step >= total:
                break
        epoch += 1
        variables = {**variables, "params": phases.merge_params(trainable, frozen)}
        if epoch % int(config.train.eval_every_epochs) == 0 or step >= total or epoch >= epochs:
            val = validate(run, config, phase, variables, eval_step)
            scalars = {k: v for k, v in val.items() if isinstance(v, float)}
            run.log.write(phase, step, scalars)
            logging.info("phase %d epoch %d step %d: %s", phase, epoch, step, json.dumps(scalars))
            if config.plateau.enabled and config.plateau.metric in scalars and plateau.step(scalars[config.plateau.metric]):
                opt_state = plateau.apply(opt_state)
                logging.info("phase %d: plateau, lr scale now %.3g", phase, optim.lr_scale(opt_state))
            metric_name = config.checkpoint.best_metric
            if metric_name in scalars:
                best.setdefault("history", []).append(scalars[metric_name])
            ckpt.save(step, params=variables["params"], opt_state=opt_state, rng=rng, alpha=alpha_of(variables),
                      config=config, metrics=scalars if metric_name in scalars else None,
                      host={"epoch": epoch, "iterator": None, "plateau": plateau.state_dict(), "best": best})
    bar.close()
    ckpt.wait()
    ckpt.close()
    result = {"steps": step, "wall_seconds": time.time() - t0, "train": last_metrics}
    return result


# ----------------------------------------------------------------------------- final evaluation


def final_evaluation(run: Run, config, phase: int, ablations: tuple[str, ...]) -> dict:
    """The phase's best checkpoint on the validation split: F1 (+ ablations for generating phases)."""
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(run.workdir, config, phase, read_only=True)
    restored = ckpt.restore_best(run.abstract_params)
    ckpt.close()
    if restored is None:
        raise TrainError(f"phase {phase}: no checkpoint in {ckpt.directory}; train the phase first")
    variables = run.place(restored_variables(restored.params, restored.alpha))
    pipe = run.pipeline(config, "valid", shuffle=False)
    batches = evaluate.collect(pipe.epoch(0), int(config.eval.num_examples))
    out: dict[str, Any] = {}
    if phase in GENERATING_PHASES:
        modes = ("normal", *ablations)
        results = evaluate.generation_eval(run.report_generator(config), variables, batches, modes)
        out.update({k: results["normal"][k] for k in ("macro_f1", "precision", "recall")})
        out["ablations"] = {m: {k: results[m][k] for k in ("macro_f1", "precision", "recall")} for m in ablations}
        out["per_class_f1"] = {c["name"]: c["f1"] for c in results["normal"]["report"]["per_class"]}
        evaluate.write_reports_csv(os.path.join(run.workdir, f"phase{phase}", "reports.csv"), results, modes)
        figures.per_class_f1_bars(results["normal"]["report"], os.path.join(run.workdir, f"phase{phase}",
                                                                            "per_class_f1.png"))
    else:
        scored = evaluate.classifier_eval(run.classifier_logits(), variables, [evaluate.as_jnp(b) for b in batches])
        out.update({"classifier_macro_f1": scored["macro_f1"], "classifier_precision": scored["precision"],
                    "classifier_recall": scored["recall"]})
    return out


# ----------------------------------------------------------------------------- main


def run_curriculum(phases_to_run: list[int], workdir: str, arg: str | None, overrides: dict[str, str],
                   explicit_config=None, init_from: str = "", warm_bridge_from: str = "") -> dict:
    configs = {p: explicit_config if explicit_config is not None else phase_config(p, arg, overrides)
               for p in phases_to_run}
    run = Run(configs[phases_to_run[0]], workdir)
    run.configs = configs
    report: dict[str, Any] = {}
    t0 = time.time()
    for p in phases_to_run:
        config = configs[p]
        config.data.workdir = workdir
        with sharding.use_mesh(run.mesh):  # logical constraints resolve on the mesh while tracing
            result = train_phase(run, config, p, init_from if p == phases_to_run[0] else "",
                                 warm_bridge_from if p == 3 else "")
            evaluation = final_evaluation(run, config, p, evaluate.ABLATIONS if p in GENERATING_PHASES else ())
        report[f"phase{p}"] = {**evaluation, "wall_seconds": result["wall_seconds"], "steps": result["steps"]}
        logging.info("phase %d done: %s", p, json.dumps({k: v for k, v in report[f'phase{p}'].items()
                                                          if not isinstance(v, dict)}))
    report["wall_seconds"] = time.time() - t0
    if jax.process_index() == 0:
        evaluate.write_json(os.path.join(workdir, "report.json"), report)
        write_figures(workdir, report)
    return report


def write_figures(workdir: str, report: dict) -> None:
    try:
        figures.loss_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curves.png"))
        abl = {name: {"full": r["macro_f1"], **{m: v["macro_f1"] for m, v in r["ablations"].items()}}
               for name, r in report.items() if isinstance(r, dict) and "ablations" in r}
        if abl:
            figures.ablation_bars(abl, os.path.join(workdir, "ablations.png"))
    except ValueError as e:  # a figure must never lose a finished run
        logging.warning("figures: %s", e)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags are --phase, --workdir, --config, ...")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: where checkpoints, logs and report.json go")
    if FLAGS.distributed:
        jax.distributed.initialize()
    # Orbax narrates every save at INFO; keep the log about training.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    overrides = config_lib.command_line_overrides(sys.argv[1:])
    config_path = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "")
    arg = config_path.split(":", 1)[1] if ":" in config_path else None
    phases_to_run = [1, 2, 3, 4] if FLAGS.phase == "all" else [int(FLAGS.phase)]
    explicit = None
    if FLAGS.phase != "all" and config_path:
        explicit = FLAGS.config
        if int(explicit.phase) != int(FLAGS.phase):
            raise app.UsageError(f"--config={config_path} is the phase {explicit.phase} config but --phase={FLAGS.phase}")
    init_from = FLAGS.init_from
    warm = FLAGS.warm_bridge_from
    try:
        report = run_curriculum(phases_to_run, FLAGS.workdir, arg, overrides, explicit, init_from, warm)
    except (TrainError, DataError, FileNotFoundError, KeyError, ValueError) as e:   # OverrideError too
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({k: v for k, v in report.items()}, default=str)[:2000])


if __name__ == "__main__":
    app.run(main, flags_parser=cli_lib.flags_parser("train"))
