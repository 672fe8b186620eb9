"""Phase 1: the packaged config, kervljepa_jax/configs/phase1.py (it ships with the wheel).
`--config=configs/phase1.py[:paper]` reads this file: to change the phase, copy the packaged file
over this one and edit it."""

from kervljepa_jax.configs.phase1 import PHASE, get_config  # noqa: F401
