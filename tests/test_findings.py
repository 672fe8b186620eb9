"""The 18 CT-RATE classes: names/order, per-class data, and the negation-aware lexicon.

All report text here is written for these tests (never taken from the licensed CT-RATE file).
"""

import itertools
import random
import re

import pytest

from kervljepa_jax import findings as F

CT_RATE_ORDER = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
IDX = {name: i for i, name in enumerate(CT_RATE_ORDER)}


def _all_fillings(template):
    """Every combination of slot fillers for a template (they are few)."""
    slots = re.findall(r"\{(\w+)\}", template)
    for combo in itertools.product(*(F.SLOT_FILLERS[s] for s in slots)):
        text = template
        for slot, filler in zip(slots, combo):
            text = text.replace("{" + slot + "}", filler, 1)
        yield text[0].upper() + text[1:]


def test_class_names_and_order_are_ct_rate():
    assert F.CLASS_NAMES == CT_RATE_ORDER
    assert F.NUM_CLASSES == 18 == len(F.FINDINGS)
    assert [f.name for f in F.FINDINGS] == list(CT_RATE_ORDER)
    assert [f.index for f in F.FINDINGS] == list(range(18))


def test_per_class_data_is_well_formed():
    for f in F.FINDINGS:
        lo, hi = f.z_range
        assert 0.0 <= lo < hi <= 1.0, f.name
        assert 0.0 < f.prevalence < 0.6, f.name
        assert len(f.positive_sentences) >= 4 and len(f.negative_sentences) >= 2, f.name
        assert f.patterns or f.weak_patterns, f.name
        assert f.anchors and all(a == a.lower() for a in f.anchors), f.name
    assert 0.3 <= F.NORMAL_FRACTION <= 0.45


def test_anatomical_z_ranges_follow_the_chest():
    z = {f.name: f.z_range for f in F.FINDINGS}
    assert z["Hiatal hernia"][0] >= 0.6            # at the diaphragm, low in the volume
    assert z["Emphysema"][1] <= 0.6                # upper-lobe predominant
    assert z["Pleural effusion"][0] >= 0.5         # dependent, basal
    lo, hi = z["Cardiomegaly"]
    assert 0.3 <= lo and hi <= 0.9                 # mid-lower chest


def test_co_occurrence_pairs_and_matrix():
    seen = set()
    for i, j, lift in F.CO_OCCURRENCE:
        assert 0 <= i < 18 and 0 <= j < 18 and i != j and lift > 1.0
        assert frozenset((i, j)) not in seen
        seen.add(frozenset((i, j)))
    pairs = {frozenset((i, j)) for i, j, _ in F.CO_OCCURRENCE}
    for a, b in [("Coronary artery wall calcification", "Arterial wall calcification"),
                 ("Atelectasis", "Pleural effusion"), ("Consolidation", "Lung opacity")]:
        assert frozenset((IDX[a], IDX[b])) in pairs
    matrix = F.co_occurrence_matrix()
    assert all(matrix[i][j] == matrix[j][i] for i in range(18) for j in range(18))
    assert all(matrix[i][i] == 1.0 for i in range(18))


@pytest.mark.parametrize("finding", F.FINDINGS, ids=lambda f: f.name)
def test_positive_sentences_assert_their_class_with_every_filler(finding):
    for template in finding.positive_sentences:
        assert set(re.findall(r"\{(\w+)\}", template)) <= set(F.SLOT_FILLERS), template
        for sentence in _all_fillings(template):
            assert finding.index in F.sentence_findings(sentence), sentence


@pytest.mark.parametrize("finding", F.FINDINGS, ids=lambda f: f.name)
def test_negative_sentences_assert_nothing_but_mention_their_class(finding):
    for sentence in finding.negative_sentences:
        assert F.sentence_findings(sentence) == frozenset(), sentence
        assert finding.index in F.sentence_mentions(sentence), sentence


@pytest.mark.parametrize("finding", F.FINDINGS, ids=lambda f: f.name)
def test_fallback_sentence_asserts_exactly_its_class(finding):
    assert F.sentence_findings(finding.fallback_sentence) == {finding.index}


def test_normal_sentence_asserts_nothing():
    assert F.sentence_findings(F.NORMAL_SENTENCE) == frozenset()


def test_fill_slots_leaves_no_slot_and_capitalises_a_leading_one():
    rng = random.Random(0)
    for f in F.FINDINGS:
        for template in f.positive_sentences:
            text = F.fill_slots(template, rng)
            assert "{" not in text and "}" not in text
            assert text[0].isupper()


# Sentence -> classes asserted. Negation, scope, hedges and the CT-RATE labelling conventions
# this labeler follows (documented in kervljepa_jax/findings.py).
CASES = [
    # plain negation and its scope
    ("No pleural effusion.", set()),
    ("Minimal bilateral pleural effusion.", {"Pleural effusion"}),
    ("No pleural or pericardial effusion was detected.", set()),
    ("Pleural and pericardial effusion are present.", {"Pleural effusion", "Pericardial effusion"}),
    ("Pericardial effusion was not observed.", set()),
    ("There is no nodule, but linear atelectasis is seen in the left lower lobe.", {"Atelectasis"}),
    ("The heart is not enlarged.", set()),
    ("Heart size is normal and the cardiothoracic ratio is increased.", {"Cardiomegaly"}),
    ("There is no evidence of hiatal hernia.", set()),
    ("Emphysema is absent.", set()),
    ("The previously described pleural effusion has resolved.", set()),
    # "not seen before" dates a finding, it does not negate it
    ("A 5 mm nodule that was not seen in the previous examination is present in the right upper lobe.",
     {"Lung nodule"}),
    # uncertainty: positive-leaning hedges count, negative-leaning ones and "?" differentials do not
    ("Findings suspicious for consolidation in the left lower lobe.", {"Consolidation"}),
    ("Ground-glass opacities, probably infectious, in both lower lobes.", {"Lung opacity"}),
    ("Consolidation is unlikely.", set()),
    ("A soft tissue density at the right hilum (lymph node?).", set()),
    ("A small consolidation area? in the lingula.", set()),
    ("Consolidation (pneumonia?) in the left lower lobe.", {"Consolidation"}),
    ("An infectious consolidation is less likely.", set()),
    # CT-RATE conventions
    ("A few lymph nodes that do not reach pathological size are seen in the mediastinum.",
     {"Lymphadenopathy"}),
    ("No pathologically enlarged lymph node was detected.", set()),
    ("A 6 mm nodule is seen in the left lobe of the thyroid gland.", set()),
    ("Nodular ground-glass opacities in both lungs.", {"Lung opacity"}),
    ("Fibroatelectatic bands in the lingula.", {"Pulmonary fibrotic sequela"}),
    ("Calcified plaques in the aortic arch and the coronary arteries.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}),
    ("Coronary artery calcification is present.", {"Coronary artery wall calcification"}),
    ("Calcification of the aortic valve leaflets.", set()),
    ("Subcutaneous emphysema in the left chest wall after the operation.", set()),
    ("Increased density in the perirenal fat planes.", set()),
    ("A patchy density increase in the right lower lobe.", {"Lung opacity"}),
    ("A linear density increase in the lingula, consistent with subsegmental atelectasis.",
     {"Lung opacity", "Atelectasis"}),
    ("Linear density increases in the right upper lobe, consistent with sequelae.",
     {"Pulmonary fibrotic sequela"}),
    ("A small amount of fluid around the spleen.", set()),
    ("Bilateral effusion with adjacent compressive atelectasis.", {"Pleural effusion", "Atelectasis"}),
    ("A port catheter ends at the cavoatrial junction.", {"Medical material"}),
    ("This is consistent with the reported history.", set()),
    # a negation after a mention reaches back only over its own phrase
    ("Atelectasis is observed in the left lower lobe and pleural effusion was not detected.", {"Atelectasis"}),
    ("Linear atelectasis in the right lower lobe, pleural effusion is not seen.", {"Atelectasis"}),
    ("Lymph nodes of pathological size and appearance were not detected.", set()),
    ("Pleural or pericardial effusion was not detected.", set()),
    ("Pericardial effusion - none.", set()),
    ("Consolidation: none.", set()),
    ("Mosaic attenuation: none.", set()),
    ("Pleural effusion - no significant change since the last study.", {"Pleural effusion"}),
    ("Lungs: bilateral pleural effusion.", {"Pleural effusion"}),
    # limitations and "cannot be excluded" (absent unless asserted elsewhere)
    ("A nodule cannot be excluded.", set()),
    ("Small nodules could not be evaluated reliably because of breathing artefacts.", set()),
    ("Malignancy cannot be ruled out in the consolidation.", {"Consolidation"}),
    ("The mediastinum could not be evaluated optimally and the cardiothoracic ratio is increased.",
     {"Cardiomegaly"}),
    # comparison with earlier studies
    ("There was no significant change in the right pleural effusion.", {"Pleural effusion"}),
    ("No increase in the size of the mediastinal lymph nodes.", {"Lymphadenopathy"}),
    ("No increase in density in either lung.", set()),
    ("No change in the mediastinum; no pleural effusion.", set()),
    ("No emphysematous change was observed.", set()),
    ("No fibrotic change was detected in either lung.", set()),
    ("A consolidation that was not present before is seen in the left lower lobe.", {"Consolidation"}),
    ("The ground-glass opacity seen in the right lower lobe has completely regressed.", set()),
    ("Ground-glass opacities and consolidation, observed in the previous examination, are no longer seen.",
     set()),
    ("Areas previously described as consolidation now appear as ground-glass opacity.", {"Lung opacity"}),
    # anatomy decides the class
    ("Fluid measuring 8 mm is seen in the deepest part of the pericardial space.", {"Pericardial effusion"}),
    ("An effusion 20 mm deep is present in the right hemithorax.", {"Pleural effusion"}),
    ("Thickening of the bronchial walls and of the interlobular septa in both lower lobes.",
     {"Interlobular septal thickening"}),
    ("Interstitial thickening in both lower lobes.", {"Interlobular septal thickening"}),
    ("Thickening of the peribronchial interstitium.", {"Peribronchial thickening"}),
    ("Lipomatous septal thickening of the interatrial septum.", set()),
    ("A hypodense nodule in hepatic segment 7.", set()),
    ("A 6 mm nodular density increase in the right upper lobe.", {"Lung opacity"}),
    ("Increased density in the anterior mediastinum, consistent with thymic remnant.", set()),
    ("A diaphragmatic hernia at the gastroesophageal junction.", {"Hiatal hernia"}),
    ("Calcified plaques in the arcus aorta.", {"Arterial wall calcification"}),
    ("Prominent interlobular septa in both lower lobes.", {"Interlobular septal thickening"}),
    ("Kerley B lines at both lung bases.", {"Interlobular septal thickening"}),
    ("Mild ectasia of the bronchi in both lower lobes.", {"Bronchiectasis"}),
    ("Subsegmental atelectasis in the left lower lobe.", {"Atelectasis"}),
    ("A 4 mm perifissural lymph node along the right major fissure.", {"Lung nodule"}),
    ("Dependant densities at both lung bases.", {"Lung opacity"}),
    ("Focal increased attenuation in the left lower lobe.", {"Lung opacity"}),
    ("A small paraesophageal hernia.", {"Hiatal hernia"}),
    ("Septal lines in the lower lobes.", {"Interlobular septal thickening"}),
    # what a recommended further study should look for is not a finding of this one
    ("Evaluation in terms of air trapping with expiratory sections is recommended.", set()),
    ("Follow-up is recommended for the 6 mm nodule in the right upper lobe.", {"Lung nodule"}),
    ("A consolidated old fracture of the right 6th rib.", set()),
]


@pytest.mark.parametrize("sentence,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_sentence_findings_cases(sentence, expected):
    assert F.sentence_findings(sentence) == {IDX[name] for name in expected}


def test_report_findings_is_the_union_over_sentences_and_keeps_scope_per_sentence():
    report = ("Trachea and both main bronchi are open. No pleural effusion. "
              "Subsegmental atelectasis in the right lower lobe.\n"
              "Mediastinal lymph nodes measuring up to 14 mm in short axis. No nodule was detected.")
    assert F.report_findings(report) == {IDX["Atelectasis"], IDX["Lymphadenopathy"]}
    assert F.report_findings("") == frozenset()


def test_split_sentences_keeps_decimals_and_splits_bullets_and_lines():
    text = "A 3.5 mm nodule. No mass.\nEffusion? Yes! \u2022 First point \u2022 second point"
    assert F.split_sentences(text) == ["A 3.5 mm nodule.", "No mass.", "Effusion?", "Yes!",
                                       "First point", "second point"]
    # a quotation closing after the period ends the sentence too (its negation stays inside)
    assert F.split_sentences('"No effusion." Atelectasis.') == ['"No effusion."', "Atelectasis."]
    assert F.report_findings('"No effusion." Atelectasis at the left base.') == {IDX["Atelectasis"]}


def test_split_clauses_at_contrastive_conjunctions_any_case():
    assert F.split_clauses("No effusion; atelectasis") == ["No effusion", " atelectasis"]
    assert len(F.split_clauses("No nodule But atelectasis")) == 2
    assert F.split_clauses("Atelectasis in both lungs.") == ["Atelectasis in both lungs."]


def test_sentence_mentions_include_negated_classes():
    assert F.sentence_mentions("No pleural effusion.") == {IDX["Pleural effusion"]}
    assert F.sentence_findings("No pleural effusion.") == frozenset()


def test_anchor_prefilter_loses_nothing():
    """The anchors only skip work: with or without them the same classes come out."""
    sentences = [s for f in F.FINDINGS for t in f.positive_sentences for s in _all_fillings(t)]
    sentences += [s for f in F.FINDINGS for s in f.negative_sentences + (f.fallback_sentence,)]
    sentences += [c[0] for c in CASES]
    for sentence in sentences:
        assert F.sentence_findings(sentence) == F.sentence_findings_exhaustive(sentence), sentence


def test_label_vector_round_trip_and_length_check():
    labels = F.labels_from_indices({2, 9})
    assert len(labels) == 18 and labels[2] == labels[9] == 1 and sum(labels) == 2
    assert F.indices_from_labels(labels) == {2, 9}
    with pytest.raises(ValueError, match="17 entries"):
        F.indices_from_labels([0] * 17)
