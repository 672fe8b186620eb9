"""kervljepa_jax: Ker-VLJEPA-3B (3D chest CT report generation) in JAX/Flax.

Submodules are imported lazily so that `import kervljepa_jax` stays cheap:
`kervljepa_jax.hf.load_llama`, `kervljepa_jax.model.Llama`, ...
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("configs", "data", "findings", "hf", "label", "losses", "metrics", "model",
               "sharding", "whitening", "generate", "training", "evaluate")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
