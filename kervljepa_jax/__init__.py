"""kervljepa_jax: Ker-VLJEPA-3B (3D chest CT report generation) in JAX/Flax.

Submodules are imported lazily so that `import kervljepa_jax` stays cheap:
`kervljepa_jax.hf.load_llama`, `kervljepa_jax.model.Llama`, ...
"""

import importlib

__version__ = "0.1.0"

# The library's modules (the command-line entry points, e.g. `python -m kervljepa_jax.train`, are
# modules too but are run, not imported).
_SUBMODULES = ("configs", "data", "evaluate", "figures", "findings", "generate", "hf", "label", "losses",
               "metrics", "model", "probe", "sampling", "sharding", "training", "whitening")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
