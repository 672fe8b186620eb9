"""Tokenizers: a local HF folder (Llama 3.2 in real use) or a small BPE for the embedded default.

Either way the result is a `transformers.PreTrainedTokenizerFast` that knows the Llama-3 chat
tokens and `<|visual_region|>`. Adding tokens grows the vocabulary: `vocab_size(tokenizer)` is the
new size and `resize_embeddings` grows an embedding matrix to it (new rows at the old mean, as
HF's mean-resizing does, so a new token starts as an "average" token rather than noise).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Iterable

import jax
import jax.numpy as jnp
from absl import logging
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:   # transformers is imported where a tokenizer is built: it pulls in torch (~4 s), which a
    from transformers import PreTrainedTokenizerFast    # CLI that only checks its flags should not wait for

from kervljepa_jax.data import records
from kervljepa_jax.data.text import BOS, END_HEADER, EOS, EOT, START_HEADER, VISUAL_TOKEN

PAD = "<|pad|>"
TEMPLATE_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, VISUAL_TOKEN)
BPE_SPECIAL_TOKENS = (*TEMPLATE_TOKENS, PAD)
# Llama 3 has no pad token; its reserved right-pad token is used (pads are masked anyway).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", PAD, EOS)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Llama-3 style) trained on `texts`, with the chat special tokens."""
    if vocab_size < 300:
        raise records.DataError(f"data.tokenizer_vocab_size={vocab_size}: a byte-level BPE needs >= 300")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=[START_HEADER, END_HEADER, EOT, VISUAL_TOKEN])


def cache_folder(workdir: str, vocab_size: int, corpus_key: str) -> str:
    digest = hashlib.sha256(f"bpe-v1|{vocab_size}|{'|'.join(BPE_SPECIAL_TOKENS)}|{corpus_key}".encode())
    return os.path.join(workdir, "tokenizers", f"bpe{vocab_size}-{digest.hexdigest()[:16]}")


def cached_bpe(corpus: Callable[[], Iterable[str]], corpus_key: str, vocab_size: int,
               workdir: str) -> PreTrainedTokenizerFast:
    """Train once per (corpus_key, vocab size); later calls load the folder saved under workdir.

    `corpus` is only called when the cache misses; `corpus_key` must identify its content
    (the synthetic source's seed and size, or a CSV's path, size and mtime).
    """
    from transformers import PreTrainedTokenizerFast
    folder = cache_folder(workdir, vocab_size, corpus_key)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    texts = list(corpus())
    logging.info("tokenizer: training a %d-token byte-level BPE on %d texts -> %s", vocab_size, len(texts), folder)
    tokenizer = train_bpe(texts, vocab_size)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)     # atomic: concurrent processes never see half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)   # another process won the race
    return PreTrainedTokenizerFast.from_pretrained(folder)


def load_hf(path: str) -> PreTrainedTokenizerFast:
    """A local HF tokenizer folder with the chat tokens and <|visual_region|> added as needed."""
    if not os.path.isdir(path):
        raise records.DataError(f"{path}: tokenizer folder not found; set --config.data.tokenizer_path")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise records.DataError(f"{path}: {type(tokenizer).__name__} is not a fast tokenizer; "
                                "provide a folder with tokenizer.json")
    before = len(tokenizer)
    missing = [t for t in TEMPLATE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = next(t for t in _PAD_CANDIDATES if t in tokenizer.get_vocab())
    logging.info("tokenizer: %s, added %s, vocab %d -> %d", path, missing, before, len(tokenizer))
    return tokenizer


def vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Number of ids the embedding matrix must have (base vocab + added tokens)."""
    return len(tokenizer)


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos", BOS), ("eos", EOS), ("eot", EOT), ("visual", VISUAL_TOKEN),
            ("start_header", START_HEADER), ("end_header", END_HEADER))}
    ids["pad"] = tokenizer.pad_token_id
    for name, value in ids.items():
        if value is None or value == tokenizer.unk_token_id:
            raise records.DataError(f"tokenizer has no {name} token; use a Llama-3-style tokenizer")
    return ids


def resize_embeddings(embed: jax.Array, new_vocab: int, rng: jax.Array,
                      noise_scale: float = 0.0) -> jax.Array:
    """[V, D] -> [new_vocab, D]: old rows kept, new rows = mean of old rows (+ optional noise).

    noise_scale > 0 adds N(0, (noise_scale * per-dim std)^2) from `rng` to break ties between
    several new rows; 0 gives the exact mean.
    """
    old_vocab, dim = embed.shape
    if new_vocab < old_vocab:
        raise ValueError(f"resize_embeddings: new_vocab={new_vocab} < current {old_vocab}; shrinking would "
                         "drop trained token rows")
    if new_vocab == old_vocab:
        return embed
    mean = jnp.mean(embed.astype(jnp.float32), axis=0)
    new_rows = jnp.broadcast_to(mean, (new_vocab - old_vocab, dim))
    if noise_scale > 0:
        std = jnp.std(embed.astype(jnp.float32), axis=0)
        new_rows = new_rows + noise_scale * std * jax.random.normal(rng, new_rows.shape)
    return jnp.concatenate([embed, new_rows.astype(embed.dtype)], axis=0)


def build_tokenizer(config, corpus: Callable[[], Iterable[str]] | None = None,
                    corpus_key: str = "") -> PreTrainedTokenizerFast:
    """config.tokenizer_path if set, else the BPE cached under config.workdir trained on `corpus()`."""
    if config.tokenizer_path:
        return load_hf(config.tokenizer_path)
    if corpus is None:
        raise records.DataError("data.tokenizer_path is empty and no corpus was given to train the BPE")
    return cached_bpe(corpus, corpus_key, config.tokenizer_vocab_size, config.workdir)
