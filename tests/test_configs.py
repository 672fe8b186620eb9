"""configs/phase{1..4}.py: the paper's numbers, the embedded profile, the CLI overrides, and the
trainable tables against the real VLM's param tree (abstract, tiny and 3B)."""

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm
from kervljepa_jax.model.xattn import PROJECTOR_PATTERN
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import phases, run as run_lib

# The paper's batches per GPU (DDP on 8 H200s; phase 2 "64/GPU (512 effective)").
PAPER_EPOCHS, PAPER_BATCH, PAPER_LR = (20, 30, 50, 30), (32, 64, 8, 8), (5e-5, 3e-5, 2e-5, 5e-7)
LOSS_WEIGHTS = {1: dict(bce=1.5, mil=1.0, orth=1.0, mmd=0.5), 2: dict(infonce=1.0, mmd=0.5),
                3: dict(lm=1.0, focal=1.0, jepa=1.0, llm_cls=3.0), 4: dict(lm=1.0, focal=1.0)}


@pytest.mark.parametrize("phase", config_lib.PHASES)
def test_paper_profile(phase):
    c = config_lib.load_phase_config(phase, "paper")
    i = phase - 1
    assert (c.phase, c.profile, c.model.preset, c.data.source) == (phase, "paper", "llama3_2_3b", "ctrate")
    assert (c.train.epochs, c.train.batch_per_device, c.train.lr) == (PAPER_EPOCHS[i], PAPER_BATCH[i], PAPER_LR[i])
    config_lib.resolve_batch(c, 8)
    assert c.train.batch_size == c.data.batch_size == 8 * PAPER_BATCH[i]    # 512 for phase 2 on 8 devices
    assert c.mesh == "fsdp:-1" and c.data.max_tokens == 544          # 32 visual + prompt + 384-token report
    assert c.train.schedule == ("cosine" if phase == 1 else "constant")
    assert c.loss_weights.to_dict() == LOSS_WEIGHTS[phase]
    assert (c.model.lora.rank, c.model.lora.alpha) == (16, 32.0)
    rows = {row["pattern"]: row for row in c.optimizer_groups}
    # The paper's extras: one lr per phase (no lr_mult), LoRA frozen after epoch 6 and the
    # projectors' trust ratio in phase 3, EWC 100 on LoRA in phase 4.
    assert {row["lr_mult"] for row in rows.values()} == {1.0} and not any(row["frozen"] for row in rows.values())
    assert {p: row["freeze_after_epoch"] for p, row in rows.items() if row["freeze_after_epoch"]} == \
        ({lora_lib.LORA_PATTERN: 6} if phase == 3 else {})
    assert {p: row["trust_ratio"] for p, row in rows.items() if row["trust_ratio"]} == \
        ({PROJECTOR_PATTERN: [1.0, 30.0]} if phase == 3 else {})
    ewc = {p: row["ewc"] for p, row in rows.items() if row["ewc"]}
    assert ewc == ({lora_lib.LORA_PATTERN: 100.0} if phase == 4 else {})
    assert c.plateau.enabled == (phase == 3)
    assert (c.plateau.patience, c.plateau.factor, c.plateau.metric) == (3, 0.5, "val_gen_f1")
    assert c.early_stop.patience == (8 if phase == 2 else 0)
    assert c.data.text_mode == ("raw" if phase == 4 else "positive_findings")
    assert c.data.repeat_factor_threshold == 0.0           # the paper shuffles; no class-balanced sampling
    assert c.eval.max_new_tokens == 384 and c.eval.temperature == 0.6 and c.eval.top_p == 0.9


@pytest.mark.parametrize("phase", config_lib.PHASES)
def test_default_profile_is_the_embedded_table(phase):
    c, paper = config_lib.load_phase_config(phase), config_lib.load_phase_config(phase, "paper")

    def value(config, key):    # None where the phase has no such field (phase 1 has no llm_cls weight)
        for name in key.split("."):
            if name not in config:
                return None
            config = config[name]
        return config

    assert c.profile == "default" and c.model.preset == "tiny" and c.data.source == "synthetic"
    batch = c.train.batch_size
    assert config_lib.resolve_batch(c, 8).train.batch_size == batch      # a global batch, whatever the devices
    for key, column in config_lib.EMBEDDED.items():
        want = value(paper, key) if column[phase - 1] == config_lib.AS_PAPER else column[phase - 1]
        if key == "optimizer_groups" and want is not value(paper, key):    # edits of the paper's rows
            want = phases.update_groups(paper.optimizer_groups, want)
        assert value(c, key) == want, key
    # The rest is the paper's phase, e.g. its loss weights (but those the table names) and its
    # optimizer-group patterns.
    table = {k.split(".", 1)[1]: col[phase - 1] for k, col in config_lib.EMBEDDED.items()
             if k.startswith("loss_weights.") and col[phase - 1] != config_lib.AS_PAPER}
    assert c.loss_weights.to_dict() == {**LOSS_WEIGHTS[phase], **table}
    assert [row["pattern"] for row in c.optimizer_groups] == [row["pattern"] for row in paper.optimizer_groups]


def test_lora_variant_and_bad_args():
    c = config_lib.load_phase_config(3, "paper,lora=card")
    assert (c.model.lora.rank, c.model.lora.alpha, c.profile) == (64, 128.0, "paper")
    assert config_lib.load_phase_config(3, "lora=card").profile == "default"
    default = config_lib.load_phase_config(3)            # the embedded run takes the card's LoRA ...
    assert (default.model.lora.rank, default.model.lora.alpha) == (64, 128.0)
    paper_lora = config_lib.load_phase_config(3, "default,lora=paper")   # ... unless told otherwise
    assert (paper_lora.model.lora.rank, paper_lora.model.lora.alpha, paper_lora.profile) == (16, 32.0, "default")
    for bad in ("papers", "paper,lora=huge"):
        with pytest.raises(ValueError, match="config arg") as err:
            config_lib.load_phase_config(1, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="phase=5"):
        config_lib.load_phase_config(5)
    with pytest.raises(KeyError, match="no field 'epoch'"):
        config_lib.set_field(config_lib.base_config(), "train.epoch", 3)


def test_command_line_overrides_through_config_flags():
    """What `python -m kervljepa_jax.train --config=configs/phase3.py:paper --config.x=...` sees."""
    argv = ["train", f"--config={config_lib.CONFIGS_DIR / 'phase3.py'}:paper", "--config.train.batch_size=16",
            "--config.train.max_steps=5", "--config.model.preset=tiny", "--config.data.source=synthetic",
            "--config.model.lora.rank=64"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)   # overrides are read from argv
    fv(argv)
    c = fv.config
    assert (c.phase, c.train.batch_size, c.data.batch_size, c.train.max_steps) == (3, 16, 16, 5)
    assert (c.model.preset, c.data.source, c.model.lora.rank, c.train.lr) == ("tiny", "synthetic", 64, 2e-5)
    # Visual sizes follow the data block.
    c.data.embed_dim = 256
    assert c.model.d_visual == 256


@pytest.mark.parametrize("preset", ["tiny", "llama3_2_3b"])
def test_trainable_tables_match_the_vlm(preset):
    cfg = vlm.make_config(preset, visual_token_id=0, lora=lora_lib.LoraConfig(rank=16, alpha=32.0))
    params = jax.eval_shape(lambda key: vlm.init(cfg, key), jax.random.key(0))["params"]
    trained = {}
    for phase in config_lib.PHASES:
        c = config_lib.load_phase_config(phase)
        labels = phases.trainable_labels(params, c.optimizer_groups, phase)
        trained[phase] = {p for p, label in zip(phases.leaf_paths(params), jax.tree.leaves(labels))
                          if label == phases.TRAINABLE}
    is_lora = lambda p: p.endswith(("/lora_A", "/lora_B"))  # noqa: E731
    tops = {phase: {p.split("/")[0] for p in paths} for phase, paths in trained.items()}
    assert tops[1] == {"compressor", "visual_classifier", "jepa_head"}
    assert tops[2] == {"compressor", "predictor", "jepa_head", "log_temperature"}
    injection = cfg.llm.injection_layers
    assert tops[3] == {"predictor", "llm", "llm_classifier", "jepa_head"} | {f"xattn_{l}" for l in injection} \
        | {f"projector_{l}" for l in injection}
    assert all(is_lora(p) for p in trained[3] if p.startswith("llm/"))      # the base LLM stays frozen
    assert trained[4] == {p for p in phases.leaf_paths(params) if is_lora(p)}
    assert sum(1 for p in trained[3] if is_lora(p)) == 14 * len(cfg.llm.segments)


@pytest.mark.parametrize("phase", config_lib.PHASES)
def test_every_shipped_config_is_in_range(phase):
    for arg in (None, "paper"):
        config_lib.validate(config_lib.load_phase_config(phase, arg))


@pytest.mark.parametrize("key,value", [("train.batch_size", 0), ("train.epochs", -1), ("train.lr", -1e-4),
                                       ("eval.num_examples", -3), ("train.eval_every_epochs", 0),
                                       ("calibration.every_steps", -1)])
def test_an_out_of_range_value_names_its_flag(key, value):
    config = config_lib.apply_overrides(config_lib.load_phase_config(3), {key: str(value)})
    with pytest.raises(config_lib.OverrideError, match=rf"^--config\.{key}={value}: .* must be >= "):
        config_lib.validate(config)


CT_RATE_TRAIN_VOLUMES = 46_400     # paper IV-A: ~46,400 training volumes


def test_paper_recalibrates_alpha_once_an_epoch_where_v_hat_trains():
    """alpha is recalibrated about once per epoch on 8 GPUs in the phases that train the compressor
    or the predictor (1-3: V^ moves), never in phase 4 (LoRA only); the embedded run keeps it fixed."""
    cfg = vlm.make_config("tiny", visual_token_id=0, lora=lora_lib.LoraConfig(rank=16, alpha=32.0))
    params = jax.eval_shape(lambda key: vlm.init(cfg, key), jax.random.key(0))["params"]
    intervals = {}
    for phase in config_lib.PHASES:
        c = config_lib.resolve_batch(config_lib.load_phase_config(phase, "paper"), 8)
        c.calibration.every_steps = c.calibration.every_steps or 1      # does the phase move V^?
        labels = phases.trainable_labels(params, c.optimizer_groups, phase)
        intervals[phase] = run_lib.recalibration_interval(c, params, labels)
        if phase < 4:
            assert intervals[phase] == round(CT_RATE_TRAIN_VOLUMES / c.train.batch_size), phase
        default = config_lib.load_phase_config(phase)
        assert run_lib.recalibration_interval(default, params, labels) == 0
    assert intervals[4] == 0


def test_xattn_gate_fields_reach_the_adapters():
    """model.xattn_gate / xattn_gate_init become the VLM's adapter config; the shipped profiles keep
    Flamingo's tanh gate at 0; a checkpoint's config without the fields means the same; a bad gate
    is one line naming its flag."""
    from kervljepa_jax import stand_in
    from kervljepa_jax.data import tokenizer as tokenizers
    from kervljepa_jax.model import llama

    tokenizer = tokenizers.load_hf(str(stand_in.PACKAGED_DIR))
    llm_cfg = llama.preset("tiny").replace(vocab_size=tokenizers.vocab_size(tokenizer))
    for arg in (None, "paper"):
        c = config_lib.load_phase_config(3, arg)
        xattn = run_lib.make_vlm_config(c, tokenizer, llm_cfg).xattn
        assert (xattn.gate, xattn.gate_init) == ("tanh", 0.0)
    c = config_lib.apply_overrides(config_lib.load_phase_config(3), {"model.xattn_gate": "none",
                                                                      "model.xattn_gate_init": "0.25"})
    xattn = run_lib.make_vlm_config(c, tokenizer, llm_cfg).xattn
    assert (xattn.gate, xattn.gate_init) == ("none", 0.25)
    del c.model["xattn_gate"], c.model["xattn_gate_init"]
    assert run_lib.make_vlm_config(c, tokenizer, llm_cfg).xattn.gate == "tanh"
    c.model.xattn_gate = "sigmoid"
    with pytest.raises(run_lib.TrainError, match=r"^--config.model.xattn_gate='sigmoid': use one of"):
        run_lib.make_vlm_config(c, tokenizer, llm_cfg)


def test_what_evaluation_scores_is_a_config_field():
    """Phases 1-2 score the visual classifier, 3-4 the generated reports; a phase validates (and may
    select and stop on) exactly the metric of what it scores; anything else is one line."""
    from kervljepa_jax import train
    for phase, score in ((1, "classifier"), (2, "classifier"), (3, "generation"), (4, "generation")):
        config = config_lib.load_phase_config(phase)
        assert config.eval.score == score
        train.check_scores(config)
    config = config_lib.load_phase_config(2)
    assert train.validation_metrics(config) == ("val_loss", "val_macro_f1")
    config.eval.score = "generation"
    with pytest.raises(train.TrainError, match=r"eval.score=generation: phase 2 trains no language path"):
        train.check_scores(config)
    config = config_lib.load_phase_config(3)
    config.eval.score = "classifier"          # its best_metric is still val_gen_f1
    with pytest.raises(train.TrainError, match=r"best_metric='val_gen_f1'.*\['val_loss', 'val_macro_f1'\]"):
        train.check_scores(config)
    config.checkpoint.best_metric = "val_macro_f1"
    train.check_scores(config)
    config.eval.score = "reports"
    with pytest.raises(config_lib.OverrideError, match=r"^--config.eval.score='reports': use one of"):
        config_lib.validate(config)
