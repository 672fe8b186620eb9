"""Jitted generation over the KV cache: greedy == step-by-step argmax, eos/pad, left padding, HF rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kervljepa_jax import generate, sampling
from kervljepa_jax.model import llama
from kervljepa_jax.sampling import SamplingConfig

VOCAB = 64
GREEDY = SamplingConfig(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def lm():
    cfg = llama.tiny(vocab_size=VOCAB)
    model = llama.Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: 3 * x, params)  # sharper logits: fewer argmax near-ties
    return model, params


def reference_greedy(model, params, ids, mask, steps, penalty=1.0):
    """Step-by-step argmax of the full forward (no cache), HF repetition penalty optional.

    The sequence lives in a fixed [B, P + steps] buffer, right-padded: causal attention makes the
    padding invisible to the positions read, and the forward compiles once.
    """
    b, p = ids.shape
    seq = np.zeros((b, p + steps), np.int32)
    m = np.zeros((b, p + steps), np.int32)
    seq[:, :p], m[:, :p] = np.asarray(ids), np.asarray(mask)
    forward = jax.jit(lambda s, a: model.apply({"params": params}, s, attention_mask=a).logits)
    out = []
    for k in range(steps):
        logits = np.array(forward(seq, m)[:, p + k - 1])  # writable copy
        if penalty != 1.0:
            for row in range(b):
                seen = np.unique(seq[row][m[row].astype(bool)])
                logits[row, seen] = np.where(logits[row, seen] < 0, logits[row, seen] * penalty,
                                             logits[row, seen] / penalty)
        tok = logits.argmax(-1)
        out.append(tok)
        seq[:, p + k], m[:, p + k] = tok, 1
    return np.stack(out, 1)


def test_greedy_equals_stepwise_argmax_with_left_padding(lm):
    model, params = lm
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, VOCAB)
    mask = jnp.ones((3, 7), jnp.int32).at[1, :3].set(0)
    out = generate.generate_text(model, params, ids, mask, GREEDY)
    np.testing.assert_array_equal(np.asarray(out.tokens), reference_greedy(model, params, ids, mask, 10))
    assert np.asarray(out.lengths).tolist() == [10, 10, 10]


def test_repetition_penalty_in_the_loop_matches_reference(lm):
    model, params = lm
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, VOCAB)
    mask = jnp.ones((2, 6), jnp.int32).at[0, :2].set(0)
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=0, max_new_tokens=8)
    out = generate.generate_text(model, params, ids, mask, cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens), reference_greedy(model, params, ids, mask, 8, 1.5))


def test_eos_stops_a_row_and_pads_after(lm):
    model, params = lm
    ids = jax.random.randint(jax.random.key(3), (2, 5), 0, VOCAB)
    ref = reference_greedy(model, params, ids, jnp.ones_like(ids), 10)
    eos = int(ref[0, 2])
    out = generate.generate_text(model, params, ids, None, GREEDY, eos_ids=(eos,), pad_id=VOCAB - 1)
    tokens = np.asarray(out.tokens)
    first = int(np.argmax(ref[0] == eos))
    np.testing.assert_array_equal(tokens[0, :first + 1], ref[0, :first + 1])
    assert (tokens[0, first + 1:] == VOCAB - 1).all() and int(out.lengths[0]) == first + 1


def test_no_repeat_ngram_holds_in_generated_text(lm):
    model, params = lm
    ids = jnp.zeros((2, 4), jnp.int32)  # a degenerate prompt pushes the model to loop
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=2, max_new_tokens=24)
    out = np.asarray(generate.generate_text(model, params, ids, None, cfg).tokens)
    for row in np.concatenate([np.zeros((2, 4), int), out], 1):
        bigrams = list(zip(row[:-1], row[1:]))
        for t in range(3, len(bigrams)):          # each generated token's bigram is new (HF semantics:
            assert bigrams[t] not in bigrams[:t]   # the prompt may repeat itself, generation may not)
    assert len(set(map(tuple, out))) > 0 and (out != 0).any()


def test_sampling_is_seeded_and_varies_with_the_seed(lm):
    model, params = lm
    ids = jax.random.randint(jax.random.key(4), (4, 5), 0, VOCAB)
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12)
    gen = generate.Generator(generate.llama_decode_model(model), cfg)
    a = gen({"params": params}, ids, ids, None, jax.random.key(0)).tokens
    b = gen({"params": params}, ids, ids, None, jax.random.key(0)).tokens
    c = gen({"params": params}, ids, ids, None, jax.random.key(1)).tokens
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sampled_loop_equals_a_stepwise_replay_with_the_history_rebuilt_each_step(lm):
    """The loop keeps the repetition-penalty set incrementally (`mark_seen`) and draws with `next_token`;
    replaying the same keys on the full forward, with the set rebuilt from the history every step,
    gives the same tokens (left padding, penalty, n-gram ban and nucleus all active)."""
    model, params = lm
    ids = jax.random.randint(jax.random.key(6), (2, 6), 0, VOCAB)
    mask = jnp.ones((2, 6), jnp.int32).at[0, :2].set(0)
    steps = 10
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=2,
                         max_new_tokens=steps)
    out = generate.generate_text(model, params, ids, mask, cfg, rng=jax.random.key(3))
    b, p = ids.shape
    seq, m = np.zeros((b, p + steps), np.int32), np.zeros((b, p + steps), np.int32)
    seq[:, :p], m[:, :p] = np.asarray(ids), np.asarray(mask)
    forward = jax.jit(lambda s, a: model.apply({"params": params}, s, attention_mask=a).logits)
    draw = jax.jit(lambda key, logits, hist, n, u: sampling.next_token(key, logits, hist, n, cfg, uniforms=u))
    rng, draw_rng = jax.random.split(jax.random.key(3))       # the loop's draws: all steps' uniforms at once
    uniforms, ref = jax.random.uniform(draw_rng, (steps, b, sampling.TOP_P_TRIES)), []
    for k in range(steps):
        rng, key = jax.random.split(rng)
        hist = np.zeros((b, p + steps), np.int32)
        for row in range(b):
            real = seq[row][m[row].astype(bool)]
            hist[row, :len(real)] = real
        tok = np.asarray(draw(key, forward(seq, m)[:, p + k - 1], hist, m.sum(1), uniforms[k]))
        ref.append(tok)
        seq[:, p + k], m[:, p + k] = tok, 1
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(ref, 1))


def test_bad_prompt_shapes_are_one_line_errors(lm):
    model, params = lm
    with pytest.raises(ValueError, match=r"prompt_ids must be \[B, P\]"):
        generate.generate_text(model, params, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="prompt_mask"):
        generate.generate_text(model, params, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4)))


# ----------------------------------------------------------------------------- the VLM

from kervljepa_jax.model import lora as lora_lib  # noqa: E402
from kervljepa_jax.model import vlm as vlm_lib  # noqa: E402

VIS = 7
VCFG = vlm_lib.make_config("tiny", visual_token_id=VIS, d_visual=32, num_visual_tokens=4, vocab_size=VOCAB,
                           lora=lora_lib.LoraConfig(rank=2, alpha=4.0))


@pytest.fixture(scope="module")
def vlm():
    model = vlm_lib.VLM(VCFG)
    variables = vlm_lib.init(VCFG, jax.random.key(5))
    params = jax.tree.map(lambda x: 3 * x, variables["params"])
    params["xattn_1"]["gate"] = jnp.asarray(0.8)                 # the adapter matters in every step
    rng = np.random.default_rng(0)
    inputs = {"slices": jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32),
              "z_mm": jnp.tile(jnp.arange(9.0) * 2.0, (2, 1)), "valid": jnp.ones((2, 9), bool),
              "input_ids": jnp.asarray([[1, VIS, VIS, VIS, VIS, 3, 4]] * 2, jnp.int32)}
    return model, {**variables, "params": params}, inputs


def test_vlm_greedy_equals_stepwise_argmax_of_the_full_forward(vlm):
    model, variables, inputs = vlm
    steps = 8
    gen = generate.Generator(generate.vlm_decode_model(model), GREEDY.__class__(
        do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=steps))
    out = gen(variables, inputs, inputs["input_ids"])
    p = inputs["input_ids"].shape[1]
    seq = np.zeros((2, p + steps), np.int32)                    # right-padded buffer: one compilation
    mask = np.zeros((2, p + steps), bool)
    seq[:, :p], mask[:, :p] = np.asarray(inputs["input_ids"]), True
    forward = jax.jit(lambda s, m: model.apply(variables, inputs["slices"], inputs["z_mm"], inputs["valid"], s,
                                               m).logits)
    for k in range(steps):
        logits = np.array(forward(seq, mask)[:, p + k - 1])
        logits[:, VIS] = -np.inf                                  # decoding never emits the placeholder
        seq[:, p + k], mask[:, p + k] = logits.argmax(-1), True
    np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, -steps:])


def test_vlm_visual_ablations_change_what_is_generated(vlm):
    model, variables, inputs = vlm
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=6)
    two = {**inputs, "slices": inputs["slices"].at[1].set(-inputs["slices"][1])}  # two different volumes
    runs = {mode: np.asarray(generate.Generator(generate.vlm_decode_model(model, mode), cfg)(
        variables, two, two["input_ids"]).tokens) for mode in ("normal", "shuffle")}
    np.testing.assert_array_equal(runs["shuffle"][::-1], runs["normal"]) if not np.array_equal(
        runs["normal"][0], runs["normal"][1]) else None
    with pytest.raises(ValueError, match="visual_mode"):
        generate.vlm_decode_model(model, "blur")


def test_one_compiled_loop_serves_every_visual_mode(vlm):
    """The mode as an input (ReportGenerator's loop) generates what a loop compiled for that mode does."""
    model, variables, inputs = vlm
    cfg = SamplingConfig(max_new_tokens=6)                       # sampled: the noise and sampling keys matter
    two = {**inputs, "slices": inputs["slices"].at[1].set(-inputs["slices"][1]), "rng": jax.random.key(3)}
    shared = generate.Generator(generate.vlm_decode_model(model, None), cfg)
    for mode in vlm_lib.VISUAL_MODES:
        fixed = generate.Generator(generate.vlm_decode_model(model, mode), cfg)(
            variables, two, two["input_ids"], rng=jax.random.key(4))
        traced = shared(variables, {**two, "visual_mode": jnp.asarray(vlm_lib.visual_mode_index(mode), jnp.int32)},
                        two["input_ids"], rng=jax.random.key(4))
        np.testing.assert_array_equal(np.asarray(traced.tokens), np.asarray(fixed.tokens))
    assert shared._fn._cache_size() == 1
