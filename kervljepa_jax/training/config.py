"""The config shared by the four curriculum phases, and the two profiles' numbers.

`configs/phaseN.py:get_config(arg)` = `base_config()` + the phase as the paper describes it
(optimizer-group table, loss weights, extras, epochs / batch / lr) + a profile:

    arg None | "default"  the embedded run: synthetic CT-RATE + the tiny LLM; the whole curriculum
                          and its evaluation fit in 10 minutes on 2 CPU cores (the EMBEDDED table)
    arg "paper"           the paper's numbers unchanged, for Llama 3.2 3B on CT-RATE

LoRA: the paper's r=16 under "paper", the released model card's r=64, alpha=128 under "default";
add ",lora=card" or ",lora=paper" to either for the other (e.g. `--config=configs/phase3.py:paper,lora=card`).
Anything stays overridable on the command line: `--config.train.lr=1e-4`.

Every block exists in every phase (disabled where it does not apply: plateau.enabled False, ...),
so the training loop reads one schema and `--config.x.y` works for any phase.
"""

from __future__ import annotations

import ast
import json
import importlib
import pathlib
from typing import Any

import ml_collections
from ml_collections.config_flags import config_path

from kervljepa_jax import data as data_lib, sharding
from kervljepa_jax.model.lora import LORA_PATTERN
from kervljepa_jax.model.xattn import XATTN_GATE_PATTERN
from kervljepa_jax.training import phases

PHASES = (1, 2, 3, 4)
# eval.score -> the validation metric that scores it.
EVAL_SCORES = {"classifier": "val_macro_f1", "generation": "val_gen_f1"}
PROFILES = ("default", "paper")
# The phase configs ship inside the package (kervljepa_jax/configs): an installed wheel has no
# top-level configs/ folder.
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# LoRA variants: the paper states r=16 (alpha unstated: 2r, the common choice); the released
# model card says r=64, alpha=128.
LORA_VARIANTS = {
    "paper": dict(rank=16, alpha=32.0),
    "card": dict(rank=64, alpha=128.0),
}
# Each profile's LoRA when the arg names none. The embedded run takes the card's: on the 64-wide
# tiny decoder r=64 is a full-rank update, better at the same step time (docs/embedded_profile.md,
# "LoRA rank 64").
DEFAULT_LORA = {"default": "card", "paper": "paper"}

# ------------------------------------------------------------------------------------------------
# Profiles. configs/phaseN.py holds the paper's numbers for its phase; a profile then overrides:
# ------------------------------------------------------------------------------------------------

# "paper": the paper's setup around those numbers.
PAPER_SETUP = {
    "model.preset":                  "llama3_2_3b",
    "data.source":                   "ctrate",
    # FSDP over every device: the frozen bf16 Llama (6.4 GB) and the f32 trainable leaves are
    # sharded along their embed axis instead of copied to each device; the batch is split the same
    # 8 ways (the logical batch axis maps to data and fsdp).
    "mesh":                          "fsdp:-1",
    # 32 visual tokens + the chat prompt + the paper's 384-token reports (max_new_tokens), so that a
    # long report is trained whole, end-of-turn included; a cut one is counted in the log
    # ("truncated_responses", data/records.py) at every epoch.
    "data.max_tokens":               544,
}

AS_PAPER = "<as in configs/phaseN.py>"   # an EMBEDDED cell that keeps the phase file's (paper's) value

# "default" (embedded): synthetic data + tiny LLM on 2 CPU cores, all four phases + evaluation
# <= 10 min. Dotted config key -> (phase 1, phase 2, phase 3, phase 4). Few epochs over a smaller
# synthetic train split; learning rates raised for the tiny, freshly initialised model (phase 4
# keeps the paper's ratio, 40x below phase 3). The only place the embedded run's numbers live.
EMBEDDED = {
    "model.preset":                  ("tiny",) * 4,
    "model.whiten_layer":            (-1,) * 4,                   # the tiny LLM's middle layer
    # Fitted on the text targets, not the reports: the numbers of this profile were measured so.
    "model.whiten_texts":            ("targets",) * 4,
    "data.max_slices":               (240,) * 4,                  # the synthetic volumes' maximum
    "data.embed_dim":                (256,) * 4,                  # paper 1024 (LeJEPA ViT-L); 16x cheaper here
    "data.source":                   ("synthetic",) * 4,
    # The first N volumes of one synthetic training stream (a volume is a pure function of its
    # index). Phase 3 learns to write findings from 4,096 volumes seen 3 times, where 512 seen 16
    # times left it overfitted (training-split F1 0.90, validation 0.82; at those 1,024 steps 4,096
    # volumes seen twice gave +0.04-0.05, a third epoch another ~+0.02: docs/embedded_profile.md,
    # "More volumes, fewer epochs"). Phase 1 takes 2,048 once, phases 2 and 4 the first 512 (their
    # steps cost what they did).
    "data.num_train":                (2048, 512, 4096, 512),
    # All 512: on fewer, a rare class has a handful of positives and one run's macro F1 says little
    # (docs/embedded_profile.md, "How much one run says"); the extra reports cost seconds.
    "data.num_valid":                (512,) * 4,
    # Phase 3 sees rare findings more often (repeat-factor sampling, LVIS; not in the paper): a few
    # thousand volumes hold few rare positives (docs/embedded_profile.md, "Phase 3: repeat-factor
    # sampling", measured on 512).
    "data.repeat_factor_threshold":  (0.0, 0.0, 1.0, 0.0),
    # 100x fewer volumes than CT-RATE need a cleaner signal per volume for the same learnability
    # (docs/embedded_profile.md, "The synthetic signal").
    "data.signal_strength":          (2.0,) * 4,
    # Phase 1: 256 steps, as 4 epochs over 512 volumes were; phase 3: 1,536 steps (was 1,024), which
    # brings the whole run to ~570 s on a quiet day.
    "train.epochs":                  (1, 2, 3, 1),                # paper 20, 30, 50, 30
    "train.batch_size":              (8, 16, 8, 8),               # global; paper 32, 64, 8, 8 per GPU x 8
    "train.batch_per_device":        (0,) * 4,                    # the global batch above, whatever the devices
    "train.lr":                      (1e-3, 5e-4, 3e-3, 7.5e-5),  # paper 5e-5, 3e-5, 2e-5, 5e-7
    "train.warmup_steps":            (10, 10, 10, 0),             # paper 0
    # Phase 3 decays its lr (cosine, to 0) where the paper holds it and halves it on a validation-F1
    # plateau: the embedded run evaluates generation once, at the end, so the plateau never fires.
    "train.schedule":                (AS_PAPER, AS_PAPER, "cosine", AS_PAPER),
    "train.log_every":               (10,) * 4,
    "checkpoint.every_steps":        (0,) * 4,                    # at evaluations and phase end only
    # alpha stays as phase 1 calibrated it at its start: every number measured for this profile was
    # measured so (the paper recalibrates about once per epoch, configs/phaseN.py).
    "calibration.every_steps":       (0,) * 4,
    "eval.max_new_tokens":           (160,) * 4,                  # paper 384; longest findings text ~156
    "eval.num_examples":             (0,) * 4,                    # all, as the paper
    # The visual ablations (Table IX) generate for the first 128 (three more reports per volume);
    # each is scored against the full model on those same volumes.
    "eval.ablation_examples":        (128,) * 4,
    "train.eval_every_epochs":       (1, 1, 3, 1),                # phase 3: generation F1 at its end only
    # Edits of the phase's optimizer-group table (kervljepa_jax/configs/phaseN.py), by row pattern.
    # Phase 3: LoRA trains throughout its 3 epochs (paper: frozen after epoch 6 of 50; frozen after
    # 10 of the former 16 epochs it scored the same, 0.805 vs 0.816 never). The adapters' tanh gates
    # start at 0 (a fresh model is the base LLM) and Adam moves them at most ~lr a step: 1,536
    # phase-3 steps here against the paper's ~300k (50 epochs of ~47k volumes at batch 8); so their
    # lr is x30 in this ~200x shorter run.
    # Phase 2, compressor lr x0.1: at the full phase-2 lr the InfoNCE steps pull the phase-1
    # compressor off its classes, and phase 3's ceiling with it (docs/embedded_profile.md, "Phase 2:
    # the compressor at a tenth of the rate").
    "optimizer_groups":              (AS_PAPER, {r"compressor/.*": dict(lr_mult=0.1)},
                                      {XATTN_GATE_PATTERN: dict(lr_mult=30.0),
                                       LORA_PATTERN: dict(freeze_after_epoch=0)}, AS_PAPER),
    # Phase 3 trains on the LM loss alone (paper: + focal + JEPA + 3.0 LLM-visual classification): the
    # 64-wide tiny decoder has no room to spare for the auxiliary heads (docs/embedded_profile.md,
    # "Phase 3: the LM loss alone"). Phase 4's focal term reads that classifier, untrained here, so
    # it goes as well.
    "loss_weights.llm_cls":          (AS_PAPER, AS_PAPER, 0.0, AS_PAPER),
    "loss_weights.focal":            (AS_PAPER, AS_PAPER, 0.0, 0.0),
    "loss_weights.jepa":             (AS_PAPER, AS_PAPER, 0.0, AS_PAPER),
}


def base_config() -> ml_collections.ConfigDict:
    """Every field every phase reads; phase configs set `phase`, `optimizer_groups`, `loss_weights`, extras."""
    c = ml_collections.ConfigDict()
    c.phase = 0
    c.profile = "default"

    c.data = data_lib.default_data_config()
    # Device mesh, axis:size pairs over (data, fsdp, tensor), e.g. "data:2,fsdp:2,tensor:2"; an axis
    # left out has size 1 and one may be -1 (the remaining devices). The sizes multiply to the
    # device count and the global batch divides by data*fsdp. Embedded default: data parallel.
    c.mesh = "data:-1"

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"            # tiny | llama3_2_3b
    c.model.llm_path = ""              # HF folder of the Llama weights; "" = random init (tiny)
    c.model.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.05))
    # Visual dims follow the data so they cannot disagree (one value, two names).
    c.model.d_visual = c.data.get_ref("embed_dim")
    c.model.num_visual_tokens = c.data.get_ref("num_visual_tokens")
    c.model.jepa_dim = 256             # whitened text space (capped at the LLM width by vlm.make_config)
    c.model.whiten_layer = 14          # hidden layer whose mean-pooled states embed texts; -1 = middle
    # What the PCA whitening is fitted on (TextTargets.fit_whitening): "reports", the training reports, as the
    # paper (III-B4: 22,773 training report embeddings, layer 14 of 28, top 256 components), or
    # "targets", the texts the phases compare with (per-condition and positive-findings texts).
    c.model.whiten_texts = "reports"
    # Component switches for the ablations of Table XI (python -m kervljepa_jax.experiments --table=XI);
    # False removes the component: the compressor's queries attend to all valid slices instead of their
    # zone; the text targets stay raw LLM embeddings (identity, no PCA whitening: needs jepa_dim >= the
    # LLM width); the adapters never add to the decoder (the visual tokens enter only as inputs).
    c.model.zone_constraint = True
    c.model.whiten = True
    c.model.xattn_adapters = True
    # Decoder layers (0-based) followed by a gated cross-attention adapter; [] = the preset's
    # (3B: 7, 14, 21, the paper's). `--config.model.injection_layers=[0,1,2]`.
    c.model.injection_layers = []
    # The adapters' gate (model/xattn.py): "tanh" = Flamingo's tanh(g) * MHA(...), g starting at
    # xattn_gate_init; "none" = eq. 7 as the paper writes it, h + MHA(...). Both profiles keep
    # Flamingo's, which the paper names (III-B3: "gated cross-attention adapters following the
    # Flamingo architecture"): at 0 a fresh VLM is exactly its base LLM, so phase 3 starts from the
    # pretrained decoder, not from one disturbed by three random adapters.
    c.model.xattn_gate = "tanh"
    c.model.xattn_gate_init = 0.0
    # The tiny preset's base LLM when llm_path and tokenizer_path are empty (synthetic data):
    # "packaged" copies the stand-in shipped with the package (kervljepa_jax/stand_in.py: pretrained
    # once, like Llama) to WORKDIR/base_llm; "phase0" pretrains one there with the settings below.
    c.model.stand_in = "packaged"
    # Phase 0: the tiny decoder is LM-pretrained on the training reports (and findings-by-name
    # conversations), standing in for a pretrained Llama, and saved as a HF folder in WORKDIR/base_llm.
    c.model.pretrain_steps = 300
    c.model.pretrain_batch_size = 8
    c.model.pretrain_seq_len = 384     # rows start at documents; the longest report is ~350 tokens
    c.model.pretrain_lr = 1e-2
    # Extra findings-by-name conversations from fresh synthetic label sets (data.source=synthetic).
    # Without them a longer phase 0 memorises the training split's conversations instead of learning
    # to follow its prompt (the packaged stand-in, kervljepa_jax/stand_in.py, is built the same way).
    c.model.pretrain_chats = 0

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.batch_size = c.data.get_ref("batch_size")   # global batch; also data.batch_size
    # > 0: the batch per device instead (as the paper's DDP runs give it: phase 2 is "64/GPU, 512
    # effective"); the run sets train.batch_size = batch_per_device x the device count at start-up.
    c.train.batch_per_device = 0
    c.train.lr = 1e-4
    c.train.schedule = "constant"      # constant | cosine (both after a linear warmup)
    c.train.warmup_steps = 0
    c.train.final_lr_fraction = 0.0    # cosine end value, as a fraction of lr
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 0.01
    # Leaves that get weight decay: matrices, not biases / norms / gates / the temperature.
    c.train.weight_decay_pattern = r"(^|.*/)(kernel|lora_A|lora_B|queries)$"
    c.train.grad_clip = 1.0            # global-norm clip; 0 = off
    c.train.max_steps = 0              # cap on optimizer steps in this phase; 0 = no cap
    # A non-finite gradient skips the step (counted); after this many in a row the step is applied
    # anyway (optax.apply_if_finite), so the train loop should stop before that.
    c.train.max_consecutive_nonfinite = 100
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every_epochs = 1
    # Embed every record's text targets (per-condition texts, class-ordered findings) with the frozen
    # LLM once per run instead of in every step; False embeds them in the step (same values).
    c.train.cache_text_targets = True
    # A phase with a frozen compressor (3, 4) computes each training volume's V' once, without
    # dropout, and its steps read it instead of running the compressor (feature_cache.compressor_tokens).
    c.train.cache_visual_tokens = True

    # NormCalibrator (paper III-B2): alpha = mean ||e_text|| / mean ||V^|| is set at initialisation
    # and, "periodically during training", again on the current training batch every `every_steps`
    # steps of a phase that trains the compressor or the predictor (V^ moves only with them);
    # 0 = only at initialisation. The paper gives no period: the phase files set about one epoch.
    c.calibration = ml_collections.ConfigDict(dict(every_steps=0))
    # False: alpha is fixed at 1, never calibrated (the Table XI ablation of the NormCalibrator).
    c.calibration.enabled = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000    # 0 = only at evaluations and at phase end
    c.checkpoint.keep = 2              # latest N kept
    c.checkpoint.keep_best = 1         # best N (by best_metric) kept on top of the latest
    c.checkpoint.best_metric = "val_macro_f1"
    c.checkpoint.best_mode = "max"     # max | min
    c.checkpoint.async_save = True

    c.init = ml_collections.ConfigDict()
    c.init.init_from = ""              # checkpoint to start from; "" = best of phase N-1 in the workdir
    c.init.warm_bridge_from = ""       # phase-3 checkpoint whose bridge overwrites ours (phase 3)

    c.eval = ml_collections.ConfigDict()  # generation for evaluation (paper IV-B)
    c.eval.temperature = 0.6
    c.eval.top_p = 0.9
    c.eval.repetition_penalty = 1.15
    c.eval.no_repeat_ngram_size = 5
    c.eval.max_new_tokens = 384
    c.eval.num_examples = 0            # validation examples to generate for; 0 = all
    c.eval.ablation_examples = 0       # of those, the first N the visual ablations generate for; 0 = all
    # Who labels the generated reports for validation, model selection, the plateau scheduler and the
    # final evaluation: "rules" (kervljepa_jax.label.RuleLabeler, no weights) or "radbert" (the
    # paper's protocol: CT-RATE's RadBERT classifier from two local paths; its probabilities drive the
    # flagged per-class threshold search, Table IV).
    c.eval.labeler = "rules"
    # What the phase's evaluation scores: "classifier" (the visual classifier on V') or "generation"
    # (generated reports, labelled by eval.labeler, with the visual ablations). Validation logs it
    # every eval_every_epochs (val_macro_f1 / val_gen_f1) and the final evaluation headlines it.
    c.eval.score = "classifier"
    c.eval.radbert_encoder = ""        # a local RadBERT-RoBERTa transformers folder
    c.eval.radbert_classifier = ""     # the CT-RATE classifier checkpoint (.safetensors, or .pt/.pth)

    c.loss_weights = ml_collections.ConfigDict()
    # What trains and how: rows dict(pattern, lr_mult, frozen, ewc, trust_ratio, freeze_after_epoch),
    # the first row whose regex fully matches a param path holds it, a path no row matches is frozen
    # (the fields: training/phases.py). `--config.optimizer_groups='[...]'` replaces the table,
    # `--config.optimizer_groups[1].lr_mult=2` changes one field of one row.
    c.optimizer_groups = []

    # Phase extras, off unless the phase turns them on.
    c.plateau = ml_collections.ConfigDict(dict(
        enabled=False, metric="val_gen_f1", mode="max", patience=3, factor=0.5, threshold=1e-4,
        min_scale=0.0))
    c.early_stop = ml_collections.ConfigDict(dict(patience=0, metric="val_loss", mode="min"))
    return c


def parse_arg(arg: str | None) -> tuple[str, str]:
    """`get_config` arg -> (profile, lora variant). Accepts None, "default", "paper", "paper,lora=card"."""
    profile, lora = "default", None
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if token.startswith("lora="):
            lora = token.split("=", 1)[1]
        else:
            profile = token
    lora = DEFAULT_LORA.get(profile) if lora is None else lora
    if profile not in PROFILES or lora not in LORA_VARIANTS:
        raise ValueError(f"config arg {arg!r}: use one of {list(PROFILES)} optionally with "
                         f"',lora=' one of {list(LORA_VARIANTS)} (e.g. configs/phase3.py:paper,lora=card)")
    return profile, lora


def apply_profile(config: ml_collections.ConfigDict, phase: int, arg: str | None) -> ml_collections.ConfigDict:
    """Apply the profile (and LoRA variant) named by `arg` to a phase config, in place."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: choose one of {PHASES}")
    profile, lora = parse_arg(arg)
    config.phase = phase
    config.profile = profile
    if profile == "paper":
        overrides = PAPER_SETUP
    else:
        overrides = {key: column[phase - 1] for key, column in EMBEDDED.items() if column[phase - 1] != AS_PAPER}
    config.optimizer_groups = phases.group_rows(config.optimizer_groups)   # every field overridable
    for key, value in overrides.items():
        if key == "optimizer_groups":
            config.optimizer_groups = phases.update_groups(config.optimizer_groups, value)
        else:
            set_field(config, key, value)
    config.model.lora.update(LORA_VARIANTS[lora])
    return config


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """The field at the ml_collections path `key` ('a.b', 'a[0].b') := value; it must exist (a typo
    in a profile table must not add a new field)."""
    missing = missing_name(config, key)
    if missing is not None:
        raise KeyError(f"profile override {key!r}: the config has no field {missing!r}; fix the table in {__file__}")
    config_path.set_value(key, config, value)


def load_phase_config(phase: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """`kervljepa_jax/configs/phase{phase}.py:get_config(arg)`, the packaged phase config."""
    if phase not in PHASES:
        raise FileNotFoundError(f"phase={phase!r}: no such phase config; phases are {PHASES}")
    return importlib.import_module(f"kervljepa_jax.configs.phase{phase}").get_config(arg)


# ------------------------------------------------------------------------------------------------
# Command-line overrides (`--config.a.b=v`), shared by train and evaluate.
# ------------------------------------------------------------------------------------------------

class OverrideError(ValueError):
    """A `--config.a.b=v` that names no field or whose value does not fit it."""


def parse_override(raw: str, current: Any, key: str = "") -> Any:
    """The string `raw` as the type of the field's `current` value."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise OverrideError(f"--config.{key}={raw!r} is not a bool (true/false)")
        return raw.lower() in ("true", "1")
    try:
        if isinstance(current, (int, float)):
            return type(current)(float(raw)) if isinstance(current, int) and float(raw).is_integer() else float(raw)
        if isinstance(current, (list, tuple)):
            value = ast.literal_eval(raw)
            if not isinstance(value, (list, tuple)):
                raise ValueError(raw)
            # Nested tuples become lists so the config survives its JSON round trip in checkpoints.
            return json.loads(json.dumps(value)) if isinstance(current, list) else tuple(value)
    except (ValueError, SyntaxError, TypeError):
        raise OverrideError(f"--config.{key}={raw!r} does not parse as the field's "
                            f"{type(current).__name__}") from None
    return raw


def override_spans(argv: list[str]) -> list[tuple[str, str, int, int]]:
    """(key, raw value, start, stop) of every `--config.a.b=v` / `--config.a.b v` in argv, in order;
    argv[start:stop] is the one or two arguments it spans."""
    spans, i = [], 0
    while i < len(argv):
        arg, start = argv[i], i
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            spans.append((key, value, start, min(i + 1, len(argv))))
        i += 1
    return spans


def command_line_overrides(argv: list[str]) -> dict[str, str]:
    """`--config.a.b=v` / `--config.a.b v` pairs of the command line, in order."""
    return {key: value for key, value, _, _ in override_spans(argv)}


MISSING = object()


def missing_name(config: ml_collections.ConfigDict, key: str) -> Any:
    """The first name on the path `key` ('a.b', 'a[0].b', ml_collections' config_path syntax) that
    does not exist in `config`, or None when the field exists."""
    node = config
    for name in config_path.split(key):
        try:
            node = node[name]
        except (KeyError, IndexError, TypeError, AttributeError):
            return name
    return None


def field_value(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at the path `key` ('a.b', 'a[0].b'), or `MISSING` when a name on the way does not exist."""
    return MISSING if missing_name(config, key) is not None else config_path.get_value(key, config)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """The field at each path (`a.b`, `a[0].b`) := its override parsed as the field's type, in place;
    an unknown field is an error."""
    for key, raw in overrides.items():
        missing = missing_name(config, key)
        if missing is not None:
            raise OverrideError(f"--config.{key}: no field {missing!r} in the phase {config.phase} config")
        config_path.set_value(key, config, parse_override(raw, config_path.get_value(key, config), key))
    return config


# Ranges a run needs, as data: (dotted key, lowest allowed value, what the field is). A value out of
# range fails before set-up with one line naming the flag, not as a division by zero or an empty
# phase minutes later.
RANGES: tuple[tuple[str, float, str], ...] = (
    ("train.epochs", 1, "epochs of the phase"),
    ("train.batch_size", 1, "the global batch"),
    ("train.batch_per_device", 0, "the batch per device (0 = train.batch_size is the global batch)"),
    ("train.lr", 0, "the peak learning rate"),
    ("train.warmup_steps", 0, "warmup steps"),
    ("train.max_steps", 0, "a cap on steps (0 = none)"),
    ("train.eval_every_epochs", 1, "epochs between evaluations"),
    ("train.log_every", 1, "steps between logged metrics"),
    ("train.grad_clip", 0, "the global-norm clip (0 = off)"),
    ("checkpoint.every_steps", 0, "steps between checkpoints (0 = at evaluations only)"),
    ("calibration.every_steps", 0, "steps between recalibrations of alpha (0 = at initialisation only)"),
    ("checkpoint.keep", 1, "latest checkpoints kept"),
    ("eval.num_examples", 0, "validation volumes (0 = all)"),
    ("eval.ablation_examples", 0, "volumes the ablations generate for (0 = all)"),
    ("eval.max_new_tokens", 1, "tokens a report may have"),
    ("data.num_train", 1, "synthetic training volumes"),
    ("data.num_valid", 1, "synthetic validation volumes"),
)


def resolve_batch(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """train.batch_size := train.batch_per_device x num_devices when a per-device batch is given
    (the paper profile), in place; data.batch_size follows (one reference)."""
    per_device = int(config.train.get("batch_per_device", 0))
    if per_device > 0:
        config.train.batch_size = per_device * num_devices
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every `RANGES` field of the config within range and the mesh well formed, else
    OverrideError naming its flag."""
    if "mesh" in config:
        try:
            sharding.parse_mesh(str(config.mesh))
        except ValueError as e:
            raise OverrideError(str(e)) from None
    try:
        phases.freeze_epoch(config.get("optimizer_groups", []))    # also checks every row
    except ValueError as e:
        raise OverrideError(f"--config.{e}") from None
    score = config.get("eval", {}).get("score", "classifier")
    if score not in EVAL_SCORES:
        raise OverrideError(f"--config.eval.score={score!r}: use one of {list(EVAL_SCORES)}")
    for key, lowest, meaning in RANGES:
        value = field_value(config, key)
        if value is MISSING or value is None:
            continue
        if value < lowest:
            raise OverrideError(f"--config.{key}={value}: {meaning} must be >= {lowest:g} "
                                f"(phase {config.get('phase', '?')} config)")
    return config
