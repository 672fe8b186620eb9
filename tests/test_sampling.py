"""Sampling rules against transformers' own logits processors, on the same logits and histories."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kervljepa_jax import sampling
from kervljepa_jax.sampling import SamplingConfig

RNG = np.random.default_rng(0)


def _hf(processor, history_row, logits_row):
    """Run one HF processor on a single row (its valid history only)."""
    out = processor(torch.tensor(np.asarray(history_row)[None], dtype=torch.long),
                    torch.tensor(np.asarray(logits_row)[None], dtype=torch.float32))
    return out[0].numpy()


def _assert_same(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def _histories(batch, max_len, small_vocab, lengths):
    """Token buffers with garbage past each row's length (which must be ignored)."""
    history = RNG.integers(0, small_vocab, size=(batch, max_len))
    for b, n in enumerate(lengths):
        history[b, n:] = RNG.integers(0, 1000, size=max_len - n) % small_vocab  # any ids, to be ignored
    return history


def test_config_defaults_are_the_papers():
    cfg = SamplingConfig()
    assert (cfg.temperature, cfg.top_p, cfg.repetition_penalty, cfg.no_repeat_ngram_size,
            cfg.do_sample, cfg.max_new_tokens) == (0.6, 0.9, 1.15, 5, True, 384)
    assert hash(cfg) == hash(SamplingConfig())
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_temperature_matches_hf():
    logits = RNG.normal(size=(3, 40)).astype(np.float32)
    ours = sampling.temperature(jnp.asarray(logits), 0.6)
    ref = TemperatureLogitsWarper(0.6)(None, torch.tensor(logits)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)


@pytest.mark.parametrize("penalty", [1.15, 0.7])
def test_repetition_penalty_matches_hf_per_row_lengths(penalty):
    batch, max_len, vocab = 4, 24, 30
    lengths = [24, 10, 1, 17]
    logits = RNG.normal(scale=3.0, size=(batch, vocab)).astype(np.float32)
    history = _histories(batch, max_len, vocab, lengths)
    ours = sampling.repetition_penalty(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(lengths), penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for b, n in enumerate(lengths):
        _assert_same(ours[b], _hf(hf, history[b, :n], logits[b]))
    # The same thing with a [B, L] mask instead of lengths.
    mask = np.arange(max_len)[None] < np.asarray(lengths)[:, None]
    ours_mask = sampling.repetition_penalty(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(mask), penalty)
    np.testing.assert_array_equal(np.asarray(ours_mask), np.asarray(ours))


def test_repetition_penalty_ignores_ids_beyond_vocab():
    logits = jnp.asarray(RNG.normal(size=(1, 8)), jnp.float32)
    history = jnp.array([[3, 9, 12]])
    ours = sampling.repetition_penalty(logits, history, jnp.array([3]), 1.3)
    ref = _hf(RepetitionPenaltyLogitsProcessor(1.3), np.array([3, 9, 12]), np.asarray(logits[0]))
    _assert_same(ours[0], ref)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_no_repeat_ngram_matches_hf(n):
    batch, max_len, vocab = 6, 40, 12
    small = 2 if n >= 4 else 4  # small id range: many repeated n-grams
    lengths = [40, 25, n - 1, n, 33, 2]
    logits = RNG.normal(size=(batch, vocab)).astype(np.float32)
    history = _histories(batch, max_len, small, lengths)
    ours = sampling.no_repeat_ngram(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(lengths), n)
    hf = NoRepeatNGramLogitsProcessor(n)
    n_banned = 0
    for b, length in enumerate(lengths):
        ref = _hf(hf, history[b, :length], logits[b])
        _assert_same(ours[b], ref)
        n_banned += int(np.isneginf(ref).sum())
    assert n_banned > 0  # the test exercises bans, not only pass-through


def test_no_repeat_ngram_paper_size_on_a_repeating_phrase():
    phrase = [5, 6, 7, 8, 9]
    history = np.array([phrase + [1, 2] + phrase[:4] + [0] * 5])  # last 4 tokens repeat the phrase's start
    logits = np.zeros((1, 12), np.float32)
    out = np.asarray(sampling.no_repeat_ngram(jnp.asarray(logits), jnp.asarray(history), jnp.array([11]), 5))
    assert np.isneginf(out[0, 9]) and np.isfinite(np.delete(out[0], 9)).all()


@pytest.mark.parametrize("p", [0.9, 0.5, 0.05, 0.999])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_matches_hf(p, min_keep):
    logits = RNG.normal(scale=2.5, size=(8, 64)).astype(np.float32)
    logits[0, :5] = -np.inf  # already banned tokens stay out
    ours = sampling.top_p(jnp.asarray(logits), p, min_tokens_to_keep=min_keep)
    ref = TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, torch.tensor(logits)).numpy()
    _assert_same(ours, ref)


@pytest.mark.parametrize("scale", [0.5, 8.0])   # flat and peaked rows
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_top_p_large_vocab_matches_hf(scale, p):
    logits = RNG.normal(scale=scale, size=(8, 4096)).astype(np.float32)
    logits[1, :100] = -np.inf
    ours = sampling.top_p(jnp.asarray(logits), p)
    ref = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
    _assert_same(ours, ref)


def test_top_p_ties_and_peaked_rows_match_hf():
    logits = np.array([[1.0, 1.0, 1.0, 1.0],            # uniform: cum 0.25, 0.5, 0.75, 1
                       [0.0, 2.0, 2.0, 0.0],            # ties straddling the cut
                       [30.0, 0.0, 0.0, 0.0],           # one token holds all the mass
                       [0.5, 0.5, 0.5, 3.0]], np.float32)
    for p in [0.5, 0.75, 0.9]:
        ours = sampling.top_p(jnp.asarray(logits), p)
        ref = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        _assert_same(ours, ref)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_hf(k):
    logits = RNG.normal(size=(4, 40)).astype(np.float32)
    logits[1, :6] = 2.0  # ties at the boundary
    ours = sampling.top_k(jnp.asarray(logits), k)
    ref = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
    _assert_same(ours, ref)


def _hf_chain(cfg):
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if not cfg.greedy:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(do_sample=False),
                                 SamplingConfig(temperature=0.0), SamplingConfig(top_k=8, no_repeat_ngram_size=2)])
def test_process_logits_matches_hf_chain(cfg):
    batch, max_len, vocab = 3, 30, 50
    lengths = [30, 12, 20]
    logits = RNG.normal(scale=2.0, size=(batch, vocab)).astype(np.float32)
    history = _histories(batch, max_len, 6, lengths)
    ours = jax.jit(sampling.process_logits, static_argnums=3)(
        jnp.asarray(logits), jnp.asarray(history), jnp.asarray(lengths), cfg)
    for b, n in enumerate(lengths):
        ref = _hf_chain(cfg)(torch.tensor(history[b:b + 1, :n]), torch.tensor(logits[b:b + 1]))[0].numpy()
        _assert_same(ours[b], ref)


def test_sample_greedy_and_nucleus():
    logits = jnp.asarray(RNG.normal(size=(4, 20)), jnp.float32)
    greedy = sampling.sample(jax.random.key(0), logits, SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), -1))
    cfg = SamplingConfig(top_p=0.5)
    processed = sampling.process_logits(logits, jnp.zeros((4, 1), jnp.int32), jnp.zeros(4, jnp.int32), cfg)
    draws = jax.jit(jax.vmap(lambda k: sampling.sample(k, processed, cfg)))(jax.random.split(jax.random.key(1), 200))
    allowed = np.isfinite(np.asarray(processed))
    assert all(allowed[b, t] for row in np.asarray(draws) for b, t in enumerate(row))
    assert len(np.unique(np.asarray(draws)[:, 0])) > 1  # it really samples


# ----------------------------------------------------------------------------- inside while_loop


def _toy_model(table, last_token):
    """A deterministic stand-in for the LM: next-token logits from the last token only."""
    return table[last_token]


@functools.partial(jax.jit, static_argnames=("cfg", "n_new"))
def _generate(table, prompt, prompt_len, rng, cfg, n_new):
    batch, prompt_max = prompt.shape
    buffer = jnp.zeros((batch, prompt_max + n_new), jnp.int32).at[:, :prompt_max].set(prompt)

    def body(state):
        step, history, length, key = state
        key, sub = jax.random.split(key)
        last = jnp.take_along_axis(history, (length - 1)[:, None], axis=1)[:, 0]
        logits = sampling.process_logits(_toy_model(table, last), history, length, cfg)
        token = sampling.sample(sub, logits, cfg)
        history = history.at[jnp.arange(batch), length].set(token)
        return step + 1, history, length + 1, key

    _, history, length, _ = jax.lax.while_loop(lambda s: s[0] < n_new, body,
                                               (0, buffer, prompt_len, rng))
    return history, length


def test_greedy_generation_in_while_loop_matches_hf_loop():
    vocab, n_new = 16, 24
    table = RNG.normal(scale=3.0, size=(vocab, vocab)).astype(np.float32)
    table[np.arange(vocab), (np.arange(vocab) + 1) % 3] += 8.0  # strong loops for the rules to break
    prompts = [[1, 2, 3, 4, 5], [7, 7, 2]]
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.15, no_repeat_ngram_size=3)
    prompt = np.zeros((2, 5), np.int32)
    for b, p in enumerate(prompts):
        prompt[b, :len(p)] = p
    history, length = _generate(jnp.asarray(table), jnp.asarray(prompt), jnp.array([5, 3]),
                                jax.random.key(0), cfg, n_new)
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        procs = _hf_chain(cfg)
        for _ in range(n_new):
            scores = torch.tensor(table[ids[0, -1].item()])[None]
            nxt = procs(ids, scores).argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        got = np.asarray(history[b, :int(length[b])])
        np.testing.assert_array_equal(got, ids[0].numpy())


def test_sampled_generation_in_while_loop_matches_eager_steps():
    vocab, n_new = 16, 12
    table = jnp.asarray(RNG.normal(scale=2.0, size=(vocab, vocab)), jnp.float32)
    cfg = SamplingConfig(no_repeat_ngram_size=2)
    prompt = jnp.array([[3, 4, 5, 6]], jnp.int32)
    rng = jax.random.key(7)
    history, length = _generate(table, prompt, jnp.array([4]), rng, cfg, n_new)
    # Replay the loop step by step in Python with the same keys (fixed buffer: one compile).
    step = jax.jit(lambda key, hist, n, last: sampling.sample(
        key, sampling.process_logits(table[last][None], hist, n, cfg), cfg))
    ids, key = [3, 4, 5, 6], rng
    for _ in range(n_new):
        key, sub = jax.random.split(key)
        hist = jnp.asarray([ids + [0] * (4 + n_new - len(ids))], jnp.int32)
        ids.append(int(step(sub, hist, jnp.array([len(ids)]), ids[-1])[0]))
    np.testing.assert_array_equal(np.asarray(history[0, :int(length[0])]), ids)
    # no 2-gram repeats anywhere in the output
    bigrams = list(zip(ids, ids[1:]))
    assert len(bigrams) == len(set(bigrams))


# ----------------------------------------------------------------------------- the decode loop's fast path


def _hf_top_p_kept(logits, p):
    return np.isfinite(TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy())


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_in_top_p_is_hfs_nucleus_ties_included(p):
    logits = np.concatenate([
        np.array([[1.0] * 8, [0.0, 2.0, 2.0, 0.0, 1.0, 1.0, 2.0, -1.0], [30.0] + [0.0] * 7,
                  [-np.inf, 0.5, 0.5, 0.5, 3.0, -np.inf, 0.5, 0.5]], np.float32),
        RNG.normal(scale=2.0, size=(4, 8)).astype(np.float32)])
    x = jnp.asarray(logits)
    every = jnp.broadcast_to(jnp.arange(8), logits.shape)
    ours = sampling.in_top_p(x, jax.nn.softmax(x, -1), every, p)
    np.testing.assert_array_equal(np.asarray(ours) & np.isfinite(logits), _hf_top_p_kept(logits, p))
    big = RNG.normal(scale=1.0, size=(2, 4096)).astype(np.float32)   # a flat row: ~all of the vocab
    xb = jnp.asarray(big)
    ours = sampling.in_top_p(xb, jax.nn.softmax(xb, -1), jnp.broadcast_to(jnp.arange(4096), big.shape), p)
    np.testing.assert_array_equal(np.asarray(ours), _hf_top_p_kept(big, p))


def test_inverse_cdf_is_searchsorted_and_skips_zero_weights():
    vocab = 50                                           # not a square: a padded last block
    weights = RNG.random((3, vocab)).astype(np.float32)
    weights[0, 20:] = 0.0                                # mass ends early: u near 1 must not land past it
    weights[1, ::2] = 0.0
    u = np.concatenate([RNG.random((3, 200)), np.full((3, 1), 1 - 2**-24), np.zeros((3, 1))], 1).astype(np.float32)
    ours = np.asarray(sampling.inverse_cdf(jnp.asarray(weights), jnp.asarray(u)))
    for b in range(3):
        cum = np.cumsum(weights[b].astype(np.float64))
        ref = np.minimum(np.searchsorted(cum, u[b] * cum[-1], side="right"), vocab - 1)
        close = np.abs(u[b] * cum[-1] - cum[np.minimum(ref, vocab - 1)]) < 1e-5   # float ties at a boundary
        np.testing.assert_array_equal(ours[b][~close], ref[~close])
    assert (np.take_along_axis(weights, ours[:, :-1], 1) > 0).all()


def _draws(fn, n, *args):
    keys = jax.random.split(jax.random.key(11), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: fn(k, *args)))(keys))   # [n, B]


def _assert_frequencies(draws, probs):
    """Empirical frequencies of draws [n, B] within 5 sigma of probs [B, V]; never a zero-prob id."""
    n = draws.shape[0]
    for b in range(probs.shape[0]):
        freq = np.bincount(draws[:, b], minlength=probs.shape[1]) / n
        assert (freq[probs[b] == 0] == 0).all()
        sigma = np.sqrt(probs[b] * (1 - probs[b]) / n) + 1e-4
        assert (np.abs(freq - probs[b]) < 5 * sigma).all(), (b, freq, probs[b])


@pytest.mark.parametrize("p,tries", [(0.9, 4), (0.3, 1), (1.0, 2)])  # tries=1, p=0.3: the fallback runs often
def test_sample_top_p_draws_hfs_nucleus_distribution(p, tries):
    logits = np.stack([RNG.normal(scale=0.3, size=12), RNG.normal(scale=3.0, size=12),
                       np.r_[np.full(6, -np.inf), RNG.normal(size=6)]]).astype(np.float32)
    ref = torch.softmax(TopPLogitsWarper(p)(None, torch.tensor(logits)), -1).numpy()
    draws = _draws(lambda k, x: sampling.sample_top_p(k, x, p, tries), 10000, jnp.asarray(logits))
    _assert_frequencies(draws, ref)


@pytest.mark.parametrize("cfg", [SamplingConfig(no_repeat_ngram_size=2), SamplingConfig(top_k=5, top_p=0.8)])
def test_next_token_draws_hfs_chain_distribution(cfg):
    batch, max_len, vocab = 2, 20, 16
    lengths = [20, 9]
    logits = RNG.normal(scale=1.5, size=(batch, vocab)).astype(np.float32)
    history = _histories(batch, max_len, 5, lengths)
    ref = np.concatenate([torch.softmax(_hf_chain(cfg)(torch.tensor(history[b:b + 1, :n]),
                                                       torch.tensor(logits[b:b + 1])), -1).numpy()
                          for b, n in enumerate(lengths)])
    draws = _draws(lambda k, x, h, n: sampling.next_token(k, x, h, n, cfg), 10000,
                   jnp.asarray(logits), jnp.asarray(history), jnp.asarray(lengths))
    _assert_frequencies(draws, ref)
    greedy = SamplingConfig(do_sample=False)
    ours = sampling.next_token(None, jnp.asarray(logits), jnp.asarray(history), jnp.asarray(lengths), greedy)
    ref_greedy = [int(_hf_chain(greedy)(torch.tensor(history[b:b + 1, :n]), torch.tensor(logits[b:b + 1])).argmax())
                  for b, n in enumerate(lengths)]
    np.testing.assert_array_equal(np.asarray(ours), ref_greedy)


def test_incremental_seen_set_equals_hfs_repetition_penalty_over_a_decode():
    batch, prompt_len, steps, vocab = 3, 6, 30, 20
    history = np.zeros((batch, prompt_len + steps), np.int64)
    history[:, :prompt_len] = RNG.integers(0, vocab, (batch, prompt_len))
    lengths = np.array([6, 2, 4])                                # left-aligned prompts of different lengths
    history[1, 2:prompt_len] = history[2, 4:prompt_len] = 0
    seen = sampling.seen_tokens(jnp.asarray(history), jnp.asarray(lengths), vocab)
    hf = RepetitionPenaltyLogitsProcessor(1.15)
    mark = jax.jit(sampling.mark_seen)
    for step in range(steps):
        logits = RNG.normal(scale=2.0, size=(batch, vocab)).astype(np.float32)
        ours = sampling.penalise_seen(jnp.asarray(logits), seen, 1.15)
        for b in range(batch):
            _assert_same(ours[b], _hf(hf, history[b, :lengths[b]], logits[b]))
        token = RNG.integers(0, vocab // 2, batch)                # repeats: the set grows slowly
        active = np.array([True, step % 3 != 0, step < 10])      # rows that skip steps / stop (eos)
        seen = mark(seen, jnp.asarray(token), jnp.asarray(active))
        for b in np.flatnonzero(active):
            history[b, lengths[b]] = token[b]
        lengths = lengths + active
