"""Phase 3, generation (paper III-C3, eq. 12): the predictor, LoRA, the gated cross-attention
adapters and the layer projectors learn to write positive-findings-only reports; the compressor is
frozen. LoRA freezes after epoch 6; ReduceLROnPlateau on validation generation F1; the projectors'
lr is scaled by a LARS-like ||w|| / ||g|| ratio clipped to [1, 30].

`--config=configs/phase3.py[:paper][,lora=card]`; see kervljepa_jax/training/config.py.
"""

from kervljepa_jax.model.lora import LORA_PATTERN
from kervljepa_jax.model.xattn import PROJECTOR_PATTERN, XATTN_GATE_PATTERN, XATTN_PATTERN
from kervljepa_jax.training import config as config_lib

PHASE = 3


def get_config(arg=None):
    c = config_lib.base_config()
    # Findings in shuffled order, a normal study -> the fixed normal sentence.
    c.data.text_mode = "positive_findings"
    # First match wins: the gates before the rest of their adapters (a row of their own, so that a
    # profile can set their lr), LoRA freezes after epoch 6, the projectors' lr is scaled by the
    # clipped ||w|| / ||g|| ratio.
    c.optimizer_groups = [
        dict(pattern=XATTN_GATE_PATTERN),
        dict(pattern=LORA_PATTERN, freeze_after_epoch=6),
        dict(pattern=PROJECTOR_PATTERN, trust_ratio=[1.0, 30.0]),
        dict(pattern=r"predictor/.*"),
        dict(pattern=XATTN_PATTERN),
        dict(pattern=r"llm_classifier/.*"),
        dict(pattern=r"jepa_head/.*"),
    ]
    # The paper names only lambda_vcls = 3.0; focal and JEPA weights are 1.0.
    c.loss_weights.update(dict(lm=1.0, focal=1.0, jepa=1.0, llm_cls=3.0))
    c.train.epochs = 50
    c.train.batch_per_device = 8      # per GPU
    c.train.lr = 2e-5
    c.train.schedule = "constant"
    # Recalibrate alpha about once per epoch (paper: "periodically", no period given): ~46,400
    # CT-RATE training volumes / 64 a step on 8 GPUs = 725 steps. Phase 4 trains neither the
    # compressor nor the predictor, so its alpha stays phase 3's.
    c.calibration.every_steps = 725
    c.plateau.update(dict(enabled=True, metric="val_gen_f1", mode="max", patience=3, factor=0.5))
    c.eval.score = "generation"         # generated reports, with the visual ablations
    c.checkpoint.best_metric = "val_gen_f1"
    c.checkpoint.best_mode = "max"
    return config_lib.apply_profile(c, PHASE, arg)
