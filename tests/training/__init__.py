"""A small hand-built VLM param tree with the documented paths (notes/VLM_PATHS.md), for fast tests."""

import jax.numpy as jnp
import numpy as np

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def toy_params(seed: int = 0, rank: int = 2, d: int = 6, segments=((0, 1), (2, 3)), injection=(1,)) -> dict:
    """Two scanned segments of 2 layers (LoRA rank `rank`), one adapter + projector, the heads."""
    rng = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def segment(n):
        layer = {group: {name: {"kernel": f(n, d, d), "lora_A": f(n, d, rank), "lora_B": f(n, rank, d)}
                         for name in names} for group, names in PROJECTIONS.items()}
        layer["input_layernorm"] = {"weight": f(n, d)}
        layer["post_attention_layernorm"] = {"weight": f(n, d)}
        return layer

    model = {f"layers_{a}_{b}": segment(b - a + 1) for a, b in segments}
    model["embed_tokens"] = {"weight": f(11, d)}
    model["norm"] = {"weight": f(d)}
    params = {
        "compressor": {"queries": f(4, 8), "zone_attn": {"q_proj": {"kernel": f(8, 2, 4), "bias": f(2, 4)}}},
        "predictor": {"linear": {"kernel": f(8, d), "bias": f(d)}, "norm": {"scale": f(d), "bias": f(d)}},
        "jepa_head": {"linear1": {"kernel": f(d, 5), "bias": f(5)}, "norm": {"scale": f(5), "bias": f(5)},
                      "linear2": {"kernel": f(5, 3), "bias": f(3)}},
        "visual_classifier": {"linear": {"kernel": f(8, 3), "bias": f(3)}},
        "llm_classifier": {"linear": {"kernel": f(d, 3), "bias": f(3)}},
        "log_temperature": f(),
        "llm": {"model": model},
    }
    for layer in injection:
        params[f"xattn_{layer}"] = {"q_proj": {"kernel": f(d, 2, 3)}, "k_proj": {"kernel": f(d, 2, 3)},
                                    "v_proj": {"kernel": f(d, 2, 3)}, "o_proj": {"kernel": f(2, 3, d)},
                                    "layer_norm": {"scale": f(d), "bias": f(d)}, "gate": f()}
        params[f"projector_{layer}"] = {"kernel": f(d, d), "bias": f(d)}
    return params


def bridge_count(segments=((0, 1), (2, 3)), injection=(1,)) -> int:
    """Per-layer bridge tensors of `toy_params`: 9 per injection layer + 14 LoRA per decoder layer."""
    layers = sum(b - a + 1 for a, b in segments)
    return 9 * len(injection) + 14 * layers
