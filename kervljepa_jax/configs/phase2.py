"""Phase 2, contrastive bridge (paper III-C2, eq. 11): InfoNCE between the pooled visual embedding
and the whitened positive-findings text embedding, learned temperature (init 0.10), negatives from
the whole global batch; MMD as in phase 1.

`--config=configs/phase2.py[:paper][,lora=card]`; see kervljepa_jax/training/config.py.
"""

from kervljepa_jax.training import config as config_lib

PHASE = 2


def get_config(arg=None):
    c = config_lib.base_config()
    c.data.text_mode = "positive_findings"
    c.optimizer_groups = [dict(pattern=r"compressor/.*"), dict(pattern=r"predictor/.*"), dict(pattern=r"jepa_head/.*"),
                          dict(pattern=r"log_temperature")]
    # The paper gives no MMD weight for phase 2; phase 1's 0.5.
    c.loss_weights.update(dict(infonce=1.0, mmd=0.5))
    c.train.epochs = 30
    c.train.batch_per_device = 64     # 64/GPU x 8 GPUs: 512 InfoNCE negatives
    c.train.lr = 3e-5
    c.train.schedule = "constant"
    # Recalibrate alpha about once per epoch (paper: "periodically", no period given): ~46,400
    # CT-RATE training volumes / 512 a step on 8 GPUs = 91 steps.
    c.calibration.every_steps = 91
    # The paper: stop after 8 evaluations (one an epoch) without a lower validation loss.
    c.early_stop.update(dict(patience=8, metric="val_loss", mode="min"))
    c.checkpoint.best_metric = "val_loss"
    c.checkpoint.best_mode = "min"
    return config_lib.apply_profile(c, PHASE, arg)
