"""Pretraining a Llama-architecture decoder on text (the tiny stand-in's "phase 0"), and the corpus it
reads. Shared by the trainer (training/run.py: `model.stand_in=phase0`) and the packaged stand-in's
builder (stand_in.py), below both so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import linen as nn

from kervljepa_jax import hf, losses
from kervljepa_jax.data import pipeline as pipeline_lib
from kervljepa_jax.data import synthetic
from kervljepa_jax.data import text as text_lib
from kervljepa_jax.data import tokenizer as tokenizers
from kervljepa_jax.model import llama as llama_lib


class TrainError(ValueError):
    """A user mistake found by the trainer: one line, non-zero exit."""


def pretrain_llm(preset: str, tokenizer, texts: list[str], out: str, *, steps: int, lr: float, batch: int,
                 seq_len: int, seed: int, metric_log: Any = None) -> float:
    """LM-pretrain a fresh `preset` decoder on `texts` (whole documents packed into rows; reports as
    plain text, conversations in the chat template); save it and `tokenizer` as a HF folder in `out`.
    Returns the final LM loss."""
    cfg = llama_lib.preset(preset, vocab_size=tokenizers.vocab_size(tokenizer), lora=None)
    ids = tokenizers.special_ids(tokenizer)
    tokens, mask = pack_documents(text_lib.encode_texts(tokenizer, texts), ids["eot"], seq_len, pad=ids["pad"])
    model = llama_lib.Llama(cfg)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(params)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2)),
                                 0.9, 0.95, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch_tokens, batch_mask):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch_tokens, attention_mask=batch_mask).logits
            return losses.lm_loss(logits, batch_tokens, batch_mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    bar = tqdm.tqdm(range(steps), desc="phase 0 (base LLM)", disable=jax.process_index() != 0)
    loss = float("nan")
    for s in bar:
        idx = rng.integers(0, len(tokens), batch)
        params, opt_state, loss = train_step(params, opt_state, tokens[idx], mask[idx])
        if s % 20 == 0 or s == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
            if metric_log is not None:
                metric_log.write(0, s, {"loss": loss})
    hf.save_llama(cfg, params, out)
    tokenizer.save_pretrained(out)     # the folder is self-contained, like a HF Llama checkpoint
    logging.info("phase 0: base LLM (%d steps, final LM loss %.3f) saved to %s", steps, float(loss), out)
    return float(loss)


def pack_documents(docs: list[list[int]], eot: int, seq_len: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([M, seq_len] int32 ids, [M, seq_len] bool mask): whole documents, each followed by `eot`,
    packed greedily into rows that each start at a document; the rest of a row is padding.

    Rows start at documents, not at arbitrary offsets of one long stream: a conversation cut in two
    would train its answer without the prompt it answers. A document longer than a row is cut to the row.
    """
    rows, row = [], []
    for doc in docs:
        piece = [*doc, eot][:seq_len]
        if len(row) + len(piece) > seq_len:
            rows.append(row)
            row = []
        row += piece
    if row:
        rows.append(row)
    if not rows or not any(rows):
        raise TrainError("phase 0: the pretraining corpus is empty; pass --config.model.llm_path=HF_DIR "
                         "or give the data source training reports")
    ids = np.full((len(rows), seq_len), pad, np.int32)
    mask = np.zeros((len(rows), seq_len), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    return ids, mask


def pretraining_corpus(data, seed: int, extra_chats: int = 0) -> list[str]:
    """Phase-0 documents: every training report, and a conversation per volume whose prompt names its
    positive findings and whose answer is its positive-findings text (`text.findings_by_name_chat`);
    plus `extra_chats` such conversations about synthetic volumes outside both splits (text only).

    A real Llama already writes fluent radiology prose and follows its prompt; the tiny stand-in
    learns both here. Conversations that name the findings teach it to follow the prompt; the
    training split alone holds too few of them for a long phase 0, which then memorises them
    (docs/embedded_profile.md, "What the packaged stand-in buys").
    """
    if extra_chats > 0 and data.source != "synthetic":
        raise TrainError(f"model.pretrain_chats={extra_chats} draws synthetic conversations; with "
                         f"data.source={data.source} set it to 0 (or pass model.llm_path)")
    reports, labels = training_texts(data)
    rng = np.random.default_rng(seed)
    corpus = reports + [text_lib.findings_by_name_conversation(r, y, rng) for r, y in zip(reports, labels)]
    corpus += extra_findings_chats(data, extra_chats, rng)
    return [corpus[i] for i in rng.permutation(len(corpus))]   # mixed, for packing


def extra_findings_chats(data, count: int, rng: np.random.Generator) -> list[str]:
    """`count` findings-by-name conversations about synthetic volumes of the "pretrain" stream."""
    chats = []
    for i in range(count):
        volume = synthetic.sample_volume_text(int(data.seed), "pretrain", i)
        chats.append(text_lib.findings_by_name_conversation(volume["report"], np.asarray(volume["labels"]), rng))
    return chats


def training_texts(data) -> tuple[list[str], list[np.ndarray]]:
    """(Findings_EN, labels) of every training volume, without reading slices."""
    return pipeline_lib.make_source(data, "train").texts()
