"""Phase 1, visual alignment (paper III-C1, eq. 9): the compressor and the visual heads learn the
18 findings from the slices; MMD pulls each token toward its positive-condition text embeddings.

`--config=configs/phase1.py[:paper][,lora=card]`; see kervljepa_jax/training/config.py.
"""

from kervljepa_jax.training import config as config_lib

PHASE = 1


def get_config(arg=None):
    c = config_lib.base_config()
    # The MMD targets are the per-condition text embeddings (data builds them in every mode).
    c.data.text_mode = "positive_findings"
    # Per-token JEPA-head embeddings of V~ enter the MMD: the head trains, the predictor does not.
    c.optimizer_groups = [dict(pattern=r"compressor/.*"), dict(pattern=r"visual_classifier/.*"),
                          dict(pattern=r"jepa_head/.*")]
    c.loss_weights.update(dict(bce=1.5, mil=1.0, orth=1.0, mmd=0.5))
    c.train.epochs = 20
    c.train.batch_per_device = 32     # per GPU (DDP on 8 H200s: 256 global)
    c.train.lr = 5e-5
    c.train.schedule = "cosine"
    # Recalibrate alpha about once per epoch (paper: "periodically", no period given): ~46,400
    # CT-RATE training volumes / 256 a step on 8 GPUs = 181 steps.
    c.calibration.every_steps = 181
    c.checkpoint.best_metric = "val_macro_f1"   # the visual classifier on the validation split
    c.checkpoint.best_mode = "max"
    return config_lib.apply_profile(c, PHASE, arg)
