"""Next-token logits rules for generation, with Hugging Face `generate` semantics, in static-shape jnp.

Everything here is batched ([B, V] logits), jittable and usable inside `jax.lax.while_loop`:
the token history is a fixed-size buffer `history [B, L]` whose first `length[b]` entries are
the row's tokens so far (prompt included, as in HF where `input_ids` is the whole sequence
for a decoder-only model); whatever lies past `length[b]` is ignored.

Order (HF `_get_logits_processor`): repetition_penalty, no_repeat_ngram (processors, also
applied when greedy), then temperature, top_k, top_p (warpers, only when sampling).
Paper IV-B: temperature 0.6, top_p 0.9, repetition_penalty 1.15, no_repeat_ngram_size 5,
max_new_tokens 384.

`process_logits` + `sample` spell the rules out one by one (each checked against transformers'
own processor); a decode loop calls `next_token`, the same distribution in a few passes over the
vocab: the repetition-penalty set kept incrementally (`seen_tokens`, `mark_seen`) and the nucleus
drawn by rejection (`sample_top_p`) instead of being located first with a full-vocab sort (`top_p`,
slow on CPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings (hashable: pass it as a static argument to jit).

    top_k: 0 = off. transformers < 5 silently applied top_k=50 under do_sample unless told
    otherwise; set top_k=50 to reproduce a run made that way. The paper names no top_k.
    """
    temperature: float = 0.6
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 5
    do_sample: bool = True
    max_new_tokens: int = 384
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingConfig.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"SamplingConfig.no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


def _valid_positions(history: Array, length_or_mask: Array) -> Array:
    """[B, L] bool: a [B, L] mask as given, or positions < length for a [B] length."""
    length_or_mask = jnp.asarray(length_or_mask)
    if length_or_mask.ndim == 2:
        return length_or_mask.astype(bool)
    return jnp.arange(history.shape[1])[None, :] < length_or_mask[:, None]


def _scatter_flags(token_ids: Array, flags: Array, vocab_size: int) -> Array:
    """[B, V] bool, True at every token id whose flag is set; unflagged ids go to a spare column."""
    batch = token_ids.shape[0]
    # Ids >= V cannot be generated (HF clamps them to the spare column too).
    target = jnp.where(flags, jnp.clip(token_ids, 0, vocab_size), vocab_size)
    rows = jnp.arange(batch)[:, None]
    marked = jnp.zeros((batch, vocab_size + 1), bool).at[rows, target].set(True)
    return marked[:, :vocab_size]


def temperature(logits: Array, t: float) -> Array:
    """logits / t (HF TemperatureLogitsWarper); t > 0."""
    return logits / t


def seen_tokens(history: Array, history_valid: Array, vocab_size: int) -> Array:
    """[B, V] bool: which ids occur in each row's valid history (the repetition penalty's set)."""
    return _scatter_flags(history, _valid_positions(history, history_valid), vocab_size)


def mark_seen(seen: Array, token: Array, active: Array) -> Array:
    """seen [B, V] with token [B] added where active [B]: one scatter per decode step instead of
    rebuilding the set from the whole history (ids >= V are dropped, as HF clamps them away)."""
    batch, vocab = seen.shape
    return seen.at[jnp.arange(batch), jnp.where(active, token, vocab)].set(True, mode="drop")


def penalise_seen(logits: Array, seen: Array, penalty: float) -> Array:
    """The repetition penalty given the seen set [B, V]: / penalty if positive, * penalty if not."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def repetition_penalty(logits: Array, history: Array, history_valid: Array, penalty: float) -> Array:
    """HF RepetitionPenaltyLogitsProcessor: every token present in the history (prompt included)
    has its logit divided by `penalty` if positive, multiplied if negative.

    logits [B, V]; history [B, L] token ids; history_valid: [B] current length or a [B, L] mask.
    """
    return penalise_seen(logits, seen_tokens(history, history_valid, logits.shape[-1]), penalty)


def no_repeat_ngram(logits: Array, history: Array, length: Array, n: int) -> Array:
    """HF NoRepeatNGramLogitsProcessor: ban (-inf) every token that would complete an n-gram
    already present in history[b, :length[b]].

    logits [B, V]; history [B, L] fixed-size buffer; length [B] current lengths; n static.
    The last n-1 tokens form the prefix; every window history[s : s+n] with s + n <= length
    whose first n-1 tokens equal the prefix bans its last token. O(L n) compares per step.
    """
    if n < 1:
        raise ValueError(f"no_repeat_ngram: n must be >= 1, got {n}")
    batch, max_len = history.shape
    n_windows = max_len - n + 1
    if n_windows < 1:
        return logits
    length = jnp.asarray(length)
    starts = jnp.arange(n_windows)
    matches = (starts[None, :] + n) <= length[:, None]  # window fully inside the history
    for j in range(n - 1):
        # prefix token j sits at length - n + 1 + j; clip keeps the gather in range when
        # length < n (then no window is valid anyway).
        prefix_j = jnp.take_along_axis(history, jnp.clip(length - n + 1 + j, 0, max_len - 1)[:, None], axis=1)
        matches &= history[:, j:j + n_windows] == prefix_j
    banned = _scatter_flags(history[:, n - 1:n - 1 + n_windows], matches, logits.shape[-1])
    return jnp.where(banned, NEG_INF, logits)


def top_k(logits: Array, k: int, min_tokens_to_keep: int = 1) -> Array:
    """HF TopKLogitsWarper: keep logits >= the k-th largest (ties at the boundary kept)."""
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p(logits: Array, p: float, min_tokens_to_keep: int = 1) -> Array:
    """HF TopPLogitsWarper (nucleus): -inf outside the smallest top set with probability > p.

    Exactly HF's rule: sort ascending (stable), cumulative softmax; remove a token when the
    cumulative mass up to and including it is <= 1 - p; always keep the top
    `min_tokens_to_keep`. Tied logits are ordered by index like torch's CPU sort. The one nucleus
    rule here: the decode loop does not call it per step (`sample_top_p` draws from the same
    nucleus by rejection), only in the rare step where every rejection try misses.
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1, stable=True)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - p)
    remove_sorted &= jnp.arange(vocab) < vocab - min_tokens_to_keep
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def process_logits(logits: Array, history: Array, length: Array, cfg: SamplingConfig,
                   seen: Array | None = None) -> Array:
    """All rules in HF's order: logits [B, V] (float32), history [B, L], length [B] -> [B, V].

    Processors (repetition penalty, no-repeat n-gram) always; warpers (temperature, top_k,
    top_p) only when sampling, as in HF where greedy search skips the warpers.
    `seen` [B, V] (optional): the history's token set, kept incrementally by a decode loop
    (`seen_tokens` then `mark_seen`); without it the set is rebuilt from the history.
    """
    logits = _processors(logits, history, length, cfg, seen)
    if cfg.greedy:
        return logits
    logits = _warpers_before_top_p(logits, cfg)
    if cfg.top_p < 1.0:
        logits = top_p(logits, cfg.top_p)
    return logits


def _processors(logits: Array, history: Array, length: Array, cfg: SamplingConfig, seen: Array | None) -> Array:
    logits = logits.astype(jnp.float32)  # HF casts next-token logits to float32 too
    if cfg.repetition_penalty != 1.0:
        if seen is None:
            seen = seen_tokens(history, length, logits.shape[-1])
        logits = penalise_seen(logits, seen, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        logits = no_repeat_ngram(logits, history, length, cfg.no_repeat_ngram_size)
    return logits


def _warpers_before_top_p(logits: Array, cfg: SamplingConfig) -> Array:
    if cfg.temperature != 1.0:
        logits = temperature(logits, cfg.temperature)
    if cfg.top_k > 0:
        logits = top_k(logits, cfg.top_k)
    return logits


def sample(rng: Array, logits: Array, cfg: SamplingConfig) -> Array:
    """Next tokens [B] (int32) from processed logits [B, V]: argmax when greedy
    (do_sample False or temperature 0), else a categorical draw."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def next_token(rng: Array, logits: Array, history: Array, length: Array, cfg: SamplingConfig,
               seen: Array | None = None, uniforms: Array | None = None) -> Array:
    """`sample(rng, process_logits(...))` in distribution, with far fewer passes over the vocab:
    the nucleus draw is `sample_top_p` (no sort, no threshold search). logits [B, V] -> [B] int32.
    `uniforms` [B, TOP_P_TRIES]: see `sample_top_p`."""
    logits = _processors(logits, history, length, cfg, seen)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_top_p(rng, _warpers_before_top_p(logits, cfg), cfg.top_p, uniforms=uniforms)


TOP_P_TRIES = 4  # candidates drawn per row in one pass before the exact fallback (P(fallback) <= (1-p)^4)


def sample_top_p(rng: Array, logits: Array, p: float, tries: int = TOP_P_TRIES,
                 uniforms: Array | None = None) -> Array:
    """One draw per row from softmax(top_p(logits, p)) without finding the nucleus first.

    Rejection sampling: draw candidates from the whole softmax (inverse CDF, one uniform each) and
    keep the first that lies in the nucleus (`in_top_p`). An accepted draw is distributed as the
    softmax restricted to the nucleus and renormalised, i.e. exactly HF's draw; each try succeeds
    with probability = nucleus mass >= p. A row whose `tries` candidates all miss draws from the
    exact `top_p` logits instead (`lax.cond`: computed only when some row needs it), which
    leaves the distribution unchanged. logits [B, V] (already processed/warped) -> [B] int32.
    `uniforms` [B, tries] in [0, 1), independent of everything else, replace the candidates' draws
    (a decode loop draws them for all steps at once: on CPU every threefry call inside the loop is
    a rolled loop of its own); `rng` then only feeds the fallback.
    """
    batch = logits.shape[0]
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    draw_key, fallback_key = jax.random.split(rng)
    if uniforms is None:
        uniforms = jax.random.uniform(draw_key, (batch, tries))
    cand = inverse_cdf(probs, uniforms)                                             # [B, T]
    ok = jnp.take_along_axis(probs, cand, axis=-1) > 0                              # never a banned id
    if p < 1.0:
        ok &= in_top_p(logits, probs, cand, p)
    token = jnp.take_along_axis(cand, jnp.argmax(ok, axis=-1)[:, None], axis=-1)[:, 0]
    accepted = jnp.any(ok, axis=-1)

    def fallback():
        nucleus = top_p(logits, p) if p < 1.0 else logits
        return jnp.where(accepted, token, jax.random.categorical(fallback_key, nucleus, axis=-1).astype(jnp.int32))

    return jax.lax.cond(jnp.all(accepted), lambda: token, fallback)


def in_top_p(logits: Array, probs: Array, cand: Array, p: float) -> Array:
    """[B, K] bool: is token cand[b, k] kept by HF's top_p(p)? logits/probs [B, V], cand [B, K].

    HF sorts ascending (stable, so among tied logits the lower id comes first) and keeps a token
    iff the cumulative mass up to and including it exceeds 1 - p, i.e. iff the mass of the tokens
    after it in that order (higher logit, or tied with a higher id) is < p. One pass over [B, K, V].
    """
    vocab = logits.shape[-1]
    cand_logit = jnp.take_along_axis(logits, cand, axis=-1)[..., None]               # [B, K, 1]
    ids = jnp.arange(vocab)
    after = (logits[:, None, :] > cand_logit) | ((logits[:, None, :] == cand_logit) & (ids > cand[..., None]))
    mass_after = jnp.sum(jnp.where(after, probs[:, None, :], 0.0), axis=-1)
    return mass_after < p


def inverse_cdf(weights: Array, u: Array) -> Array:
    """[B, K] ids drawn by inverse CDF: token i for u[b, k] * total in [cum[i-1], cum[i]).

    weights [B, V] >= 0 (need not sum to 1), u [B, K] in [0, 1). Two levels (blocks of ~sqrt(V)
    ids) so that every cumulative sum is short (XLA's CPU cumsum is quadratic in the length).
    Float rounding can land past the last positive weight: callers check the weight of the result.
    """
    batch, vocab = weights.shape
    size = max(1, math.isqrt(vocab - 1) + 1)
    n_blocks = -(-vocab // size)
    blocks = jnp.pad(weights, ((0, 0), (0, n_blocks * size - vocab))).reshape(batch, n_blocks, size)
    block_mass = blocks.sum(-1)                                                     # [B, nb]
    block_end = jnp.cumsum(block_mass, axis=-1)
    target = u * block_end[:, -1:]                                                  # [B, K]
    block = jnp.minimum(jnp.sum(block_end[:, None, :] <= target[..., None], -1), n_blocks - 1)
    before = jnp.take_along_axis(block_end - block_mass, block, axis=-1)             # [B, K]
    inner = jnp.take_along_axis(blocks, block[..., None], axis=1)                   # [B, K, S]
    inner_end = before[..., None] + jnp.cumsum(inner, axis=-1)
    pos = jnp.minimum(jnp.sum(inner_end <= target[..., None], -1), size - 1)
    return jnp.minimum(block * size + pos, vocab - 1).astype(jnp.int32)
