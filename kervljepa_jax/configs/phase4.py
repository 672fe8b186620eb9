"""Phase 4, narrative (paper III-C4, eq. 13): only LoRA trains, on the raw Findings_EN text, pulled
back to its phase-3 values by EWC (lambda 100, anchored at phase start); adapters and projectors
are frozen so visual grounding survives the normal-anatomy prose.

`--config=configs/phase4.py[:paper][,lora=card]`; see kervljepa_jax/training/config.py.
"""

from kervljepa_jax.model.lora import LORA_PATTERN
from kervljepa_jax.training import config as config_lib

PHASE = 4


def get_config(arg=None):
    c = config_lib.base_config()
    c.data.text_mode = "raw"
    # EWC (lambda 100) is not a loss term here: the optimizer adds its gradient (training/optim.py).
    c.optimizer_groups = [dict(pattern=LORA_PATTERN, ewc=100.0)]
    c.loss_weights.update(dict(lm=1.0, focal=1.0))
    c.train.epochs = 30
    c.train.batch_per_device = 8      # per GPU
    c.train.lr = 5e-7
    c.train.schedule = "constant"
    c.eval.score = "generation"         # generated reports, with the visual ablations
    c.checkpoint.best_metric = "val_gen_f1"
    c.checkpoint.best_mode = "max"
    return config_lib.apply_profile(c, PHASE, arg)
