"""Tokenizers: the cached BPE for the embedded default, a local HF folder, embedding resizing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kervljepa_jax.data import default_data_config, records, synthetic, text
from kervljepa_jax.data import tokenizer as tokenizers

CORPUS = [synthetic.sample_volume_text(1, "train", i)["report"] for i in range(40)] + [text.chat_prompt(32)]
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>")


def one_id(tokenizer, token):
    ids = tokenizer.encode(token, add_special_tokens=False)
    assert len(ids) == 1, (token, ids)
    return ids[0]


def test_cached_bpe_trains_once_then_loads(tmp_path):
    calls = []

    def corpus():
        calls.append(1)
        return CORPUS
    first = tokenizers.cached_bpe(corpus, "key-a", 500, str(tmp_path))
    folder = tokenizers.cache_folder(str(tmp_path), 500, "key-a")
    assert os.path.isfile(os.path.join(folder, "tokenizer.json")) and folder.startswith(str(tmp_path))
    second = tokenizers.cached_bpe(corpus, "key-a", 500, str(tmp_path))
    assert len(calls) == 1                                  # the second call read the cache
    assert second.encode(CORPUS[0]) == first.encode(CORPUS[0]) and len(second) == len(first)
    tokenizers.cached_bpe(corpus, "key-b", 500, str(tmp_path))    # another corpus: another folder
    assert len(calls) == 2 and len(os.listdir(os.path.join(str(tmp_path), "tokenizers"))) == 2


def test_bpe_has_llama3_style_special_tokens(tmp_path):
    tok = tokenizers.cached_bpe(lambda: CORPUS, "k", 500, str(tmp_path))
    assert len(tok) <= 500
    ids = [one_id(tok, t) for t in tokenizers.BPE_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.pad_token == tokenizers.PAD
    special = tokenizers.special_ids(tok)
    assert special["visual"] == one_id(tok, text.VISUAL_TOKEN) and special["eot"] == one_id(tok, text.EOT)
    # Specials vanish from skip_special_tokens decoding; byte-level BPE round-trips any text.
    prompt = tok.encode(text.chat_prompt(32), add_special_tokens=False)
    assert text.VISUAL_TOKEN not in tok.decode(prompt, skip_special_tokens=True)
    odd = "Ünïcode 3.5 mm, tabs\tand  spaces."
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd
    with pytest.raises(records.DataError, match="tokenizer_vocab_size"):
        tokenizers.train_bpe(CORPUS, 100)


def test_build_tokenizer_uses_the_config(tmp_path):
    config = default_data_config()
    config.workdir, config.tokenizer_vocab_size = str(tmp_path), 400
    tok = tokenizers.build_tokenizer(config, lambda: CORPUS, "c")
    assert os.path.isdir(tokenizers.cache_folder(str(tmp_path), 400, "c")) and len(tok) <= 400
    with pytest.raises(records.DataError, match="no corpus"):
        tokenizers.build_tokenizer(config)
    config.tokenizer_path = str(tmp_path / "absent")
    with pytest.raises(records.DataError, match="tokenizer folder not found"):
        tokenizers.build_tokenizer(config)


def save_hf_folder(folder, specials=LLAMA_SPECIALS):
    """A small Llama-3-like HF tokenizer folder (no <|visual_region|>), saved as transformers does."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kwargs = {"bos_token": specials[0], "eos_token": specials[1]} if specials else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    hf.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def test_load_hf_adds_the_visual_token(tmp_path):
    before = save_hf_folder(tmp_path / "llama")
    assert text.VISUAL_TOKEN not in before.get_vocab()
    tok = tokenizers.load_hf(str(tmp_path / "llama"))
    assert len(tok) == len(before) + 1 == tokenizers.vocab_size(tok)
    visual = one_id(tok, text.VISUAL_TOKEN)
    assert visual == len(before)                            # appended after the existing ids
    sample = CORPUS[3]
    assert tok.encode(sample, add_special_tokens=False) == before.encode(sample, add_special_tokens=False)
    assert tok.pad_token == "<|finetune_right_pad_id|>"     # Llama 3's reserved pad, no new token
    ids = text.encode_prompt(tok, 32)
    assert int((ids == visual).sum()) == 32
    assert tokenizers.special_ids(tok)["eot"] == before.convert_tokens_to_ids("<|eot_id|>")


def test_load_hf_adds_every_missing_chat_token(tmp_path):
    before = save_hf_folder(tmp_path / "plain", specials=())
    tok = tokenizers.load_hf(str(tmp_path / "plain"))
    assert len(tok) == len(before) + len(tokenizers.TEMPLATE_TOKENS)
    for token in tokenizers.TEMPLATE_TOKENS:
        assert one_id(tok, token) >= len(before)
    assert tok.pad_token == text.EOS          # no pad token anywhere: end-of-text (masked anyway)
    assert tokenizers.special_ids(tok)["pad"] == one_id(tok, text.EOS)


def test_resize_embeddings_matches_the_tokenizer(tmp_path):
    save_hf_folder(tmp_path / "llama")
    base = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    tok = tokenizers.load_hf(str(tmp_path / "llama"))
    embed = jax.random.normal(jax.random.key(0), (len(base), 16), jnp.float32)
    resized = tokenizers.resize_embeddings(embed, tokenizers.vocab_size(tok), jax.random.key(1))
    assert resized.shape == (tokenizers.vocab_size(tok), 16)
    assert max(tok.get_vocab().values()) + 1 == resized.shape[0]   # every id has a row
    np.testing.assert_array_equal(resized[: len(base)], embed)
    np.testing.assert_allclose(resized[len(base):], np.broadcast_to(embed.mean(0), (1, 16)), rtol=1e-5, atol=1e-6)
    rows = jnp.take(resized, jnp.asarray(text.encode_prompt(tok, 32)), axis=0)
    assert rows.shape == (len(text.encode_prompt(tok, 32)), 16)


def test_resize_embeddings_noise_dtype_and_errors():
    embed = jax.random.normal(jax.random.key(0), (10, 8)).astype(jnp.bfloat16)
    assert tokenizers.resize_embeddings(embed, 10, jax.random.key(1)) is embed
    noisy = tokenizers.resize_embeddings(embed, 13, jax.random.key(1), noise_scale=0.1)
    assert noisy.dtype == jnp.bfloat16 and noisy.shape == (13, 8)
    new = np.asarray(noisy[10:], np.float32)
    assert not np.allclose(new[0], new[1])                  # ties broken
    np.testing.assert_allclose(new.mean(0), np.asarray(embed, np.float32).mean(0), atol=0.3)
    with pytest.raises(ValueError, match="shrinking"):
        tokenizers.resize_embeddings(embed, 9, jax.random.key(1))
