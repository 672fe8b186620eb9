"""Run an exported Ker-VLJEPA (`python -m kervljepa_jax.export`) in plain PyTorch + transformers.

    runner = load("OUT")                          # OUT/llm (LoRA merged) + OUT/bridge
    runner = load("OUT", use_adapter=True)        # OUT/base + the PEFT adapter OUT/adapter instead
    print(runner.generate_reports(slices, z_mm)[0])   # slices [B, N, d_v], z_mm [B, N] (mm)

    python -m kervljepa_jax.torch_runner --export=OUT --slices=FILE.npy [--z_mm=FILE.npy] [--use_adapter]
        [--seed=0] [--max_new_tokens=N]

The bridge is rebuilt from OUT/bridge in torch modules whose math is the JAX model's, in eval mode
(no dropout):
  ZoneCompressor   slices + sinusoidal PE(z in mm, relative to the first slice), 32 learnable
                   queries in nn.MultiheadAttention where query k sees only the valid slices of its
                   zone [floor(k n/K), floor((k+1) n/K)) (an empty zone widens to one slice), then
                   one nn.TransformerEncoderLayer (post-norm, ReLU)                 -> V' [B, K, d_v]
  Predictor        LayerNorm(Linear(V'))                                             -> V^ [B, K, D]
  calibrator       alpha * V^                                                        -> V~ [B, K, D]
  projectors/xattn h + tanh(gate) * MHA(LN(h), P_l(V~), P_l(V~)) after decoder layer l, as forward
                   hooks on `model.model.layers[l]`: they fire on the prompt and on every decode step.
V~ replaces the input embeddings at the `<|visual_region|>` placeholders of the chat prompt
(bridge/config.json `prompt_ids`), and `model.generate` samples with llm/generation_config.json
(the paper's settings; the placeholder token is suppressed).

torch is imported here only: the rest of kervljepa_jax never needs it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

BRIDGE_FILE = "bridge.safetensors"
_MASKED = -1e9        # the JAX compressor's additive bias outside a zone (exp underflows to 0 in f32)


class RunnerError(ValueError):
    """An export folder or input this runner cannot use: one line, non-zero exit."""


# ----------------------------------------------------------------------------- the bridge modules


def sinusoidal_z_encoding(z_mm: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """`z_mm [B, N]` -> `[B, N, dim]` f32: PE[2j] = sin(z w_j), PE[2j+1] = cos(z w_j), w_j = base^(-2j/dim)."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    angles = z_mm.float()[..., None] * freqs
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(*z_mm.shape, dim)


def zone_mask(valid: torch.Tensor, num_zones: int) -> torch.Tensor:
    """`valid [B, N]` bool prefix -> `[B, K, N]`: query k reads slices [lo_k, hi_k) of the n valid ones."""
    n = valid.sum(-1, keepdim=True).long()                                    # [B, 1]
    k = torch.arange(num_zones)
    lo = (k * n) // num_zones                                                 # [B, K]
    hi = torch.maximum(((k + 1) * n) // num_zones, lo + 1)
    i = torch.arange(valid.shape[-1])
    return (i >= lo[..., None]) & (i < hi[..., None]) & valid[:, None, :]


class ZoneCompressor(nn.Module):
    """`slices [B, N, d_v], z_mm [B, N], valid [B, N] -> V' [B, K, d_v]` (paper eq. 1-4)."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, heads = cfg["d_visual"], cfg["num_heads"]
        self.cfg = cfg
        self.region_queries = nn.Parameter(torch.zeros(cfg["num_zones"], d))
        self.zone_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.global_layer = nn.TransformerEncoderLayer(d, heads, cfg["ffn_dim"], dropout=0.0,
                                                       layer_norm_eps=cfg["layer_norm_eps"], batch_first=True)

    def forward(self, slices: torch.Tensor, z_mm: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        z = z_mm.float()
        if cfg["z_relative_to_first"]:
            z = z - z[:, :1]
        z = torch.where(valid, z, torch.zeros_like(z))
        pe = sinusoidal_z_encoding(z, cfg["d_visual"], cfg["pe_base"])
        # Padding is zeroed (NaN included) before anything reads it, and lies outside every zone.
        keys = torch.where(valid[..., None], slices.float() + pe, torch.zeros_like(pe))
        bias = torch.where(zone_mask(valid, cfg["num_zones"]), 0.0, _MASKED)             # [B, K, N]
        bias = bias.repeat_interleave(cfg["num_heads"], dim=0)                           # [B * H, K, N]
        queries = self.region_queries[None].expand(slices.shape[0], -1, -1)
        tokens, _ = self.zone_attn(queries, keys, keys, attn_mask=bias, need_weights=False)
        return self.global_layer(tokens)


class Predictor(nn.Module):
    """`V' [B, K, d_v] -> V^ [B, K, D]`: LayerNorm(Linear(V')) (eq. 5)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.linear = nn.Linear(cfg["d_visual"], cfg["d_llm"])
        self.norm = nn.LayerNorm(cfg["d_llm"], eps=cfg["layer_norm_eps"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(tokens))


class Calibrator(nn.Module):
    """`V^ -> V~ = alpha * V^` (eq. 6); alpha is a buffer, as in JAX it is no trained weight."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alpha", torch.ones(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.alpha


class GatedCrossAttention(nn.Module):
    """`h [B, T, D], visual [B, K, D] (projected) -> h + tanh(gate) * o(softmax(q k^T / sqrt(hd)) v)`
    with q from LayerNorm(h) (eq. 7); config gate "none" adds the output ungated (no gate weight).
    T is free: a whole prompt or one decode step."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, inner = cfg["d_model"], cfg["num_heads"] * cfg["head_dim"]
        self.heads, self.head_dim = cfg["num_heads"], cfg["head_dim"]
        self.layer_norm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(())) if cfg.get("gate", "tanh") == "tanh" else None

    def forward(self, h: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        split = lambda x: x.reshape(b, x.shape[1], self.heads, self.head_dim)  # noqa: E731
        q = split(self.q_proj(self.layer_norm(h.float())))                        # [B, T, H, hd]
        k, v = split(self.k_proj(visual)), split(self.v_proj(visual))             # [B, K, H, hd]
        weights = torch.softmax(torch.einsum("bthe,bkhe->bhtk", q, k) / math.sqrt(self.head_dim), dim=-1)
        attended = torch.einsum("bhtk,bkhe->bthe", weights, v).reshape(b, t, -1)
        # The residual is added in f32 and cast back, as the JAX adapter does.
        out = self.o_proj(attended)
        return h + (out if self.gate is None else torch.tanh(self.gate) * out).to(h.dtype)


class JEPAHead(nn.Module):
    """`[..., D] -> [..., jepa_dim]`: linear2(GELU(norm(linear1(x)))) (eq. 8), exact GELU."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.linear1 = nn.Linear(cfg["d_llm"], cfg["jepa_hidden"])
        self.norm = nn.LayerNorm(cfg["jepa_hidden"], eps=cfg["layer_norm_eps"])
        self.linear2 = nn.Linear(cfg["jepa_hidden"], cfg["jepa_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(nn.functional.gelu(self.norm(self.linear1(x))))


class Classifier(nn.Module):
    def __init__(self, d_in: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(d_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Bridge(nn.Module):
    """Every non-decoder weight of the export, under bridge.safetensors' names."""

    def __init__(self, config: dict):
        super().__init__()
        b = config["bridge"]
        self.compressor = ZoneCompressor(config["compressor"])
        self.predictor = Predictor(b)
        self.calibrator = Calibrator()
        layers = [str(layer) for layer in config["injection_layers"]]
        self.projectors = nn.ModuleDict({l: nn.Linear(b["d_llm"], b["d_llm"]) for l in layers})
        self.xattn = nn.ModuleDict({l: GatedCrossAttention(config["xattn"]) for l in layers})
        self.jepa_head = JEPAHead(b)
        self.visual_classifier = Classifier(b["d_visual"], b["num_classes"])
        self.llm_classifier = Classifier(b["d_llm"], b["num_classes"])
        self.log_temperature = nn.Parameter(torch.zeros(()))
        if config.get("whitening_shape"):            # the text whitening x -> (x - mean) @ projection
            self.whitening = nn.Module()
            self.whitening.register_buffer("mean", torch.zeros(config["whitening_shape"][0]))
            self.whitening.register_buffer("projection", torch.zeros(*config["whitening_shape"]))

    def visual(self, slices: torch.Tensor, z_mm: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (V' [B, K, d_v], V~ [B, K, D])."""
        tokens = self.compressor(slices, z_mm, valid)
        return tokens, self.calibrator(self.predictor(tokens))


def read_config(folder: str) -> dict:
    """OUT/bridge/config.json (sizes, prompt, special ids), checked to sit beside its weights."""
    config_file = os.path.join(folder, "config.json")
    if not (os.path.isfile(config_file) and os.path.isfile(os.path.join(folder, BRIDGE_FILE))):
        raise RunnerError(f"{folder}: no config.json + {BRIDGE_FILE}; pass the folder `python -m "
                          "kervljepa_jax.export` wrote (OUT, which holds bridge/)")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def load_bridge(folder: str) -> tuple[Bridge, dict]:
    """OUT/bridge -> (Bridge in eval mode, its config); every tensor must match a module weight."""
    from safetensors.torch import load_file

    config, weights = read_config(folder), os.path.join(folder, BRIDGE_FILE)
    bridge = Bridge(config)
    try:
        bridge.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])[:400]     # line 0 is a title
        raise RunnerError(f"{weights}: does not match its config.json: {detail}") from None
    return bridge.eval(), config


# ----------------------------------------------------------------------------- the VLM around transformers


def graft(embeds: torch.Tensor, input_ids: torch.Tensor, visual: torch.Tensor, visual_token_id: int) -> torch.Tensor:
    """`embeds [B, T, D]` with the k-th `<|visual_region|>` of each row := `visual[:, k]` (vlm.graft)."""
    placeholder = input_ids == visual_token_id
    rank = torch.cumsum(placeholder.long(), dim=1) - 1
    is_visual = placeholder & (rank < visual.shape[1])              # a stray later placeholder stays text
    rank = rank.clamp(0, visual.shape[1] - 1)
    gathered = torch.gather(visual.to(embeds.dtype), 1, rank[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(is_visual[..., None], gathered, embeds)


class Runner:
    """A transformers Llama with the bridge attached: visual tokens, logits, generation."""

    def __init__(self, model: Any, bridge: Bridge, config: dict, tokenizer: Any = None, generation_config: Any = None):
        self.model, self.bridge, self.config = model, bridge, config
        self.tokenizer, self.generation_config = tokenizer, generation_config
        self._context: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        self.hooks = [layers[l].register_forward_hook(self._hook(l)) for l in config["injection_layers"]]

    def _hook(self, layer: int):
        xattn = self.bridge.xattn[str(layer)]

        def hook(module, args, output):
            if layer not in self._context:      # no visual context: the adapters stay idle (text only)
                return output
            h = output[0] if isinstance(output, tuple) else output
            h = xattn(h, self._context[layer])
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    @contextlib.contextmanager
    def visual_context(self, calibrated: torch.Tensor) -> Iterator[None]:
        """The adapters attend to the projected V~ while inside (prompt and every decode step)."""
        self._context = {int(l): p(calibrated) for l, p in self.bridge.projectors.items()}
        try:
            yield
        finally:
            self._context = {}

    def _inputs(self, slices, z_mm, valid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slices = torch.as_tensor(np.asarray(slices, np.float32))
        z_mm = torch.as_tensor(np.asarray(z_mm, np.float32))
        valid = (torch.ones(slices.shape[:2], dtype=torch.bool) if valid is None
                 else torch.as_tensor(np.asarray(valid, bool)))
        return slices, z_mm, valid

    @torch.no_grad()
    def visual(self, slices, z_mm, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`slices [B, N, d_v], z_mm [B, N], valid [B, N] | None (all)` -> (V' [B, K, d_v], V~ [B, K, D])."""
        return self.bridge.visual(*self._inputs(slices, z_mm, valid))

    def _embeds(self, input_ids: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        return graft(embeds, input_ids, calibrated, self.config["visual_token_id"])

    @torch.no_grad()
    def logits(self, input_ids, slices, z_mm, valid=None, attention_mask=None) -> torch.Tensor:
        """The full model on `input_ids [B, T]` holding the K placeholders -> logits [B, T, V] (f32)."""
        input_ids = torch.as_tensor(np.asarray(input_ids, np.int64))
        _, calibrated = self.visual(slices, z_mm, valid)
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        with self.visual_context(calibrated):
            out = self.model(inputs_embeds=self._embeds(input_ids, calibrated), attention_mask=mask.long())
        return out.logits.float()

    @torch.no_grad()
    def generate(self, slices, z_mm, valid=None, **overrides) -> torch.Tensor:
        """New token ids [B, <= max_new_tokens] (pad after eos) for the chat prompt; `overrides` go to
        `model.generate` over llm/generation_config.json (e.g. do_sample=False, max_new_tokens=96)."""
        _, calibrated = self.visual(slices, z_mm, valid)
        prompt = torch.tensor(self.config["prompt_ids"], dtype=torch.long)[None].expand(calibrated.shape[0], -1)
        settings = copy.deepcopy(self.generation_config)
        unknown = settings.update(**overrides)
        if unknown:
            raise RunnerError(f"generate: unknown generation settings {sorted(unknown)}")
        with self.visual_context(calibrated):
            # input_ids ride along with the embeddings: the repetition penalty and the n-gram ban see
            # the whole history, prompt included, as the JAX sampler's does.
            out = self.model.generate(input_ids=prompt, inputs_embeds=self._embeds(prompt, calibrated),
                                      attention_mask=torch.ones_like(prompt), generation_config=settings)
        return out[:, prompt.shape[1]:]

    def generate_reports(self, slices, z_mm, valid=None, **overrides) -> list[str]:
        """One report per volume: the generated tokens up to the first eos, decoded."""
        tokens = self.generate(slices, z_mm, valid, **overrides).numpy()
        eos = set(self.config["eos_token_ids"])
        texts = []
        for row in tokens:
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts


def load(export_dir: str, use_adapter: bool = False, dtype: torch.dtype = torch.float32) -> Runner:
    """OUT/llm (or OUT/base + the PEFT adapter OUT/adapter) and OUT/bridge, in eval mode."""
    import transformers

    llm = os.path.join(export_dir, "base" if use_adapter else "llm")
    if not os.path.isfile(os.path.join(llm, "config.json")):
        raise RunnerError(f"{llm}: no config.json; " + ("export with --with_base to use the adapter"
                                                         if use_adapter else "pass the folder the export wrote"))
    model = transformers.LlamaForCausalLM.from_pretrained(llm, use_safetensors=True, dtype=dtype)
    if use_adapter:
        import peft
        adapter = os.path.join(export_dir, "adapter")
        if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
            raise RunnerError(f"{adapter}: no adapter_model.safetensors (only safetensors adapters are loaded)")
        model = peft.PeftModel.from_pretrained(  # safe-load: adapter_model.safetensors checked to exist above
            model, adapter).get_base_model()
    bridge, config = load_bridge(os.path.join(export_dir, "bridge"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm)
    generation = transformers.GenerationConfig.from_pretrained(os.path.join(export_dir, "llm"))
    return Runner(model.eval(), bridge, config, tokenizer, generation)


# ----------------------------------------------------------------------------- CLI


def _load_npy(flag: str, path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)          # plain arrays only: never unpickle a user file
    except (OSError, ValueError) as e:
        raise RunnerError(f"--{flag}={path}: cannot read it ({str(e).splitlines()[0]})") from None


def read_inputs(slices_file: str, z_file: str | None) -> tuple[np.ndarray, np.ndarray]:
    """FILE.npy [N, d_v] or [B, N, d_v]; z in mm [N] or [B, N] (default: slice index, 1 mm apart)."""
    slices = _load_npy("slices", slices_file)
    z = _load_npy("z_mm", z_file) if z_file else None
    slices = slices[None] if slices.ndim == 2 else slices
    if slices.ndim != 3:
        raise RunnerError(f"--slices={slices_file}: shape {slices.shape}; want [N, d_v] or [B, N, d_v]")
    z = np.broadcast_to(np.arange(slices.shape[1], dtype=np.float32), slices.shape[:2]) if z is None else z
    z = z[None] if z.ndim == 1 else z
    if z.shape != slices.shape[:2]:
        raise RunnerError(f"--z_mm={z_file}: shape {z.shape}; want the slices' [B, N] = {slices.shape[:2]}")
    return slices.astype(np.float32), z.astype(np.float32)


def main(argv: list[str]) -> None:
    import argparse

    from kervljepa_jax import cli as cli_lib

    parser = argparse.ArgumentParser(prog="torch_runner", description="A report from an export, in PyTorch.")
    parser.add_argument("--export", required=True, help="The folder python -m kervljepa_jax.export wrote.")
    parser.add_argument("--slices", required=True, help=".npy slice embeddings [N, d_v] or [B, N, d_v].")
    parser.add_argument("--z_mm", default=None, help=".npy slice positions in mm [N] or [B, N] (default 1 mm apart).")
    parser.add_argument("--use_adapter", action="store_true", help="OUT/base + the PEFT adapter instead of OUT/llm.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: generation_config.json's (384).")
    args = parser.parse_args(argv)
    try:
        slices, z = read_inputs(args.slices, args.z_mm)
        d = read_config(os.path.join(args.export, "bridge"))["compressor"]["d_visual"]
        if slices.shape[-1] != d:
            raise RunnerError(f"--slices={args.slices}: width {slices.shape[-1]}, the export's compressor takes {d}")
        runner = load(args.export, args.use_adapter)
        torch.manual_seed(args.seed)
        overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        for report in runner.generate_reports(slices, z, **overrides):
            print(report)
    except RunnerError as e:
        cli_lib.fail("torch_runner", str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
