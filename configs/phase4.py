"""Phase 4: the packaged config, kervljepa_jax/configs/phase4.py (it ships with the wheel).
`--config=configs/phase4.py[:paper]` reads this file: to change the phase, copy the packaged file
over this one and edit it."""

from kervljepa_jax.configs.phase4 import PHASE, get_config  # noqa: F401
