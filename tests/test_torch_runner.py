"""The PyTorch runner on an export of a tiny phase-4 workdir (tests/test_export.make_workdir): the
same V', V~ and full-model logits as the JAX VLM (f32, <= 1e-4), also through peft on the base,
the same greedy tokens as the JAX sampler, the adapters fire at every decode step, the CLI prints a
report and says what is wrong in one line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kervljepa_jax import export, generate, torch_runner
from kervljepa_jax.model import vlm as vlm_lib
from kervljepa_jax.sampling import SamplingConfig
from tests.test_export import BEST, shared_export, shared_workdir

B, N = 2, 13
NUM_VALID = (13, 5)          # 5 < K=8: empty zones widen to one slice


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, vcfg, saved = shared_workdir(tmp_path_factory)
    out = shared_export(tmp_path_factory)                    # float32, with base/, in shards
    return out, vcfg, saved[BEST], torch_runner.load(out)


def _inputs(d_visual: int):
    rng = np.random.default_rng(1)
    slices = rng.standard_normal((B, N, d_visual)).astype(np.float32)
    z = (np.cumsum(np.full((B, N), 2.5), 1) + 40.0).astype(np.float32)       # absolute table positions, mm
    valid = np.arange(N)[None] < np.array(NUM_VALID)[:, None]
    slices[~valid] = np.nan                                                  # padding must reach nothing
    return slices, z, valid


def _ids(runner, vocab: int) -> np.ndarray:
    prompt = np.asarray(runner.config["prompt_ids"])
    tail = np.random.default_rng(2).integers(10, vocab, (B, 6))
    return np.concatenate([np.broadcast_to(prompt, (B, len(prompt))), tail], axis=1)


def test_visual_tokens_and_logits_equal_the_jax_model(setup):
    out, vcfg, variables, runner = setup
    slices, z, valid = _inputs(vcfg.compressor.d_visual)
    ids = _ids(runner, vcfg.llm.vocab_size)
    want = vlm_lib.VLM(vcfg).apply(variables, jnp.asarray(slices), jnp.asarray(z), jnp.asarray(valid),
                                   jnp.asarray(ids), jnp.ones(ids.shape, bool))
    tokens, calibrated = runner.visual(slices, z, valid)
    np.testing.assert_allclose(tokens.numpy(), np.asarray(want.visual.tokens), atol=1e-4, rtol=0)
    np.testing.assert_allclose(calibrated.numpy(), np.asarray(want.visual.calibrated), atol=1e-4, rtol=0)
    logits = runner.logits(ids, slices, z, valid).numpy()
    np.testing.assert_allclose(logits, np.asarray(want.logits), atol=1e-4, rtol=0)
    # The visual path matters: text-only logits (adapters idle, placeholders as words) are far off.
    with torch.no_grad():
        text_only = runner.model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(text_only - logits).max() > 1e-2
    adapted = torch_runner.load(out, use_adapter=True)
    np.testing.assert_allclose(adapted.logits(ids, slices, z, valid).numpy(), np.asarray(want.logits), atol=1e-4,
                               rtol=0)


def test_greedy_generation_gives_the_jax_tokens_with_the_adapters_on_every_step(setup):
    _, vcfg, variables, runner = setup
    slices, z, valid = _inputs(vcfg.compressor.d_visual)
    steps = 12
    sampling = SamplingConfig(do_sample=False, max_new_tokens=steps)       # penalty and 5-gram ban stay on
    gen = generate.ReportGenerator(vlm_lib.VLM(vcfg), runner.tokenizer, sampling)
    want = gen.tokens(variables, jnp.asarray(slices), jnp.asarray(z), jnp.asarray(valid))
    want_tokens, lengths = np.asarray(want.tokens), np.asarray(want.lengths)
    calls = []
    hook = runner.model.model.layers[vcfg.llm.injection_layers[0]].register_forward_hook(
        lambda module, args, output: calls.append(1))
    try:
        got = runner.generate(slices, z, valid, do_sample=False, max_new_tokens=steps).numpy()
    finally:
        hook.remove()
    assert lengths.min() >= 3
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(got[row, :n], want_tokens[row, :n])
    assert len(calls) == got.shape[1]                   # one forward per new token: the prefill, then each step
    assert vcfg.visual_token_id not in got


def test_cli_prints_a_report_and_mistakes_are_one_line(setup, tmp_path, capsys):
    """main() in process (`python -m kervljepa_jax.torch_runner` calls it with sys.argv[1:])."""
    out, vcfg, _, _ = setup
    slices, z, _ = _inputs(vcfg.compressor.d_visual)
    np.save(tmp_path / "slices.npy", slices[0])
    np.save(tmp_path / "z.npy", z[0])
    np.save(tmp_path / "narrow.npy", slices[0, :, :4])
    torch_runner.main([f"--export={out}", f"--slices={tmp_path / 'slices.npy'}", f"--z_mm={tmp_path / 'z.npy'}",
                       "--max_new_tokens=8"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0]                    # one volume, one report
    cases = {(f"--slices={tmp_path / 'narrow.npy'}",): "width 4, the export's compressor takes 32",
             (f"--slices={tmp_path / 'missing.npy'}",): "--slices=",
             (f"--slices={tmp_path / 'slices.npy'}", f"--z_mm={tmp_path / 'narrow.npy'}"): "--z_mm="}
    for args, text in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            torch_runner.main([f"--export={out}", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("torch_runner: ") and text in err[0]


def test_a_bf16_export_runs_in_bf16_close_to_the_f32_jax_model(setup, tmp_path_factory):
    """--dtype=bf16 (the default) through the runner in bfloat16: the adapters run in f32 on bf16
    hidden states and the grafted tokens are cast to the embeddings' dtype; the logits stay within
    bf16 rounding of the f32 JAX model's and pick the same next token almost everywhere."""
    _, vcfg, variables, runner = setup
    workdir = shared_workdir(tmp_path_factory)[0]
    out = export.export(export.ExportOptions(workdir=workdir, out=str(tmp_path_factory.mktemp("bf16") / "out")))
    bf16 = torch_runner.load(out, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    slices, z, valid = _inputs(vcfg.compressor.d_visual)
    ids = _ids(runner, vcfg.llm.vocab_size)
    want = np.asarray(vlm_lib.VLM(vcfg).apply(variables, jnp.asarray(slices), jnp.asarray(z), jnp.asarray(valid),
                                              jnp.asarray(ids), jnp.ones(ids.shape, bool)).logits)
    got = bf16.logits(ids, slices, z, valid).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("gate", ["tanh", "none"])
def test_adapter_matches_the_jax_cross_attention_gated_or_not(gate):
    """torch_runner.GatedCrossAttention on the weights export._cross_attention writes: the JAX
    adapter's output, with Flamingo's tanh gate or ungated (model.xattn_gate="none", no gate weight)."""
    from kervljepa_jax.model import xattn as xattn_lib
    cfg = xattn_lib.CrossAttentionConfig(d_model=32, num_heads=4, head_dim=8, gate=gate, gate_init=0.7)
    rng = np.random.default_rng(3)
    h, visual = rng.standard_normal((2, 5, 32)).astype(np.float32), rng.standard_normal((2, 7, 32)).astype(np.float32)
    module = xattn_lib.GatedCrossAttention(cfg)
    params = nn.unbox(module.init(jax.random.key(0), jnp.asarray(h), jnp.asarray(visual)))["params"]
    want = np.asarray(module.apply({"params": params}, jnp.asarray(h), jnp.asarray(visual)))
    torch_module = torch_runner.GatedCrossAttention({"d_model": 32, "num_heads": 4, "head_dim": 8,
                                                      "layer_norm_eps": cfg.layer_norm_eps, "gate": gate})
    state = {k[len("a."):]: torch.from_numpy(v) for k, v in export._cross_attention("a", params).items()}
    torch_module.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = torch_module(torch.from_numpy(h), torch.from_numpy(visual)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert ("gate" in state) == (gate == "tanh") and np.abs(want - h).max() > 1e-2
