"""LoRA (Hu et al., 2022) as a drop-in Dense: y = x W + dropout(x) A B * (alpha / r).

LoRA tensors sit next to the weight they adapt, under peft's names:
`.../q_proj/kernel [in, out]`, `.../q_proj/lora_A [in, r]`, `.../q_proj/lora_B [r, out]`.
(peft stores them transposed, as torch Linear weights: lora_A.weight [r, in], lora_B.weight [out, r].)
A is initialised as peft's default (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
and B with zeros, so a fresh LoRA model equals its base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from kervljepa_jax.model.dropout import Dropout

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LEAVES = ("lora_A", "lora_B")
# Any LoRA tensor in a param tree, for the phase tables and the warm bridge.
LORA_PATTERN = r".*/lora_[AB]$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), dropout on the LoRA input, and which projections to adapt."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS
    # LoRA is what phases 3-4 train: its master weights stay f32 whatever the base weights' storage
    # dtype (bf16 at 3B). A bf16 weight near |w| = 0.1 moves in steps of ~5e-4, so phase 4's
    # updates (lr 5e-7) would round to nothing and EWC would hold nothing.
    param_dtype: str = "float32"

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"lora.targets: unknown projection(s) {unknown}; choose from {list(LORA_TARGETS)}")
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def peft_lora_a_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """peft's default: kaiming_uniform_(a=sqrt(5)) on the [r, in] weight == U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Module):
    """A bias-free Dense `[..., in] -> [..., out]` with an optional LoRA branch.

    `axes` are the logical names of the kernel's (in, out) dimensions.
    """

    features: int
    axes: tuple[str, str]
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (in_features, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.lora is None:
            return y
        lora_a = self.param("lora_A", nn.with_logical_partitioning(peft_lora_a_init, (self.axes[0], "lora_rank")),
                            (in_features, self.lora.rank), jnp.dtype(self.lora.param_dtype))
        lora_b = self.param("lora_B", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                            (self.lora.rank, self.features), jnp.dtype(self.lora.param_dtype))
        x_in = Dropout(self.lora.dropout, deterministic=self.deterministic)(x)
        return y + (x_in @ lora_a.astype(self.dtype)) @ lora_b.astype(self.dtype) * self.lora.scale


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(params)


def is_lora_path(path: tuple[str, ...]) -> bool:
    return path[-1] in LORA_LEAVES


def count_lora_tensors(params: Any, layer_axis: bool = True) -> int:
    """Number of per-layer LoRA tensors; a scanned [L, ...] leaf counts as L tensors (as peft would)."""
    total = 0
    for path, leaf in _flat(params).items():
        if is_lora_path(path):
            stacked = layer_axis and any(p.startswith("layers_") for p in path)
            total += leaf.shape[0] if stacked else 1
    return total


def merge_lora(params: Any, lora: LoraConfig) -> Any:
    """Fold every LoRA pair into its kernel: W' = W + A B * scale; returns a LoRA-free tree.

    Use the result with a config whose `lora` is None. Works on scanned [L, in, out] leaves too.
    """
    flat = _flat(params)
    merged = {}
    for path, leaf in flat.items():
        if is_lora_path(path):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in flat:
            a, b = flat[path[:-1] + ("lora_A",)], flat[path[:-1] + ("lora_B",)]
            delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
            leaf = (leaf.astype(jnp.float32) + delta * lora.scale).astype(leaf.dtype)
        merged[path] = leaf
    return traverse_util.unflatten_dict(merged)


def select_paths(params: Any, pattern: str) -> list[str]:
    """'/'-joined paths of the leaves whose path matches `pattern` (re.fullmatch)."""
    rx = re.compile(pattern)
    return ["/".join(p) for p in _flat(params) if rx.fullmatch("/".join(p))]
