"""Report text building and the chat template: segments, modes, conditions, placeholders, loss mask."""

import itertools
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kervljepa_jax import findings
from kervljepa_jax.data import records, synthetic, text
from kervljepa_jax.data import tokenizer as tokenizers

NODULE, CARDIO, ATELECTASIS, EFFUSION, EMPHYSEMA = 9, 2, 8, 12, 7
NORMAL_A = "The trachea is midline with a smooth wall and a clear lumen."
NORMAL_B = "The pericardium is thin and smooth."
NODULE_SENTENCE = "A 6 mm nodule is seen in the right upper lobe."
CARDIO_SENTENCE = "The heart is enlarged."
BOTH_SENTENCE = "Passive atelectasis is present adjacent to the pleural fluid."   # asserts 8 and 12
NEGATED_EMPHYSEMA = findings.FINDINGS[EMPHYSEMA].negative_sentences[0]
REPORT = " ".join([NORMAL_A, NODULE_SENTENCE, NORMAL_B, CARDIO_SENTENCE, NEGATED_EMPHYSEMA])


def labels_of(*classes):
    return np.array(findings.labels_from_indices(classes), np.int32)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [synthetic.sample_volume_text(0, "train", i)["report"] for i in range(60)]
    return tokenizers.train_bpe(corpus + [text.chat_prompt(32), findings.NORMAL_SENTENCE], 600)


def test_sentences_used_here_are_what_the_lexicon_says():
    assert findings.sentence_findings(NODULE_SENTENCE) == {NODULE}
    assert findings.sentence_findings(CARDIO_SENTENCE) == {CARDIO}
    assert findings.sentence_findings(BOTH_SENTENCE) == {ATELECTASIS, EFFUSION}
    assert EMPHYSEMA in findings.sentence_mentions(NEGATED_EMPHYSEMA)
    assert not findings.sentence_findings(NEGATED_EMPHYSEMA)
    assert not findings.sentence_findings(NORMAL_A) and not findings.sentence_findings(NORMAL_B)


def test_class_segments_use_the_lexicon_and_fall_back():
    # Cardiomegaly and the nodule are in the report; the opacity (10) is labelled but not written.
    segments = text.class_segments(REPORT, labels_of(NODULE, CARDIO, 10))
    assert segments == {CARDIO: [CARDIO_SENTENCE], NODULE: [NODULE_SENTENCE],
                        10: [findings.FINDINGS[10].fallback_sentence]}
    # A class mentioned only in negation (emphysema) is not a segment even when labelled.
    assert text.class_segments(REPORT, labels_of(EMPHYSEMA)) == {
        EMPHYSEMA: [findings.FINDINGS[EMPHYSEMA].fallback_sentence]}


def test_positive_findings_text_keeps_only_positive_segments():
    out = text.positive_findings_text(REPORT, labels_of(NODULE, CARDIO), np.random.default_rng(0))
    assert sorted(findings.split_sentences(out)) == sorted([NODULE_SENTENCE, CARDIO_SENTENCE])
    for dropped in (NORMAL_A, NORMAL_B, NEGATED_EMPHYSEMA):
        assert dropped not in out


def test_positive_findings_order_is_shuffled_per_sample_and_reproducible():
    labels = labels_of(NODULE, CARDIO, 10)
    outs = [text.positive_findings_text(REPORT, labels, np.random.default_rng(s)) for s in range(40)]
    orders = {tuple(findings.split_sentences(o)) for o in outs}
    assert len(orders) == 6                                   # all 3! class orders occur
    again = [text.positive_findings_text(REPORT, labels, np.random.default_rng(s)) for s in range(40)]
    assert outs == again


def test_a_sentence_shared_by_two_classes_appears_once():
    report = f"{NORMAL_A} {BOTH_SENTENCE}"
    out = text.positive_findings_text(report, labels_of(ATELECTASIS, EFFUSION), np.random.default_rng(1))
    assert out == BOTH_SENTENCE


def test_normal_volume_gets_the_normal_sentence():
    out = text.positive_findings_text(REPORT, labels_of(), np.random.default_rng(0))
    assert out == findings.NORMAL_SENTENCE == "No significant thoracic abnormalities identified."


def test_raw_mode_is_the_report_verbatim_and_modes_are_checked():
    rng = np.random.default_rng(0)
    odd = "  Odd spacing,\nline breaks and ü stay.  "
    assert text.response_text(odd, labels_of(NODULE), "raw", rng) == odd
    assert text.response_text(REPORT, labels_of(CARDIO), "positive_findings", rng) == CARDIO_SENTENCE
    with pytest.raises(records.DataError, match="text_mode"):
        text.response_text(REPORT, labels_of(), "narrative", rng)


def test_condition_texts_one_per_class():
    conditions = text.condition_texts(REPORT, labels_of(NODULE, CARDIO, 10))
    assert len(conditions) == findings.NUM_CLASSES
    assert conditions[NODULE] == NODULE_SENTENCE and conditions[CARDIO] == CARDIO_SENTENCE
    assert conditions[10] == findings.FINDINGS[10].fallback_sentence
    assert all(c == "" for i, c in enumerate(conditions) if i not in (NODULE, CARDIO, 10))
    assert text.condition_texts(REPORT, labels_of()) == [""] * findings.NUM_CLASSES


def test_chat_prompt_is_llama3_with_32_placeholders():
    prompt = text.chat_prompt(32)
    assert prompt.count(text.VISUAL_TOKEN) == 32
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    user = prompt.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split(text.EOT)[0]
    assert user.count(text.VISUAL_TOKEN) == 32            # all placeholders in the user turn
    assert text.chat_text("Hi.", 32) == prompt + "Hi." + text.EOT


def test_encoded_prompt_has_exactly_32_placeholder_ids(tokenizer):
    ids = text.encode_prompt(tokenizer, 32)
    visual = tokenizer.convert_tokens_to_ids(text.VISUAL_TOKEN)
    assert ids.dtype == np.int32 and int((ids == visual).sum()) == 32
    assert tokenizer.decode(ids.tolist()) == text.chat_prompt(32)


def test_loss_mask_covers_assistant_tokens_only(tokenizer):
    ids = tokenizers.special_ids(tokenizer)
    prompt = text.encode_prompt(tokenizer, 32)
    response = f"{NODULE_SENTENCE} {CARDIO_SENTENCE}"
    out, cut = text.encode_chat(tokenizer, prompt, response, 160, ids["pad"], ids["eot"])
    p, n = len(prompt), int(out["attention_mask"].sum())
    assert not cut and all(v.shape == (160,) for v in out.values())
    np.testing.assert_array_equal(out["input_ids"][:p], prompt)
    assert not out["loss_mask"][:p].any() and not out["loss_mask"][n:].any() and out["loss_mask"][p:n].all()
    assert tokenizer.decode(out["input_ids"][out["loss_mask"]].tolist()) == response + text.EOT
    assert (out["input_ids"][n:] == ids["pad"]).all() and out["attention_mask"][:n].all()


def test_truncated_response_is_flagged_and_no_room_is_an_error(tokenizer):
    ids = tokenizers.special_ids(tokenizer)
    prompt = text.encode_prompt(tokenizer, 32)
    out, cut = text.encode_chat(tokenizer, prompt, REPORT * 4, len(prompt) + 5, ids["pad"], ids["eot"])
    assert cut and out["loss_mask"].sum() == 5 and out["attention_mask"].all()
    assert out["input_ids"][-1] != ids["eot"]
    with pytest.raises(records.DataError, match="max_tokens"):
        text.encode_chat(tokenizer, prompt, "x", len(prompt) + 1, ids["pad"], ids["eot"])


def test_encode_padded(tokenizer):
    pad = tokenizer.pad_token_id
    ids, n, cut = text.encode_padded(tokenizer, CARDIO_SENTENCE, 30, pad)
    assert not cut and 0 < n < 30 and (ids[n:] == pad).all()
    assert tokenizer.decode(ids[:n].tolist()) == CARDIO_SENTENCE
    ids, n, cut = text.encode_padded(tokenizer, REPORT, 4, pad)
    assert cut and n == 4 and ids.shape == (4,)
    ids, n, cut = text.encode_padded(tokenizer, "", 4, pad)
    assert n == 0 and not cut and (ids == pad).all()


def test_wrong_placeholder_count_is_a_one_line_error(tokenizer):
    visual = tokenizer.convert_tokens_to_ids(text.VISUAL_TOKEN)
    ids = text.encode_prompt(tokenizer, 32)
    text.check_visual_placeholders(ids, visual, 32, "prompt")          # the right count passes
    with pytest.raises(records.DataError) as info:
        text.check_visual_placeholders(ids[ids != visual][:10].tolist() + [visual] * 31, visual, 32, "volume v1")
    assert "\n" not in str(info.value) and "volume v1" in str(info.value) and "31" in str(info.value)
    # A tokenizer that splits <|visual_region|> into pieces yields no placeholder at all.
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator([REPORT, text.chat_prompt(32)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    plain = PreTrainedTokenizerFast(tokenizer_object=core)
    with pytest.raises(records.DataError, match=re.escape(f"0 {text.VISUAL_TOKEN} placeholders")):
        text.encode_prompt(plain, 32)


def test_sentence_ids_join_exactly_or_are_refused(tokenizer):
    sentences = [NODULE_SENTENCE, CARDIO_SENTENCE, BOTH_SENTENCE]
    table = text.sentence_token_table(tokenizer, sentences)
    assert table is not None                      # byte-level BPE: every join is clean
    for order in itertools.permutations(sentences):
        assert text.joined_ids(order, table).tolist() == tokenizer.encode(" ".join(order), add_special_tokens=False)
    assert text.encode_texts(tokenizer, sentences) == [tokenizer.encode(x, add_special_tokens=False)
                                                       for x in sentences]
    # A BPE without a pre-tokenizer merges across the ". " between sentences: no table.
    core = Tokenizer(models.BPE())
    core.train_from_iterator([synthetic.sample_volume_text(0, "train", i)["report"] for i in range(60)],
                             trainers.BpeTrainer(vocab_size=800, show_progress=False))
    assert text.sentence_token_table(PreTrainedTokenizerFast(tokenizer_object=core), sentences) is None


def test_ordered_sentences_dedups_in_class_order():
    segments = {ATELECTASIS: [BOTH_SENTENCE], EFFUSION: [BOTH_SENTENCE, "Extra."], NODULE: [NODULE_SENTENCE]}
    assert text.ordered_sentences(segments) == [BOTH_SENTENCE, NODULE_SENTENCE, "Extra."]
    assert text.ordered_sentences(segments, [NODULE, EFFUSION, ATELECTASIS]) == [NODULE_SENTENCE, BOTH_SENTENCE,
                                                                                 "Extra."]
    assert text.ordered_sentences({}) == [findings.NORMAL_SENTENCE]


def test_findings_by_name_chat_names_the_positive_classes_where_the_image_goes():
    labels = np.zeros(findings.NUM_CLASSES, int)
    labels[[9, 2]] = 1
    chat = text.findings_by_name_chat(labels, "A nodule. The heart is enlarged.")
    named = f"Findings: {findings.CLASS_NAMES[2]}, {findings.CLASS_NAMES[9]}."
    assert chat == text.chat_prompt(32).replace(text.VISUAL_TOKEN * 32, named) + \
        "A nodule. The heart is enlarged." + text.EOT
    assert "Findings: None." in text.findings_by_name_chat(np.zeros(findings.NUM_CLASSES, int), "x")
    assert chat.startswith(text.findings_by_name_prompt(labels))
    assert text.VISUAL_TOKEN not in chat


def test_findings_by_name_conversation_answers_with_the_positive_findings_text():
    labels = np.zeros(findings.NUM_CLASSES, int)
    labels[[2, 9]] = 1
    report = "The heart is enlarged. A 5 mm nodule is seen in the lingula. The trachea is patent."
    chat = text.findings_by_name_conversation(report, labels, np.random.default_rng(3))
    answer = text.positive_findings_text(report, labels, np.random.default_rng(3))
    assert chat == text.findings_by_name_chat(labels, answer)
    assert "nodule" in answer and "trachea" not in answer
