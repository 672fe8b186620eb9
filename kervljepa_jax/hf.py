"""Hugging Face Llama checkpoints <-> our param tree, tensor by tensor.

    cfg, params = kervljepa_jax.hf.load_llama("/path/to/Llama-3.2-3B-Instruct")
    logits = kervljepa_jax.model.Llama(cfg).apply({"params": params}, input_ids).logits

Safetensors files are opened with `safetensors.safe_open` (memory-mapped) and read one stacked leaf
at a time (never two copies of the model in host memory); with `mesh=` each device reads only its
slice of a leaf (`get_slice`) and the leaf goes straight onto its NamedSharding. Only config keys
whose math this decoder implements are accepted; anything else is a one-line error.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import traverse_util

from kervljepa_jax import sharding
from kervljepa_jax.model.llama import Llama, LlamaConfig, RopeConfig
from kervljepa_jax.model.lora import LoraConfig, is_lora_path

# The header's dtype names of what write_safetensors writes.
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


class HFLoadError(ValueError):
    """A checkpoint that this code cannot load; the message is one line saying what and where."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
    """A transformers 4.x or 5.x Llama config.json dict -> LlamaConfig (math-changing keys checked)."""
    if hf.get("model_type") != "llama":
        raise HFLoadError(f"{source}: model_type={hf.get('model_type')!r}, only 'llama' is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFLoadError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFLoadError(f"{source}: {key}=true is not supported by this decoder")
    rope = _rope_from_hf(hf, source)
    heads = hf["num_attention_heads"]
    cfg = LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=rope,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048))
    return cfg.replace(**overrides)


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5.x: rope_parameters {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFLoadError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "llama3":
        raise HFLoadError(f"{source}: rope_type={rope_type!r} is not supported (use 'default' or 'llama3')")
    try:
        return RopeConfig(theta=float(theta), rope_type="llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise HFLoadError(f"{source}: llama3 rope parameters lack {e.args[0]!r}") from None


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig -> a transformers config.json dict (written with both rope spellings)."""
    rope = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
    if cfg.rope.rope_type == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope.theta, "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope.rope_type == "llama3" else None,
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


# ----------------------------------------------------------------------------- safetensors


class SafetensorsReader:
    """The tensors of one file or an index of shards, through `safetensors.safe_open` (numpy,
    memory-mapped): `get` reads a whole tensor, `slice` only the bytes of one region of it."""

    def __init__(self, files: Sequence[str]):
        self._open: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for file in files:
            if not os.path.exists(file):
                raise HFLoadError(f"{file}: listed in the index but missing")
            self._open[file] = safetensors.safe_open(file, framework="numpy")
            self._where.update({key: file for key in self._open[file].keys()})

    @classmethod
    def from_folder(cls, path: str) -> "SafetensorsReader":
        """model.safetensors, or the shards model.safetensors.index.json lists."""
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFLoadError(f"{index}: no 'weight_map' object")
            return cls([os.path.join(path, name) for name in sorted(set(weight_map.values()))])
        if os.path.exists(os.path.join(path, "model.safetensors")):
            return cls([os.path.join(path, "model.safetensors")])
        raise HFLoadError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._open[self._where[key]].get_tensor(key)

    def slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index], reading only those bytes from disk."""
        return self._open[self._where[key]].get_slice(key)[index]


class LazyTensor(NamedTuple):
    """A tensor to write, made only when its bytes are due: name, shape, dtype and a maker."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(tensors: Sequence[LazyTensor], file: str, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file; each tensor is made, written and dropped before the next (the header
    needs only shapes), so a file never costs more host memory than its largest tensor.

    Not `safetensors.numpy.save_file` / `serialize_file`: both take every tensor of the file at once
    (arrays, or raw pointers that must all stay alive), so a 5 GB shard of the 3B model would cost
    5 GB of host memory instead of one tensor."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = np.asarray(t.make())          # tobytes() writes C order whatever the strides
            if tuple(arr.shape) != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise ValueError(f"write_safetensors: {t.name} made {arr.shape} {arr.dtype}, declared "
                                 f"{t.shape} {np.dtype(t.dtype)}")
            f.write(arr.tobytes())


def save_safetensors(tensors: dict[str, np.ndarray], file: str, metadata: dict[str, str] | None = None) -> None:
    """Write numpy (incl. bfloat16) tensors that are already in memory (`safetensors.numpy.save_file`;
    "format": "pt" unless `metadata` says otherwise, as transformers expects)."""
    safetensors.numpy.save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, file,
                                metadata or {"format": "pt"})


# transformers' default max_shard_size ("5GB", decimal).
SHARD_BYTES = 5 * 10**9


def save_sharded(tensors: Sequence[LazyTensor], folder: str, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """transformers' layout: model.safetensors, or model-0000i-of-0000n.safetensors shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own) with model.safetensors.index.json.
    Returns the file names written."""
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        write_safetensors(shard, os.path.join(folder, name))
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return names


# ----------------------------------------------------------------------------- name mapping

_SEGMENT = re.compile(r"layers_(\d+)_(\d+)")


def hf_sources(path: tuple[str, ...]) -> list[tuple[str, bool]] | None:
    """Our leaf path -> [(HF tensor name, transpose?)], one per stacked layer; None if not in HF."""
    if is_lora_path(path):
        return None
    joined = "/".join(path)
    if joined == "model/embed_tokens/weight":
        return [("model.embed_tokens.weight", False)]
    if joined == "model/norm/weight":
        return [("model.norm.weight", False)]
    if joined == "lm_head/kernel":
        return [("lm_head.weight", True)]
    m = _SEGMENT.fullmatch(path[1]) if len(path) > 2 and path[0] == "model" else None
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    inner, leaf = ".".join(path[2:-1]), path[-1]
    suffix = "weight"
    return [(f"model.layers.{i}.{inner}.{suffix}", leaf == "kernel") for i in range(first, last + 1)]


def abstract_params(cfg: LlamaConfig, adapters: tuple = ()) -> Any:
    """Boxed ShapeDtypeStructs of the param tree (with logical axis metadata), no memory used."""
    model = Llama(cfg, adapters)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def load_llama(path: str, *, lora: LoraConfig | None = None, mesh: jax.sharding.Mesh | None = None,
               rng: jax.Array | None = None, **overrides) -> tuple[LlamaConfig, Any]:
    """Read a local HF Llama folder into (cfg, params); LoRA tensors (not in HF) are freshly initialised.

    `overrides` set LlamaConfig fields (dtype, param_dtype, injection_layers, scan_layers, ...).
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise HFLoadError(f"{path}: no config.json; pass a local Hugging Face model folder")
    with open(config_file, encoding="utf-8") as f:
        cfg = config_from_hf(json.load(f), config_file, lora=lora, **overrides)
    reader = SafetensorsReader.from_folder(path)
    boxed = abstract_params(cfg)
    shardings = sharding.named_shardings(boxed, mesh) if mesh is not None else None
    abstract = traverse_util.flatten_dict(nn.unbox(boxed))
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}

    loaded, missing_paths = {}, []
    for p, spec in abstract.items():
        sources = hf_sources(p)
        if sources is None:
            missing_paths.append(p)
            continue
        if mesh is not None:
            loaded[p] = _read_onto(reader, sources, spec, path, _is_stacked(p), flat_shardings[p])
        else:
            loaded[p] = jnp.asarray(_gather(reader, sources, spec, path, _is_stacked(p)))
    loaded.update(_init_missing(cfg, missing_paths, rng, mesh, flat_shardings))
    unused = _unused_tensors(reader, abstract)
    if unused:
        logging.info("hf: ignored %d tensors not used by this model, e.g. %s", len(unused), unused[0])
    logging.info("hf: loaded %d tensors from %s (%d initialised fresh)", len(loaded) - len(missing_paths),
                 path, len(missing_paths))
    return cfg, traverse_util.unflatten_dict(loaded)


def _check_sources(reader: SafetensorsReader, sources: list[tuple[str, bool]], spec: jax.ShapeDtypeStruct,
                   folder: str, stacked: bool) -> None:
    """Every HF tensor of the leaf is in the checkpoint with the shape the config expects (one per
    stacked layer); only headers are read."""
    want = tuple(spec.shape[1:] if stacked else spec.shape)
    for name, transpose in sources:
        if name not in reader:
            raise HFLoadError(f"{folder}: tensor {name} is missing from the checkpoint")
        expected = want[::-1] if transpose else want           # HF's layout
        if reader.shape(name) != expected:
            raise HFLoadError(f"{folder}: tensor {name} has shape {reader.shape(name)}, the config expects {expected}")


def _region(reader: SafetensorsReader, name: str, transpose: bool, index: tuple[slice, ...],
            dtype: Any) -> np.ndarray:
    """tensor[index] in our layout (HF's transposed where `transpose`), read from disk alone."""
    if transpose:
        return np.asarray(reader.slice(name, tuple(index[::-1])).T, dtype=dtype)
    return np.asarray(reader.slice(name, tuple(index)), dtype=dtype)


def _read_leaf(reader: SafetensorsReader, sources: list[tuple[str, bool]], spec: jax.ShapeDtypeStruct,
               stacked: bool, index: tuple[slice, ...]) -> np.ndarray:
    """leaf[index]; a stacked leaf takes one HF tensor per layer of index[0]."""
    if not stacked:
        name, transpose = sources[0]
        return _region(reader, name, transpose, index, spec.dtype)
    layers = range(*index[0].indices(spec.shape[0]))
    return np.stack([_region(reader, *sources[i], index[1:], spec.dtype) for i in layers])


def _gather(reader: SafetensorsReader, sources: list[tuple[str, bool]], spec: jax.ShapeDtypeStruct,
            folder: str, stacked: bool) -> np.ndarray:
    """One leaf into a host buffer."""
    _check_sources(reader, sources, spec, folder, stacked)
    return _read_leaf(reader, sources, spec, stacked, tuple(slice(None) for _ in spec.shape))


def _read_onto(reader: SafetensorsReader, sources: list[tuple[str, bool]], spec: jax.ShapeDtypeStruct,
               folder: str, stacked: bool, placement: jax.sharding.Sharding) -> jax.Array:
    """One leaf straight onto its sharding: for each of this process's devices only the slice that
    device holds is read from the files (an FSDP shard of a 3B layer, not the layer)."""
    _check_sources(reader, sources, spec, folder, stacked)
    return jax.make_array_from_callback(spec.shape, placement,
                                        lambda index: _read_leaf(reader, sources, spec, stacked, index))


def _init_missing(cfg: LlamaConfig, paths: list[tuple[str, ...]], rng, mesh, flat_shardings) -> dict:
    """Initialise only `paths` (LoRA): XLA drops every other part of the init computation."""
    if not paths:
        return {}
    rng = jax.random.key(0) if rng is None else rng

    def init_subset(key):
        flat = traverse_util.flatten_dict(nn.unbox(
            Llama(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]))
        return {p: flat[p] for p in paths}       # tuple keys: a pytree like any dict

    out_shardings = {p: flat_shardings[p] for p in paths} if mesh is not None else None
    return jax.jit(init_subset, out_shardings=out_shardings)(rng)


def _unused_tensors(reader: SafetensorsReader, abstract: dict) -> list[str]:
    used = {name for p in abstract for name, _ in (hf_sources(p) or [])}
    return sorted(set(reader.keys()) - used)


# ----------------------------------------------------------------------------- export


LORA_MODES = ("refuse", "merge", "drop")


def save_llama(cfg: LlamaConfig, params: Any, path: str, *, lora: str = "refuse", dtype: str | None = None,
               max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write params as a HF Llama folder (config.json + safetensors, sharded as transformers does)
    that transformers loads. Returns the safetensors file names.

    LoRA tensors: lora="refuse" (any left is an error: merge them with `model.lora.merge_lora`
    first), "merge" (W + A B * scale folded in tensor by tensor, cfg.lora's scale) or "drop"
    (the base model). `dtype` ("float32", "bfloat16"; None: each leaf's own) is the stored dtype.
    Tensors are made one at a time from `params`: no second copy of the model in host memory.
    """
    if lora not in LORA_MODES:
        raise ValueError(f"save_llama: lora={lora!r}; choose one of {LORA_MODES}")
    flat = traverse_util.flatten_dict(nn.unbox(params))
    if lora == "refuse" and any(is_lora_path(p) for p in flat):
        raise ValueError("save_llama: params carry LoRA tensors; merge them with merge_lora(params, cfg.lora) first")
    if lora == "merge" and cfg.lora is None and any(is_lora_path(p) for p in flat):
        raise ValueError("save_llama: lora='merge' needs cfg.lora for the LoRA scale")
    scale = cfg.lora.scale if lora == "merge" and cfg.lora is not None else None
    tensors = [t for p, leaf in flat.items() if not is_lora_path(p)
               for t in _hf_tensors(p, leaf, _lora_pair(flat, p) if scale else None, scale, dtype)]
    os.makedirs(path, exist_ok=True)
    names = save_sharded(sorted(tensors, key=lambda t: t.name), path, max_shard_bytes)
    stored = cfg.replace(lora=None, param_dtype=dtype or cfg.param_dtype)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(stored), f, indent=2)
    return names


def _lora_pair(flat: dict, path: tuple[str, ...]) -> tuple[Any, Any] | None:
    a, b = path[:-1] + ("lora_A",), path[:-1] + ("lora_B",)
    return (flat[a], flat[b]) if path[-1] == "kernel" and a in flat else None


def _hf_tensors(path: tuple[str, ...], leaf: Any, pair: tuple[Any, Any] | None, scale: float | None,
                dtype: str | None) -> list[LazyTensor]:
    """The HF tensors of one leaf (one per layer of a stacked leaf), made lazily."""
    sources = hf_sources(path)
    if sources is None:
        raise ValueError(f"save_llama: no HF name for param {'/'.join(path)}")
    stacked = _is_stacked(path)
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    out_dtype = np.dtype(dtype or leaf.dtype)
    out = []
    for i, (name, transpose) in enumerate(sources):
        make = functools.partial(_hf_tensor, leaf, i if stacked else None, transpose, pair, scale, out_dtype)
        out.append(LazyTensor(name, shape[::-1] if transpose else shape, out_dtype, make))
    return out


def _hf_tensor(leaf: Any, layer: int | None, transpose: bool, pair: tuple[Any, Any] | None, scale: float | None,
               dtype: np.dtype) -> np.ndarray:
    """`leaf[layer]` (or the leaf) as a HF tensor: LoRA folded in (in f32), transposed, cast."""
    pick = (lambda x: x) if layer is None else (lambda x: x[layer])  # noqa: E731
    w = np.asarray(jax.device_get(pick(leaf)))
    if pair is not None:
        a, b = (np.asarray(jax.device_get(pick(x)), np.float32) for x in pair)
        w = w.astype(np.float32) + (a @ b) * np.float32(scale)
    return np.ascontiguousarray((w.T if transpose else w).astype(dtype))


def _is_stacked(path: tuple[str, ...]) -> bool:
    return len(path) > 1 and bool(_SEGMENT.fullmatch(path[1]))


# ----------------------------------------------------------------------------- PEFT LoRA adapters

_PEFT_PREFIX = "base_model.model."


def peft_sources(path: tuple[str, ...]) -> list[str] | None:
    """Our LoRA leaf path -> peft adapter tensor names (torch [out, in] layout, so transposed)."""
    if not is_lora_path(path) or not _is_stacked(path):
        return None
    first, last = map(int, _SEGMENT.fullmatch(path[1]).groups())
    inner = ".".join(path[2:-1])
    return [f"{_PEFT_PREFIX}model.layers.{i}.{inner}.{path[-1]}.weight" for i in range(first, last + 1)]


def save_peft_lora(cfg: LlamaConfig, params: Any, path: str, base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA tensors as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
    tensor by tensor."""
    if cfg.lora is None:
        raise ValueError("save_peft_lora: cfg.lora is None, the params carry no LoRA adapter")
    os.makedirs(path, exist_ok=True)
    tensors = []
    for p, leaf in traverse_util.flatten_dict(nn.unbox(params)).items():
        for i, name in enumerate(peft_sources(p) or ()):
            make = functools.partial(_hf_tensor, leaf, i, True, None, None, np.dtype(leaf.dtype))
            tensors.append(LazyTensor(name, tuple(leaf.shape[1:][::-1]), np.dtype(leaf.dtype), make))
    write_safetensors(sorted(tensors, key=lambda t: t.name), os.path.join(path, "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout, "target_modules": sorted(cfg.lora.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)


def load_peft_lora(cfg: LlamaConfig, params: Any, path: str) -> Any:
    """Overwrite the LoRA leaves of `params` from a PEFT adapter folder (rank and targets must match)."""
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise HFLoadError(f"{path}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        acfg = json.load(f)
    if cfg.lora is None or acfg.get("r") != cfg.lora.rank or float(acfg.get("lora_alpha")) != cfg.lora.alpha:
        raise HFLoadError(f"{path}/adapter_config.json: r={acfg.get('r')}, lora_alpha={acfg.get('lora_alpha')} "
                          f"do not match model.lora={cfg.lora}; set the same rank and alpha")
    reader = SafetensorsReader([file])
    flat = traverse_util.flatten_dict(params)
    for p, leaf in flat.items():
        names = peft_sources(p)
        if names:
            missing = [n for n in names if n not in reader]
            if missing:
                raise HFLoadError(f"{file}: tensor {missing[0]} is missing (targets differ from model.lora.targets?)")
            flat[p] = jnp.stack([jnp.asarray(reader.get(n).T, leaf.dtype) for n in names])
    return traverse_util.unflatten_dict(flat)
