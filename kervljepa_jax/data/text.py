"""Report text building and the Llama-3 chat template with visual placeholders.

Three texts per volume:
- positive-findings-only (phases 2-3): for each positive class, the report sentences that
  assert it (the rule labeler's lexicon, `findings.sentence_findings`) or the class's fallback
  sentence; classes in a per-sample random order; a normal volume gets `findings.NORMAL_SENTENCE`.
- raw narrative (phase 4): Findings_EN verbatim.
- per-condition texts (MMD / InfoNCE targets): one segment per positive class, "" otherwise.
The chat sequence puts exactly `num_visual_tokens` `<|visual_region|>` placeholders in the user
turn; the loss mask covers the response tokens and the closing `<|eot_id|>` only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kervljepa_jax import findings
from kervljepa_jax.data import records

VISUAL_TOKEN = "<|visual_region|>"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
TEXT_MODES = ("positive_findings", "raw")

SYSTEM_PROMPT = "You are a thoracic radiologist. Describe what the chest CT volume shows."
INSTRUCTION = "Write the findings section of the report for this chest CT."


def class_segments(report: str, labels: Sequence[int]) -> dict[int, list[str]]:
    """{class index: sentences of `report` asserting it (or its fallback)} for the positive classes."""
    positive = findings.indices_from_labels(labels)
    segments: dict[int, list[str]] = {c: [] for c in sorted(positive)}
    if positive:
        for sentence in findings.split_sentences(report):
            for c in findings.sentence_findings(sentence) & positive:
                segments[c].append(sentence)
    for c, sentences in segments.items():
        if not sentences:
            sentences.append(findings.FINDINGS[c].fallback_sentence)
    return segments


def positive_findings_text(report: str, labels: Sequence[int], rng: np.random.Generator) -> str:
    """Positive-class segments in a random class order; a sentence shared by classes appears once."""
    segments = class_segments(report, labels)
    if not segments:
        return findings.NORMAL_SENTENCE
    order = rng.permutation(sorted(segments))
    out: list[str] = []
    for c in order:
        out.extend(s for s in segments[int(c)] if s not in out)
    return " ".join(out)


def condition_texts(report: str, labels: Sequence[int]) -> list[str]:
    """[C] per-condition texts: the class's segment when positive, "" when absent."""
    segments = class_segments(report, labels)
    return [" ".join(segments[c]) if c in segments else "" for c in range(findings.NUM_CLASSES)]


def response_text(report: str, labels: Sequence[int], mode: str, rng: np.random.Generator) -> str:
    if mode == "positive_findings":
        return positive_findings_text(report, labels, rng)
    if mode == "raw":
        return report
    raise records.DataError(f"data.text_mode={mode!r}: use one of {TEXT_MODES}")


def chat_prompt(num_visual_tokens: int, system: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION) -> str:
    """The prompt up to and including the assistant header (what generation starts from)."""
    return (f"{BOS}{START_HEADER}system{END_HEADER}\n\n{system}{EOT}"
            f"{START_HEADER}user{END_HEADER}\n\n{VISUAL_TOKEN * num_visual_tokens}\n{instruction}{EOT}"
            f"{START_HEADER}assistant{END_HEADER}\n\n")


def chat_text(response: str, num_visual_tokens: int, **prompt_kwargs) -> str:
    """The full training conversation as one string (for reading; ids come from `encode_chat`)."""
    return chat_prompt(num_visual_tokens, **prompt_kwargs) + response + EOT


def check_visual_placeholders(ids: np.ndarray, visual_id: int, num_visual_tokens: int, what: str) -> None:
    count = int(np.sum(np.asarray(ids) == visual_id))
    if count != num_visual_tokens:
        raise records.DataError(f"{what}: {count} {VISUAL_TOKEN} placeholders, expected exactly "
                                f"{num_visual_tokens} (data.num_visual_tokens); fix the chat template/tokenizer")


def encode_prompt(tokenizer, num_visual_tokens: int) -> np.ndarray:
    """[P] int32 prompt ids for generation, checked to hold exactly `num_visual_tokens` placeholders."""
    ids = np.asarray(tokenizer.encode(chat_prompt(num_visual_tokens), add_special_tokens=False), np.int32)
    check_visual_placeholders(ids, tokenizer.convert_tokens_to_ids(VISUAL_TOKEN), num_visual_tokens, "prompt")
    return ids


def encode_chat(tokenizer, prompt_ids: np.ndarray, response: str, max_tokens: int,
                pad_id: int, eot_id: int) -> tuple[dict[str, np.ndarray], bool]:
    """Prompt + response + <|eot_id|>, right-padded to max_tokens.

    Returns ({input_ids, loss_mask, attention_mask: [T]}, truncated). A response that does not
    fit is cut (and then has no closing <|eot_id|>); the caller counts those.
    """
    room = max_tokens - len(prompt_ids)
    if room < 2:
        raise records.DataError(f"data.max_tokens={max_tokens} leaves no room for a response after the "
                                f"{len(prompt_ids)}-token prompt; raise max_tokens")
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [eot_id]
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    n = len(prompt_ids) + len(response_ids)
    input_ids = np.full(max_tokens, pad_id, np.int32)
    input_ids[: len(prompt_ids)] = prompt_ids
    input_ids[len(prompt_ids): n] = response_ids
    loss_mask = np.zeros(max_tokens, bool)
    loss_mask[len(prompt_ids): n] = True
    attention_mask = np.zeros(max_tokens, bool)
    attention_mask[:n] = True
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}, truncated


def encode_padded(tokenizer, text: str, max_len: int, pad_id: int) -> tuple[np.ndarray, int, bool]:
    """A plain text (no template) as [max_len] ids, its length and whether it was cut."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    truncated = len(ids) > max_len
    ids = ids[:max_len]
    out = np.full(max_len, pad_id, np.int32)
    out[: len(ids)] = ids
    return out, len(ids), truncated
