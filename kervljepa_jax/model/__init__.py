"""Models: the Llama 3 decoder, LoRA, and the Ker-VLJEPA visual bridge.

    from kervljepa_jax.model import Llama, llama3_2_3b, LoraConfig, VLM, make_vlm_config
    cfg = llama3_2_3b(lora=LoraConfig(rank=16, alpha=32.0))
    logits = Llama(cfg).apply({"params": params}, input_ids).logits
"""

from kervljepa_jax.model.llama import PRESETS, Llama, LlamaConfig, RopeConfig, llama3_2_3b, preset, tiny
from kervljepa_jax.model.lora import LoraConfig, merge_lora
from kervljepa_jax.model.vlm import VLM, VLMConfig
from kervljepa_jax.model.vlm import init as init_vlm
from kervljepa_jax.model.vlm import make_config as make_vlm_config

__all__ = ["PRESETS", "Llama", "LlamaConfig", "LoraConfig", "RopeConfig", "VLM", "VLMConfig", "init_vlm",
           "llama3_2_3b", "make_vlm_config", "merge_lora", "preset", "tiny"]
