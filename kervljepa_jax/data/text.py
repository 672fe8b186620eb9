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


def ordered_sentences(segments: dict[int, list[str]], order: Sequence[int] | None = None) -> list[str]:
    """Sentences of the segments in the given class order (default: sorted), each once;
    [NORMAL_SENTENCE] for none."""
    if not segments:
        return [findings.NORMAL_SENTENCE]
    out: list[str] = []
    for c in (sorted(segments) if order is None else order):
        out.extend(s for s in segments[int(c)] if s not in out)
    return out


def positive_findings_from_segments(segments: dict[int, list[str]], rng: np.random.Generator | None) -> str:
    """Segments (from `class_segments`) in a random class order; a sentence shared by classes once.

    rng may be None when there is at most one class (nothing to order).
    """
    order = rng.permutation(sorted(segments)) if len(segments) > 1 else None
    return " ".join(ordered_sentences(segments, order))


def positive_findings_text(report: str, labels: Sequence[int], rng: np.random.Generator) -> str:
    """Positive-class segments in a random class order; a normal volume gets NORMAL_SENTENCE."""
    return positive_findings_from_segments(class_segments(report, labels), rng)


def condition_texts_from_segments(segments: dict[int, list[str]]) -> list[str]:
    return [" ".join(segments[c]) if c in segments else "" for c in range(findings.NUM_CLASSES)]


def condition_texts(report: str, labels: Sequence[int]) -> list[str]:
    """[C] per-condition texts: the class's segment when positive, "" when absent."""
    return condition_texts_from_segments(class_segments(report, labels))


def response_text(report: str, labels: Sequence[int], mode: str, rng: np.random.Generator) -> str:
    if mode == "positive_findings":
        return positive_findings_text(report, labels, rng)
    if mode == "raw":
        return report
    raise records.DataError(f"data.text_mode={mode!r}: use one of {TEXT_MODES}")


def chat_prompt(num_visual_tokens: int, system: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION,
                image: str | None = None) -> str:
    """The prompt up to and including the assistant header (what generation starts from).

    `image`: text in place of the K placeholders (the phase-0 stand-in LLM's findings-by-name prompt).
    """
    image = VISUAL_TOKEN * num_visual_tokens if image is None else image
    return (f"{BOS}{START_HEADER}system{END_HEADER}\n\n{system}{EOT}"
            f"{START_HEADER}user{END_HEADER}\n\n{image}\n{instruction}{EOT}"
            f"{START_HEADER}assistant{END_HEADER}\n\n")


def findings_by_name_prompt(labels: Sequence[int]) -> str:
    """The prompt of `findings_by_name_chat`, up to the assistant header (what generation starts from)."""
    names = [findings.CLASS_NAMES[c] for c in sorted(findings.indices_from_labels(labels))]
    return chat_prompt(0, image="Findings: " + (", ".join(names) + "." if names else "None."))


def findings_by_name_chat(labels: Sequence[int], response: str) -> str:
    """A conversation whose user turn names the positive classes (in CT-RATE order; "None." when
    normal) where the image would be, and whose answer is `response`.

    The phase-0 corpus of the tiny stand-in LLM: a pretrained, instruction-tuned Llama can already
    write a findings paragraph from its prompt; the tiny decoder learns that skill here, so that
    phase 3 has to teach only what the visual tokens say, not how to follow a prompt at all.
    """
    return findings_by_name_prompt(labels) + response + EOT


def findings_by_name_conversation(report: str, labels: Sequence[int], rng: np.random.Generator) -> str:
    """`findings_by_name_chat` answering with the volume's positive-findings text (random class order)."""
    return findings_by_name_chat(labels, positive_findings_text(report, labels, rng))


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


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain texts (no special tokens added), in one call to the Rust tokenizer.

    Same ids as `tokenizer.encode(t, add_special_tokens=False)` per text, without its per-call
    Python overhead (the loader encodes ~20 texts per volume).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]
    return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]


def sentence_token_table(tokenizer, sentences: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{sentence: (int32 ids when first, ids of " " + sentence)} such that joining them equals
    encoding the " "-joined text, checked on every ordered pair (first and middle positions);
    None when a join does not (that tokenizer merges across sentences: encode the joined text).

    Byte-level BPEs (GPT-2, Llama 3) pre-split before " word", so the check passes and a shuffled
    positive-findings text costs an array concatenation per epoch instead of a tokenizer call.
    """
    unique = list(dict.fromkeys(sentences))
    pairs = [(a, b) for a in unique for b in unique if a != b]
    k = len(unique)
    encoded = encode_texts(tokenizer, [*unique, *(" " + s for s in unique), *(f"{a} {b}" for a, b in pairs),
                                       *(f" {a} {b}" for a, b in pairs)])
    table = {s: (encoded[i], encoded[k + i]) for i, s in enumerate(unique)}
    for (a, b), first, middle in zip(pairs, encoded[2 * k: 2 * k + len(pairs)], encoded[2 * k + len(pairs):]):
        if table[a][0] + table[b][1] != first or table[a][1] + table[b][1] != middle:
            return None
    # int32 arrays: a cache of Python int lists would cost ~36 bytes per token.
    return {s: (np.asarray(first, np.int32), np.asarray(spaced, np.int32)) for s, (first, spaced) in table.items()}


def joined_ids(sentences: Sequence[str], table: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[L] int32 ids of " ".join(sentences) from a `sentence_token_table`."""
    return np.concatenate([table[sentences[0]][0], *(table[s][1] for s in sentences[1:])])


def chat_arrays(prompt_ids: np.ndarray, response_ids: Sequence[int] | np.ndarray, max_tokens: int,
                pad_id: int, eot_id: int) -> tuple[dict[str, np.ndarray], bool]:
    """Prompt + response ids + <|eot_id|>, right-padded to max_tokens.

    Returns ({input_ids, loss_mask, attention_mask: [T]}, truncated). A response that does not
    fit is cut (and then has no closing <|eot_id|>); the caller counts those.
    """
    p = len(prompt_ids)
    room = max_tokens - p
    if room < 2:
        raise records.DataError(f"data.max_tokens={max_tokens} leaves no room for a response after the "
                                f"{p}-token prompt; raise max_tokens")
    response = np.asarray(response_ids, np.int32)
    kept = min(len(response) + 1, room)              # + <|eot_id|>, when it fits
    body = min(len(response), kept)
    input_ids = np.full(max_tokens, pad_id, np.int32)
    input_ids[:p] = prompt_ids
    input_ids[p: p + body] = response[:body]
    if kept > body:
        input_ids[p + body] = eot_id
    n = p + kept
    loss_mask = np.zeros(max_tokens, bool)
    loss_mask[p:n] = True
    attention_mask = np.zeros(max_tokens, bool)
    attention_mask[:n] = True
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}, len(response) + 1 > room


def encode_chat(tokenizer, prompt_ids: np.ndarray, response: str, max_tokens: int,
                pad_id: int, eot_id: int) -> tuple[dict[str, np.ndarray], bool]:
    """`chat_arrays` of a response string."""
    return chat_arrays(prompt_ids, encode_texts(tokenizer, [response])[0], max_tokens, pad_id, eot_id)


def pad_ids(ids: Sequence[int], max_len: int, pad_id: int) -> tuple[np.ndarray, int, bool]:
    """Ids as [max_len] int32 (cut or right-padded), their kept length and whether they were cut."""
    truncated = len(ids) > max_len
    ids = ids[:max_len]
    out = np.full(max_len, pad_id, np.int32)
    out[: len(ids)] = ids
    return out, len(ids), truncated


def encode_padded(tokenizer, text: str, max_len: int, pad_id: int) -> tuple[np.ndarray, int, bool]:
    """A plain text (no template) as [max_len] ids, its length and whether it was cut."""
    return pad_ids(encode_texts(tokenizer, [text])[0] if text else [], max_len, pad_id)
