"""The 18 CT-RATE abnormality classes: names, order, lexicon and what a generator needs.

This module is the one home of the class names. Everything that needs a class (the rule
labeler, the positive-findings-only text builder, the synthetic CT-RATE generator, metrics
tables) reads it from here.

Per class it holds
- where on the apex (0.0) -> base (1.0) axis of a chest CT the finding shows (`z_range`),
- a CT-RATE-like prevalence and the common co-occurrences (`CO_OCCURRENCE`),
- report sentences that assert and negate it (our own prose, written for this project),
- the lexicon: regular expressions that find a mention of the class in a sentence.

`sentence_findings` turns one sentence into the set of classes it asserts present. It is
sentence- and clause-level and NegEx-like:
- a mention is negated by a cue before it in the same clause ("no", "without", "absence of",
  "free of", "neither/nor", "negative for", "not") unless a scope breaker ("but", "however",
  "although", "except", ...) stands between cue and mention, or by a cue after it
  ("... was not observed", "... are absent", "... has resolved");
- uncertainty: hedged mentions that still lean positive ("probable", "likely", "suspicious
  for", "consistent with", "compatible with", "suggestive of") count as PRESENT, as radiology
  labelling conventions (CheXpert's "uncertain -> positive" for report generation scoring)
  and the CT-RATE labels do; only hedges that lean negative ("unlikely", "cannot be
  excluded" with nothing else asserted, "to rule out") count as absent.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Iterable, Sequence

NUM_CLASSES = 18

CLASS_NAMES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

NORMAL_SENTENCE = "No significant thoracic abnormalities identified."

# Fraction of volumes with none of the 18 findings that the synthetic generator aims at
# (the paper: normal volumes are ~35-40% of the data).
NORMAL_FRACTION = 0.37

# Fillers for the {slot}s in `Finding.positive_sentences`; every filler keeps the sentence
# recognised by `sentence_findings` (tested).
SLOT_FILLERS: dict[str, tuple[str, ...]] = {
    "side": ("right", "left"),
    "sides": ("right", "left", "both"),
    "lobe": ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe",
             "lingula", "left lower lobe"),
    "size": ("3 mm", "4 mm", "5 mm", "6 mm", "8 mm", "11 mm"),
    "node_size": ("12 mm", "14 mm", "17 mm", "21 mm"),
    "degree": ("mild", "minimal", "moderate", "marked"),
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One CT-RATE class and everything the project knows about how it looks and reads.

    index: position in `CLASS_NAMES` (the label-vector column).
    z_range: (lo, hi) on the apex(0.0) -> base(1.0) axis where the finding typically shows.
    prevalence: marginal fraction of CT-RATE-like volumes that carry it.
    positive_sentences: report sentences asserting it; may hold {slot}s from `SLOT_FILLERS`.
    negative_sentences: report sentences negating it.
    fallback_sentence: the canonical sentence for a positive class whose report has no
        sentence mentioning it.
    patterns: the lexicon, regular expressions (case-insensitive) for an unambiguous mention.
    weak_patterns: mentions that need context: they count only when no veto is in the clause.
    vetoes: regular expressions that, found in the same clause, cancel a weak mention (a
        thyroid nodule is not a lung nodule, a density increase in the fat planes is no lung
        opacity).
    anchors: lower-case substrings one of which every match of the patterns contains; a
        sentence holding none is skipped without running the regular expressions (speed).
    """

    index: int
    name: str
    z_range: tuple[float, float]
    prevalence: float
    positive_sentences: tuple[str, ...]
    negative_sentences: tuple[str, ...]
    fallback_sentence: str
    patterns: tuple[str, ...] = ()
    weak_patterns: tuple[str, ...] = ()
    vetoes: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()


_CALCIFIC = r"(?:calcif\w*|atherom\w*|atheroscl\w*|calcified\s+plaques?)"
# Arteries whose calcified plaques count here (the aortic valve, and the coronary arteries,
# which are their own class, do not).
_NOT_CORONARY = r"(?<!coronary\s)(?<!pulmonary\s)(?<!descending\s)(?<!circumflex\s)"
_AORTIC_OR_ARTERIAL = (r"(?:aort(?:a|ic|as)\b(?!\s+valve)|arcus|carotid|subclavian|brachiocephalic|innominate|iliac|"
                       + _NOT_CORONARY + r"arter(?:y|ies|ial)|" + _NOT_CORONARY + r"vascular|vessels?|arch)")
_THICK = r"(?:thicken\w*|thickness\s+increas\w*|increase\w*\s+in\s+(?:the\s+)?thickness)"
_CORONARY = r"(?:coronar\w*|\bLAD\b|\bRCA\b|left\s+anterior\s+descending|circumflex|left\s+main)"

FINDINGS: tuple[Finding, ...] = (
    Finding(
        index=0, name="Medical material", z_range=(0.15, 0.75), prevalence=0.15,
        positive_sentences=(
            "A central venous catheter is seen with its tip in the superior vena cava.",
            "Sternotomy wires are present after previous cardiac surgery.",
            "A cardiac pacemaker with leads in the right heart chambers is noted.",
            "A stent is observed in the {side} main coronary artery.",
            "Surgical clips are noted in the mediastinum.",
            "A nasogastric tube is in place, ending in the stomach.",
        ),
        negative_sentences=(
            "No catheter, tube or other medical device is seen.",
            "There is no evidence of surgical material or implanted device.",
        ),
        fallback_sentence="Medical material is present in the thorax.",
        patterns=(
            r"medical\s+(?:material|device)", r"catheter", r"\bports?\b(?:\s+catheter)?",
            r"pacemaker", r"pacing\s+(?:leads?|wires?)", r"defibrillator", r"\bICD\b",
            r"\bstents?\b", r"\bstented", r"prosthe\w+", r"sternotomy", r"sternal\s+(?:wires?|sutures?)",
            r"(?:surgical|vascular|metallic)\s+clips?", r"\bclips?\b", r"cerclage",
            r"(?:endotracheal|tracheostomy|nasogastric|feeding|chest|thoracostomy)\s+tubes?",
            r"tracheostomy", r"\bdrains?\b", r"drainage\s+catheter", r"metallic\s+(?:material|implants?|"
            r"foreign\s+bod\w+|densit\w+|artifacts?|wires?|screws?|plates?)",
            r"(?:breast|cochlear|dental|orthopa?edic|metallic|cardiac)\s+implants?", r"implant(?:able|ed)\s+(?:device|cardiac|port|defibrillator)", r"\bcoils?\b", r"\bvalve\s+replacement", r"(?:mechanical|prosthetic)\s+valve",
            r"(?:surgical|suture)\s+material", r"staples?", r"\bwires?\b", r"\bscrews?\b",
            r"fixation\s+(?:material|plates?)", r"(?:internal\s+)?fixators?", r"cannul\w*", r"gastrostomy",
            r"\bPEG\b", r"sutures?(?:\s+lines?)?",
        ),
        anchors=('medical', 'material', 'cathet', 'port', 'pacemak', 'pacing', 'defib', 'icd', 'stent', 'prosthe', 'sternot', 'sternal', 'clip', 'cerclage', 'tube', 'tracheostom', 'drain', 'metal', 'implant', 'coil', 'valve', 'fixat', 'cannul', 'gastrostom', 'peg', 'sutur', 'staple', 'wire', 'screw'),
    ),
    Finding(
        index=1, name="Arterial wall calcification", z_range=(0.15, 0.7), prevalence=0.28,
        positive_sentences=(
            "Calcified atherosclerotic plaques are present in the wall of the thoracic aorta.",
            "Atheromatous calcifications are seen in the aortic arch.",
            "There are calcifications in the walls of the aorta and its major branches.",
            "{degree} calcific atherosclerosis of the descending aorta is noted.",
        ),
        negative_sentences=(
            "No calcification is seen in the aortic wall.",
            "The thoracic aorta shows no atherosclerotic calcification.",
        ),
        fallback_sentence="Arterial wall calcification is present.",
        patterns=(
            r"arterial\s+wall\s+calcif\w*",
            _CALCIFIC + r"[^.;]{0,80}?\b" + _AORTIC_OR_ARTERIAL,
            r"\b" + _AORTIC_OR_ARTERIAL + r"[^.;,]{0,50}?" + _CALCIFIC,
        ),
        anchors=('calcif', 'atherom', 'atheroscl'),
    ),
    Finding(
        index=2, name="Cardiomegaly", z_range=(0.4, 0.8), prevalence=0.11,
        positive_sentences=(
            "The heart is enlarged.",
            "Cardiomegaly is present.",
            "Heart size is increased, with a widened cardiothoracic ratio.",
            "There is {degree} cardiomegaly.",
        ),
        negative_sentences=(
            "Heart size is within normal limits, no cardiomegaly.",
            "The heart is not enlarged.",
        ),
        fallback_sentence="Cardiomegaly is present.",
        patterns=(
            r"cardiomegal\w*", r"cardiac\s+enlargement", r"enlarge\w*\s+(?:of\s+the\s+)?(?:heart|cardiac)",
            r"(?:heart|cardiac)\s+(?:size|contour|silhouette|dimension|shadow)s?(?:\s+and\s+\w+)?"
            r"\s+(?:\w+\s+){0,2}(?:increased|enlarged|large)",
            r"\bheart\s+(?:is|was|appears?)\s+(?:\w+\s+)?(?:enlarged|larger)",
            r"(?:increased|enlarged|large)\s+(?:heart|cardiac)\s+(?:size|contour|silhouette|dimensions?)",
            r"(?:increased|enlarged)\s+heart\b",
            r"(?:cardiothoracic\s+(?:ratio|index)|\bCTR\b)\s+(?:\w+\s+){0,3}(?:increas\w*|widened|above)",
            r"(?:increase\w*|widened)\s+(?:in\s+)?(?:the\s+)?(?:cardiothoracic\s+(?:ratio|index)|\bCTR\b|"
            r"heart\s+sizes?|cardiac\s+size)",
        ),
        anchors=('cardiomegal', 'enlarg', 'heart', 'cardiac', 'cardiothoracic', 'ctr'),
    ),
    Finding(
        index=3, name="Pericardial effusion", z_range=(0.45, 0.8), prevalence=0.08,
        positive_sentences=(
            "A pericardial effusion is present.",
            "There is {degree} pericardial effusion.",
            "Fluid is seen in the pericardial space, up to 9 mm thick.",
            "Pericardial fluid is noted anterior to the right ventricle.",
        ),
        negative_sentences=(
            "No pericardial effusion is seen.",
            "There is no fluid in the pericardial space.",
        ),
        fallback_sentence="Pericardial effusion is present.",
        patterns=(
            r"pericardial\s+(?:\w+[\s-]+){0,2}(?:effusion|fluid)",
            r"(?:effusion|fluid)\b[^.;]{0,80}?\b(?:in|within|at)\s+(?:the\s+)?(?:\w+\s+){0,2}pericardi(?:al|um)",
            # "... measuring 12 mm in the deepest part of the pericardial space/area"
            r"(?:effusion|fluid)\b[^.;]{0,120}?\b(?:of|in)\s+the\s+pericardial\s+(?:space|area|cavity|sac)",
            r"pericardial\s+(?:space|recess)\s+(?:contains|shows)\s+fluid",
            r"pericardial\s+and\s+pleural\s+effusion", r"hemopericardium",
        ),
        anchors=('pericard',),
    ),
    Finding(
        index=4, name="Coronary artery wall calcification", z_range=(0.45, 0.75), prevalence=0.22,
        positive_sentences=(
            "Calcified plaques are seen in the coronary arteries.",
            "There is coronary artery calcification.",
            "Calcification is noted along the left anterior descending coronary artery.",
            "{degree} calcific atherosclerosis of the coronary arteries is present.",
        ),
        negative_sentences=(
            "No coronary artery calcification is seen.",
            "The coronary arteries show no calcified plaque.",
        ),
        fallback_sentence="Coronary artery wall calcification is present.",
        patterns=(
            _CALCIFIC + r"[^.;]{0,120}?" + _CORONARY,
            _CORONARY + r"[^.;]{0,60}?" + _CALCIFIC,
        ),
        anchors=('calcif', 'atherom', 'atheroscl'),
    ),
    Finding(
        index=5, name="Hiatal hernia", z_range=(0.75, 1.0), prevalence=0.16,
        positive_sentences=(
            "A hiatal hernia is present.",
            "There is a small sliding hiatal hernia.",
            "Part of the stomach herniates through the esophageal hiatus, in keeping with a hiatal hernia.",
            "A {degree} hiatus hernia is noted.",
        ),
        negative_sentences=(
            "No hiatal hernia is seen.",
            "There is no hiatus hernia.",
        ),
        fallback_sentence="Hiatal hernia is present.",
        patterns=(
            r"hiatal\s+hernia\w*", r"hiatus\s+hernia\w*", r"para-?o?esophageal\s+hernia\w*", r"hernia\w*\s+(?:\w+\s+){0,4}(?:esophageal\s+|oesophageal\s+)?hiatus",
            r"(?:stomach|gastric\s+fundus|fundus)\s+(?:\w+\s+){0,3}herniat\w*",
            r"herniat\w*\s+(?:\w+\s+){0,3}(?:stomach|gastric)",
            # A (diaphragmatic) hernia at the gastro-oesophageal junction is a hiatal one.
            r"herni\w*[^.;]{0,80}?\b(?:esophago-?gastric|oesophago-?gastric|gastro-?o?esophageal)\s+junction",
        ),
        anchors=('hiat', 'herni'),
    ),
    Finding(
        index=6, name="Lymphadenopathy", z_range=(0.2, 0.65), prevalence=0.34,
        positive_sentences=(
            "Enlarged lymph nodes are present in the mediastinum, the largest {node_size} in short axis.",
            "There is mediastinal lymphadenopathy.",
            "Pathologically enlarged lymph nodes are seen in the {side} hilum.",
            "A {node_size} lymph node of pathological size is seen in the subcarinal station.",
        ),
        negative_sentences=(
            "No enlarged lymph nodes are seen in the mediastinum or hila.",
            "There is no mediastinal or hilar lymphadenopathy.",
        ),
        fallback_sentence="Lymphadenopathy is present.",
        patterns=(
            # CT-RATE convention: any lymph node reported present counts, sub-centimetric and
            # "not reaching pathological size" ones included; only negated mentions do not.
            r"lymphadenopath\w*", r"\badenopath\w*", r"\bLAPs?\b", r"(?<!intrapulmonary\s)(?<!intraparenchymal\s)(?<!subpleural\s)(?<!fissural\s)"
            r"lymph\s*nod(?:e|es|al)\b(?!\s+stations?)",
            r"(?:enlarged|pathological(?:ly)?(?:\s+enlarged)?|bulky|conglomerate)\s+(?:\w+\s+){0,3}nodes\b",
        ),
        anchors=('lymph', 'adenopath', 'lap', 'node'),
    ),
    Finding(
        index=7, name="Emphysema", z_range=(0.0, 0.5), prevalence=0.23,
        positive_sentences=(
            "Centrilobular emphysema is seen in both upper lobes.",
            "There are emphysematous changes in the {lobe}.",
            "Paraseptal emphysema with small subpleural bullae is present.",
            "{degree} emphysema is noted in both lungs.",
        ),
        negative_sentences=(
            "No emphysema is seen.",
            "There are no emphysematous changes.",
        ),
        fallback_sentence="Emphysema is present.",
        patterns=(r"bullae\b", r"\bbulla\b", r"bullous", r"(?:centrilobular|centriacinar|paraseptal|panacinar|"
                  r"panlobular)\s+emphysem\w*"),
        weak_patterns=(r"emphysem\w*",),
        vetoes=(r"subcutaneous", r"\bskin\b", r"soft\s+tissue", r"mediastinal\s+emphysem\w*",
                r"muscle", r"axilla\w*"),
        anchors=('bull', 'emphysem'),
    ),
    Finding(
        index=8, name="Atelectasis", z_range=(0.5, 1.0), prevalence=0.28,
        positive_sentences=(
            "Subsegmental atelectasis is seen in the {lobe}.",
            "There is linear atelectasis at the base of the {side} lung.",
            "Passive atelectasis is present adjacent to the pleural fluid.",
            "Plate-like atelectatic bands are noted in both lower lobes.",
        ),
        negative_sentences=(
            "No atelectasis is seen.",
            "There is no collapse or atelectasis of the lungs.",
        ),
        fallback_sentence="Atelectasis is present.",
        # Fibroatelectasis is a scar (fibrotic sequela), not an atelectasis.
        patterns=(r"(?<!fibro)(?<!fibro\s)(?<!fibro-)atelecta\w*", r"\bcollapsed?\s+(?:of\s+the\s+)?(?:\w+\s+){0,2}(?:lobe|lung|segment)",
                  r"(?:lobe|lung|segment)\s+(?:is\s+)?collapsed?"),
        anchors=('atelecta', 'collaps'),
    ),
    Finding(
        index=9, name="Lung nodule", z_range=(0.0, 1.0), prevalence=0.45,
        positive_sentences=(
            "A {size} nodule is seen in the {lobe}.",
            "There are a few small nodules in both lungs, the largest {size} in diameter.",
            "A solid pulmonary nodule measuring {size} is present in the {lobe}.",
            "A subpleural micronodule is noted in the {lobe}.",
        ),
        negative_sentences=(
            "No pulmonary nodule is seen.",
            "There are no nodules or masses in either lung.",
        ),
        fallback_sentence="A lung nodule is present.",
        # The noun: "nodular" as an adjective (nodular ground glass, nodular consolidation,
        # nodular pleural thickening) describes another finding's shape.
        weak_patterns=(r"\bnodules?\b", r"micronodul\w*", r"nodular\s+(?:lesions?|formations?|appearances?)", r"pulmonary\s+mass", r"lung\s+mass",
                       r"mass\s+(?:lesion\s+)?(?:in|of)\s+the\s+(?:right|left)?\s*(?:lung|\w+\s+lobe)",
                       # a lymph node inside the lung (perifissural, subpleural) is a lung nodule
                       # (one pattern per prefix: a literal start lets `re` skip ahead)
                       *(p + r"\s+lymph\s*nod\w*" for p in ("intrapulmonary", "intraparenchymal", "subpleural", "fissural"))),
        vetoes=(r"thyroid", r"adrenal", r"liver", r"hepatic", r"kidney", r"renal", r"breast",
                r"spleen", r"splenic", r"pancrea\w*", r"schmorl", r"subcutaneous", r"mediastin\w*",
                r"trache\w*", r"fatty\s+tissue", r"mesenter\w*", r"\bbones?\b", r"vertebra\w*",
                # Lung nodules are solid or ground glass; "hypodense" describes a solid organ's
                # lesion (thyroid, liver, kidney). A nodule OF the pleura is pleural disease.
                r"hypodens\w*", r"(?<!sub)pleural\s+nodul\w*"),
        anchors=('nodul', 'mass', 'l lymph'),  # 'l lymph': (intra)pulmonary, -parenchymal, subpleural, fissural
    ),
    Finding(
        index=10, name="Lung opacity", z_range=(0.0, 1.0), prevalence=0.30,
        positive_sentences=(
            "Ground-glass opacities are seen in the {lobe}.",
            "There is a patchy area of increased density in the {lobe}.",
            "Peripheral ground glass densities are noted in both lungs.",
            "A hazy opacity is present in the {lobe}.",
        ),
        negative_sentences=(
            "No pulmonary opacity is seen.",
            "There are no ground-glass areas in either lung.",
        ),
        fallback_sentence="Lung opacity is present.",
        patterns=(r"(?<!nodular\s)(?<!acinar\s)opacit\w*", r"ground[\s-]+glass(?![\s-]+(?:density\s+)?nodul)",
                  r"frosted[\s-]+glass", r"\bopaque\b"),
        # A density increase is a lung opacity unless it is a scar, a band or lies outside the lung;
        # one read as atelectasis, linear or not, is still an opacity (the labelled reports lean
        # that way, and an F1-optimal labeler calls a pattern present from about 45% positives).
        weak_patterns=(r"(?:increase\w*|increased)\s+(?:in\s+)?(?:the\s+)?(?:[\w-]+\s+){0,3}?densit\w*",
                       r"densit(?:y|ies)\s+increase\w*", r"dep[ae]nd[ae]nt\s+densit\w*",
                       r"increase\w*\s+(?:in\s+)?(?:the\s+)?(?:[\w-]+\s+){0,2}?attenuation", r"attenuation\s+increase\w*"),
        vetoes=(r"sequel\w*", r"fibro\w*", r"pleuro-?parenchymal", r"\bbands?\b",
                r"\bfat\w*", r"peri(?:renal|nephric|colonic|gastric|portal|duodenal)", r"para\w*(?:renal|duodenal)",
                r"soft\s+tissue", r"subcutaneous", r"cutaneous", r"vertebra\w*", r"\bbones?\b", r"osteo\w*",
                r"breast", r"sternum", r"metallic", r"liver", r"kidney", r"spleen", r"consolidat\w*",
                r"calcif\w*", r"\bnodules?\b", r"micronodul\w*", r"adrenal", r"thyroid", r"splen\w*",
                r"mediastin\w*", r"thym\w*", r"pericardi\w*", r"chest\s+wall"),
        anchors=('opacit', 'glass', 'opaque', 'densit', 'attenuat'),
    ),
    Finding(
        index=11, name="Pulmonary fibrotic sequela", z_range=(0.0, 1.0), prevalence=0.27,
        positive_sentences=(
            "Fibrotic bands are seen in the {lobe}.",
            "There are sequelae of previous infection with parenchymal scarring in the {lobe}.",
            "Fibroatelectatic changes are noted in both lower lobes.",
            "{degree} fibrosis is present in the {lobe}.",
        ),
        negative_sentences=(
            "No fibrotic changes are seen in the lungs.",
            "There is no pulmonary fibrosis.",
        ),
        fallback_sentence="Pulmonary fibrotic sequela is present.",
        # Scars left by past disease (bands, fibroatelectasis, post-infectious sequelae); the
        # honeycombing and traction bronchiectasis of an interstitial lung disease are not sequelae.
        patterns=(r"(?:parenchymal|pleuro-?parenchymal|subpleural|fibrotic|fibrous)\s+bands?",
                  r"fibro[\s-]?atelecta\w*"),
        weak_patterns=(r"fibro\w*", r"sequel\w*", r"\bscar\w*"),
        vetoes=(r"fibroid", r"fibroadenom\w*", r"fibromatosis", r"\bribs?\b", r"humer\w*", r"kidneys?",
                r"renal", r"spleen", r"liver", r"\bbones?\b", r"fracture", r"vertebra\w*", r"honeycomb\w*",
                r"interstitial\s+lung\s+disease", r"idiopathic", r"elevation"),
        anchors=('band', 'fibro', 'sequel', 'scar'),
    ),
    Finding(
        index=12, name="Pleural effusion", z_range=(0.6, 1.0), prevalence=0.15,
        positive_sentences=(
            "A {degree} pleural effusion is seen on the {side}.",
            "There is bilateral pleural effusion.",
            "Fluid is present in the {side} pleural space.",
            "Pleural effusion measuring up to 20 mm is noted on the {side}.",
        ),
        negative_sentences=(
            "No pleural effusion is seen.",
            "There is no fluid in either pleural space.",
        ),
        fallback_sentence="Pleural effusion is present.",
        patterns=(
            r"pleural(?:\s*(?:and|or|/|-)\s*pericardial)?\s+(?:effusions?|fluid)",
            r"(?:effusion|fluid)\s+(?:\w+\s+){0,3}(?:in|within)\s+(?:the\s+)?(?:\w+\s+){0,2}pleural",
            # In a chest CT an effusion that is not called pericardial is a pleural one (a
            # separate "pericardial effusion" later in the sentence is its own mention).
            r"(?<!pericardial\s)(?<!pericardial-)(?<!pericardial\sminimal\s)(?<!pericardial\smild\s)"
            r"\beffusions?\b(?![^.;]{0,100}(?:pericardi(?!al\s+(?:\w+\s+)?(?:effusion|fluid))|abdom|spleen|splenic|kidney|renal|perirenal|perinephric|"
            r"liver|hepatic|pelvi|joint))",
            r"hydrothora\w*", r"hemothora\w*", r"empyema",
            # An effusion placed in a hemithorax (or between the pleural leaves) is pleural.
            r"(?:effusion|fluid)\b[^.;]{0,80}?\b(?:hemithora\w*|pleural\s+(?:leaves|layers|sinus\w*|recess\w*))",
            r"pleural\s+(?:space|cavity|cavities|spaces)\s+(?:contains?|shows?)\s+fluid",
        ),
        anchors=('pleural', 'effusion', 'thora', 'empyema'),
    ),
    Finding(
        index=13, name="Mosaic attenuation pattern", z_range=(0.1, 1.0), prevalence=0.08,
        positive_sentences=(
            "There is a mosaic attenuation pattern in both lungs.",
            "Mosaic perfusion is noted in the lower lobes.",
            "Areas of mosaic attenuation suggest small airway disease.",
            "A {degree} mosaic pattern is seen in the {lobe}.",
        ),
        negative_sentences=(
            "No mosaic attenuation is seen.",
            "There is no mosaic pattern.",
        ),
        fallback_sentence="Mosaic attenuation pattern is present.",
        patterns=(r"mosaic\w*", r"air[\s-]+trapping"),
        anchors=('mosaic', 'trapping'),
    ),
    Finding(
        index=14, name="Peribronchial thickening", z_range=(0.2, 1.0), prevalence=0.09,
        positive_sentences=(
            "There is peribronchial thickening in both lower lobes.",
            "Peribronchial wall thickening is noted in the {lobe}.",
            "Peribronchial cuffing is seen in the {lobe}.",
            "{degree} thickening of the peribronchial interstitium is present.",
        ),
        negative_sentences=(
            "No peribronchial thickening is seen.",
            "The peribronchial interstitium is not thickened.",
        ),
        fallback_sentence="Peribronchial thickening is present.",
        # CT-RATE keeps this to the peribronchial sheath; thickening of the bronchial wall alone
        # (bronchitis, asthma) is read as another finding.
        patterns=(
            r"peribronch\w*\s+(?:\w+\s+){0,2}" + _THICK,
            _THICK + r"[^.;]{0,60}?\b(?:of|in|along|around)\s+(?:the\s+)?(?:\w+\s+)?peribronch\w*",
            r"increase\w*\s+(?:in\s+)?(?:the\s+)?peribronch\w*\s+(?:wall\s+)?thickness",
            r"peribronchial\s+cuffing",
            r"peribronch\w*\s+(?:\w+\s+){0,2}(?:is|are|was|were|appears?)\s+(?:\w+\s+)?thicken\w*",
        ),
        anchors=('peribronch',),
    ),
    Finding(
        index=15, name="Consolidation", z_range=(0.3, 1.0), prevalence=0.16,
        positive_sentences=(
            "There is consolidation in the {lobe}.",
            "A consolidated area with air bronchograms is present in the {lobe}.",
            "Patchy consolidations are seen in both lower lobes.",
            "Consolidative changes are noted in the {lobe}.",
        ),
        negative_sentences=(
            "No consolidation is seen.",
            "There is no focal consolidation in either lung.",
        ),
        fallback_sentence="Consolidation is present.",
        # A consolidated (healed) fracture is bone, not lung.
        weak_patterns=(r"consolidat\w*", r"air\s+bronchogram\w*"),
        vetoes=(r"fractur\w*", r"callus"),
        anchors=('consolidat', 'bronchogram'),
    ),
    Finding(
        index=16, name="Bronchiectasis", z_range=(0.3, 1.0), prevalence=0.10,
        positive_sentences=(
            "Cylindrical bronchiectasis is seen in the {lobe}.",
            "There are bronchiectatic changes in both lower lobes.",
            "Bronchiectasis is present in the {lobe}.",
            "{degree} bronchiectasis is noted in both lungs.",
        ),
        negative_sentences=(
            "No bronchiectasis is seen.",
            "There are no bronchiectatic changes.",
        ),
        fallback_sentence="Bronchiectasis is present.",
        patterns=(r"bronchiectas\w*", r"bronchiectatic", r"bronchiolectas\w*",
                  r"(?:dilated|dilatation\s+of\s+the)\s+bronch\w*",
                  # "ectasia of the bronchi" spelled out (the word, not the end of atelectasis)
                  r"\bbronch\w*\s+ectasi\w*",
                  r"\bectasi\w*\s+(?:\w+\s+){0,4}?(?:in|of|along)\s+(?:the\s+)?(?:\w+\s+)?bronch\w*"),
        anchors=('bronchiecta', 'bronchiolecta', 'dilat', 'ectasia', ' ectasi'),
    ),
    Finding(
        index=17, name="Interlobular septal thickening", z_range=(0.2, 1.0), prevalence=0.08,
        positive_sentences=(
            "Interlobular septal thickening is seen in both lungs.",
            "There is smooth thickening of the interlobular septa in the {lobe}.",
            "Thickened interlobular septa are noted at the lung bases.",
            "The interlobular septa are {degree}ly thickened in the {lobe}.",
        ),
        negative_sentences=(
            "No interlobular septal thickening is seen.",
            "The interlobular septa are not thickened.",
        ),
        fallback_sentence="Interlobular septal thickening is present.",
        # The interlobular septa named anywhere in a clause with a thickening; bare "septal"
        # needs no cardiac or nasal septum nearby; interstitial thickening of the lung (not the
        # peribronchial sheath, which is its own class) is read as septal.
        patterns=(
            r"interlob(?:ular|ar)[\s-]+(?:\w+[\s-]+)?sept\w*[^.;]{0,40}?" + _THICK,
            r"\binterlobular\b(?![\s-]+fissur)[^.;]{0,60}?\bthick\w*",
            r"\bthick\w*[^.;]{0,60}?\binterlobular\b(?![\s-]+fissur)",
            # septa seen at all on CT are thickened ones
            r"(?:prominen\w*|accentuated|visible)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+)?interlob\w+\s+sept",
            r"interlob\w+\s+septa?\w*\s+(?:are|is|were|was|appear|became)\s+(?:\w+\s+)?(?:prominen|accentuated)",
            # Kerley (B) lines are thickened interlobular septa seen end-on.
            r"kerley",
        ),
        weak_patterns=(
            r"septal\s+lines?",
            r"sept(?:al|a|um)\s+(?:\w+\s+){0,2}" + _THICK,
            _THICK + r"\s+(?:of\s+|in\s+)?(?:the\s+)?(?:interlob\w+\s+)?sept(?:a|al|um)\b",
            r"sept(?:a|um)\s+(?:are|is|were|was|appear)\s+(?:\w+\s+)?thicken\w*",
            r"increase\w*\s+(?:in\s+)?(?:the\s+)?(?:interlob\w+\s+)?septal\s+thickness",
            r"(?<!peribronchial\s)(?<!peribronchovascular\s)interstiti(?:al|um)(?:\s+\w+)?\s+" + _THICK,
            _THICK + r"[^.;]{0,80}?(?<!peribronchial\s)(?<!peribronchovascular\s)(?<!peribronchial\sand\s)"
            r"interstiti(?:al|um)\b(?!\s+lung\s+disease)",
        ),
        vetoes=(r"interatrial", r"interventricular", r"(?:atrial|ventricular|nasal)\s+sept\w*"),
        anchors=('sept', 'interlob', 'interstiti', 'kerley'),
    ),
)

assert tuple(f.name for f in FINDINGS) == CLASS_NAMES
assert all(f.index == i for i, f in enumerate(FINDINGS))

# (i, j, lift): P(j | i) / P(j) in CT-RATE-like data; symmetric in the sense that the generator
# may apply it either way. Pairs with lift > 1 co-occur more often than chance.
CO_OCCURRENCE: tuple[tuple[int, int, float], ...] = (
    (4, 1, 2.6),    # coronary & arterial wall calcification: the same atherosclerosis
    (2, 3, 2.5),    # cardiomegaly & pericardial effusion
    (2, 4, 1.6),    # cardiomegaly & coronary calcification
    (7, 14, 2.2),   # emphysema & peribronchial thickening (smokers' airways)
    (7, 16, 1.8),   # emphysema & bronchiectasis
    (14, 16, 3.0),  # peribronchial thickening & bronchiectasis
    (12, 8, 2.6),   # pleural effusion & (passive) atelectasis
    (12, 3, 2.4),   # pleural effusion & pericardial effusion
    (15, 10, 2.6),  # consolidation & lung opacity
    (17, 10, 2.4),  # interlobular septal thickening & ground-glass opacity
    (13, 10, 1.8),  # mosaic attenuation & lung opacity
    (11, 16, 1.7),  # fibrotic sequelae & (traction) bronchiectasis
    (11, 9, 1.4),   # fibrotic sequelae & nodules (granulomatous sequelae)
    (0, 2, 1.8),    # medical material (pacemakers, sternotomy wires) & cardiomegaly
    (0, 4, 1.8),    # medical material (coronary stents) & coronary calcification
)


def co_occurrence_matrix() -> list[list[float]]:
    """[18, 18] lift matrix, 1.0 where no co-occurrence is known, symmetric."""
    lift = [[1.0] * NUM_CLASSES for _ in range(NUM_CLASSES)]
    for i, j, value in CO_OCCURRENCE:
        lift[i][j] = lift[j][i] = value
    return lift


def fill_slots(template: str, rng: random.Random) -> str:
    """Replace every {slot} in a positive sentence with a random filler from SLOT_FILLERS."""
    def pick(match: re.Match) -> str:
        filler = rng.choice(SLOT_FILLERS[match.group(1)])
        return filler.capitalize() if match.start() == 0 else filler
    return re.sub(r"\{(\w+)\}", pick, template)


# ----------------------------------------------------------------------------------------
# Sentence splitting, negation and uncertainty.

# Sentence ends: ". ", "? ", "! ", a period closing a quotation ('." '), a line break or a
# bullet; a period inside a number (3.5 mm) is not followed by a space and does not split.
# Plain string operations: 10x a regex split.
_BREAKS = (("? ", "?\n"), ("! ", "!\n"), (". ", ".\n"), ('." ', '."\n'), (".\u201d ", ".\u201d\n"),
           ("\u2022", "\n"), ("\u00b7 ", "\n"), ("\r", "\n"))
# Cheap substring test before the clause regex: most sentences have no clause break at all.
_CLAUSE_WORDS = (";", ":", "but", "however", "though", "whereas", "while", "yet", "except", "apart",
                 "other than", "besides")
_CLAUSE_END = re.compile(
    r";|:\s(?!\s*(?:none|no|not|absent|negative)\b)|\b(?:but|however|although|though|whereas|while|yet|except|apart\s+from|other\s+than|besides)\b",
    re.IGNORECASE)
# Negation cues before a mention. "no" must be a word of its own ("no." abbreviations aside).
# A "not" that belongs to a limitation ("could not be evaluated optimally") or to an
# uncertainty ("cannot be excluded", handled by `_POST_NEGATION`) negates nothing after it.
_NOT_A_CUE = (r"\s+be\s+(?:\w+\s+)?(?:evaluat|assess|distinguish|differentiat|separat|characteri|measur|"
              r"excluded|ruled\s+out)")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not(?!" + _NOT_A_CUE + r")|without|absence\s+of|absent|free\s+of|negative\s+for|neither|nor|"
    r"none|never|rather\s+than|instead\s+of|rule\s+out|(?<!be\s)ruled\s+out|exclude|(?<!be\s)excluded|"
    r"unlikely|resolution\s+of|disappear\w*\s+of|regression\s+of\s+(?:the\s+)?previous(?:ly)?|"
    r"(?:complete|total|full)\s+regression\s+(?:of|in)|"
    # "areas previously observed as consolidation are ground glass now": a past reading
    r"previously\s+(?:\w+\s+)?(?:observed|seen|described|noted|reported|evaluated)\s+as)\b")
# Negation after a mention in the same clause ("... was not observed", "... are absent").
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were|has\s+been|have\s+been)\s+)?(?:not|no\s+longer|never)\s+"
    r"(?:\w+\s+)?(?:seen|observed|detected|identified|noted|present|visuali[sz]ed|evident|found|"
    r"demonstrated|appreciated|apparent|visible|shown|recognized|encountered|determined|"
    r"considered|enlarged|thickened|increased|dilated|calcified|significant)\b|"
    r"\b(?:is|are|was|were)\s+(?:absent|excluded|ruled\s+out|unlikely)\b|"
    r"\b(?:has|have)\s+(?:completely\s+)?(?:resolved|disappeared|regressed\s+completely)\b|"
    r"\b(?:completely|totally|fully)\s+regressed\b|\b(?:complete|total|full)\s+regression\b|"
    r"\b(?:completely\s+)?(?:resolved|disappeared)\b|"
    # Uncertainty policy: a finding that only "cannot be excluded" is not asserted; nor is
    # one that "cannot be evaluated" (a limitation of the study, not a finding).
    r"\b(?:can\s*not|could\s+not|can't)\s+be\s+(?:completely\s+)?(?:excluded|ruled\s+out)\b|"
    r"\b(?:can\s*not|could\s+not|can't)\s+be\s+(?:\w+\s+)?(?:evaluated|assessed)\b")
# A template answer right after the finding: "Pericardial effusion - none", "Consolidation:
# none", "... - no thickening was detected" (the dash or colon lists the finding with what
# follows, under the "no").
_DASH_NEGATION = re.compile(r"(?:\s+[a-z]+){0,2}?\s*[-\u2013\u2014:]\s*(?:no|none|not|absent|negative)\b"
                            r"(?!\s+(?:significant\s+)?(?:change|difference|progression|increase))")
# "... was not seen in the previous examination" / "... not present before" dates the finding,
# it does not negate it; "observed on the prior study" does not assert it now either.
_PRIOR_STUDY = re.compile(r"\s*(?:(?:in|on|at|compared\s+to|compared\s+with|than)\s+(?:the\s+|his\s+|her\s+|its\s+)?"
                          r"(?:\w+\s+){0,2}(?:previous|prior|old|earlier|last)\b|before\b|previously\b|earlier\b)")
# Words that end the scope of a preceding negation cue inside a clause.
_SCOPE_BREAK = re.compile(
    r"\b(?:but|however|although|though|except|whereas|which|there\s+(?:is|are)|"
    r"is\s+seen|are\s+seen|was\s+seen|were\s+seen|observed|noted|detected|present|"
    r"now|currently|appears?|appeared)\b")
# Between a mention and a negation after it: a verb that already asserted the mention ("X is
# seen and Y was not detected") ends the scope; a bare participle ("X observed in the upper
# lobe has completely regressed") does not.
_ASSERTING_VERB = re.compile(r"\b(?:(?:is|are|was|were|been)\s+(?:\w+\s+)?(?:seen|observed|noted|detected|"
                             r"identified|present)|there\s+(?:is|are))\b")
# A clause that speaks of an earlier study: "X observed in the previous examination is not
# observed now" asserted X only back then.
_EARLIER_STUDY = re.compile(r"\b(?:previous\w*|prior|earlier|before|old\s+(?:ct|exam\w*|study))\b")
# A list separator in that gap: "X in the left lower lobe, Y was not detected" negates Y only.
_LIST_SEPARATOR = re.compile(r",|\band\b|\bwith\b")
# Hedges that lean negative: a mention under them is not asserted.
_NEGATIVE_HEDGE = re.compile(
    r"\b(?:unlikely|less\s+likely|to\s+rule\s+out|to\s+exclude|not\s+(?:typical|suggestive|consistent)|"
    r"in\s+the\s+absence\s+of|if\s+(?:any|present)|no\s+evidence)\b")


def _compile_each(patterns: Iterable[str]) -> tuple[re.Pattern, ...]:
    """Each pattern compiled on its own, lower-cased, for matching lower-cased text: a literal
    prefix lets `re` skip ahead, which an IGNORECASE alternation of dozens of patterns cannot."""
    return tuple(re.compile(p.lower()) for p in patterns)


def _compile_any(patterns: Sequence[str]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns).lower()) if patterns else None


_PATTERNS: tuple[tuple[re.Pattern, ...], ...] = tuple(_compile_each(f.patterns) for f in FINDINGS)
_WEAK_PATTERNS: tuple[tuple[re.Pattern, ...], ...] = tuple(_compile_each(f.weak_patterns) for f in FINDINGS)
_VETOES: tuple[re.Pattern | None, ...] = tuple(_compile_any(f.vetoes) for f in FINDINGS)
# Anchor -> classes it may announce. A report's anchors are found once with C-level substring
# tests; each sentence is then tested only for those, and a sentence holding none (most
# sentences describe normal anatomy) costs no regular expression at all.
_ANCHOR_CLASSES: dict[str, frozenset[int]] = {
    anchor: frozenset(f.index for f in FINDINGS if anchor in f.anchors)
    for anchor in sorted({a for f in FINDINGS for a in f.anchors})}
_ALL_ANCHORS: tuple[str, ...] = tuple(_ANCHOR_CLASSES)


def _candidates(lowered: str, anchors: Sequence[str] = _ALL_ANCHORS) -> set[int]:
    """Classes whose anchors occur in the lower-cased text: the only ones worth a regex search."""
    found: set[int] = set()
    for anchor in anchors:
        if anchor in lowered:
            found |= _ANCHOR_CLASSES[anchor]
    return found


def split_sentences(text: str) -> list[str]:
    """Report text -> stripped, non-empty sentences (decimals like 3.5 mm are not split)."""
    for old, new in _BREAKS:
        if old in text:
            text = text.replace(old, new)
    return [s for s in (line.strip() for line in text.split("\n")) if s.strip(" .\t\"'")]


def split_clauses(sentence: str) -> list[str]:
    """A sentence -> clauses at ';', ':' and contrastive conjunctions (negation scope ends there)."""
    lowered = sentence.lower()
    if not any(word in lowered for word in _CLAUSE_WORDS):
        return [sentence]
    return [c for c in _CLAUSE_END.split(sentence) if c and c.strip()]


# "No (significant) change in the effusion", "no increase in the size of the lymph nodes":
# the "no" denies a change of a finding that is there, not the finding.
# (Only a degree word may come between: "no emphysematous change" denies emphysema.)
_NO_CHANGE = re.compile(r"\s+(?:(?:significant|marked|major|remarkable|appreciable|obvious|interval|further)\s+)?"
                        r"(?:change|difference|progression|regression|"
                        r"(?:increase|decrease|reduction)\s+(?:in|of)\s+(?:the\s+)?(?:size|number|dimension|diameter)s?)\b")


def _is_negated(clause: str, start: int, end: int) -> bool:
    """Whether the mention clause[start:end] is negated within its clause."""
    for cue in _PRE_NEGATION.finditer(clause, 0, end):
        if cue.start() >= start:  # a cue inside the mention ("lymph nodes not enlarged")
            return True
        if cue.group() in ("no", "without") and _NO_CHANGE.match(clause, cue.end()):
            continue
        if not _SCOPE_BREAK.search(clause, cue.end(), start):
            return True
    if _DASH_NEGATION.match(clause, end):
        return True
    post = _POST_NEGATION.search(clause, end)
    return (post is not None and not _PRIOR_STUDY.match(clause, post.end())
            and _post_negation_reaches(clause, end, post.start()))


def _post_negation_reaches(clause: str, end: int, cue: int) -> bool:
    """Whether a negation starting at clause[cue] still covers a mention that ended at `end`.

    It does not when the mention was asserted first ("X is seen, Y is not") or when the
    mention is a list item of its own, with its location, and another finding follows before
    the negation ("X in the left lower lobe, Y was not detected"). A clause that compares with
    an earlier study ("X and Y, seen in the previous examination, are not seen now") negates
    its whole list: "seen" there is what was seen back then.
    """
    if _EARLIER_STUDY.search(clause):
        return True
    if _ASSERTING_VERB.search(clause, end, cue):
        return False
    separator = _LIST_SEPARATOR.search(clause, end, cue)
    if separator is None or len(clause[end:separator.start()].split()) < 3:
        return True
    return not _candidates(clause[separator.end():cue])


def _mentions(index: int, clause: str) -> Iterable[re.Match]:
    """Matches of class `index` in the lower-cased clause: strong ones, then weak ones unless
    a veto is in the clause."""
    for pattern in _PATTERNS[index]:
        yield from pattern.finditer(clause)
    veto = _VETOES[index]
    if _WEAK_PATTERNS[index] and not (veto is not None and veto.search(clause)):
        for pattern in _WEAK_PATTERNS[index]:
            yield from pattern.finditer(clause)


# What may stand between a mention and its question mark: the head noun of the mention's
# phrase ("ground glass opacity?", "consolidation area?").
_QUESTIONED = re.compile(r"\s*(?:(?:opacit\w*|densit\w*|areas?|appearances?|changes?|formations?|patterns?)\s*)?\?")


def _is_questioned(clause: str, end: int) -> bool:
    """A mention right before a question mark ("(lymph node?)", "consolidation area?") is a
    differential, not a finding."""
    return _QUESTIONED.match(clause, end) is not None


# A finding named as what a recommended further study should look for ("evaluation in terms
# of air trapping with expiratory images is recommended") is not one seen on this study.
# A finding only followed up ("follow-up is recommended for the nodule") is one seen, so only
# "in terms of" marks what is looked for.
_TO_LOOK_FOR = re.compile(r"\b(?:evaluat\w*|assess\w*|investigat\w*|examin\w*)\s+(?:\w+\s+){0,4}?in\s+terms\s+of\b")


def _is_looked_for(clause: str, start: int) -> bool:
    return "recommend" in clause and _TO_LOOK_FOR.search(clause, 0, start) is not None


def _class_asserted(index: int, clause: str) -> bool:
    return any(not _is_negated(clause, m.start(), m.end()) and not _is_questioned(clause, m.end())
               and not _is_looked_for(clause, m.start())
               for m in _mentions(index, clause))


def sentence_mentions(sentence: str) -> frozenset[int]:
    """Class indices the sentence MENTIONS at all, asserted or negated."""
    lowered = sentence.lower()
    return frozenset(i for i in _candidates(lowered) if any(True for _ in _mentions(i, lowered)))


def _asserted_in(lowered: str, candidates: Iterable[int]) -> set[int]:
    """Candidate classes asserted in a lower-cased sentence, clause by clause."""
    present: set[int] = set()
    for clause in split_clauses(lowered):
        if _NEGATIVE_HEDGE.search(clause):
            continue
        present.update(i for i in candidates if i not in present and _class_asserted(i, clause))
    return present


def sentence_findings(sentence: str) -> frozenset[int]:
    """Class indices the sentence ASSERTS present (negation- and uncertainty-aware)."""
    lowered = sentence.lower()
    candidates = _candidates(lowered)
    return frozenset(_asserted_in(lowered, candidates)) if candidates else frozenset()


def sentence_findings_exhaustive(sentence: str) -> frozenset[int]:
    """`sentence_findings` without the anchor prefilter (slow; checks that anchors lose nothing)."""
    return frozenset(_asserted_in(sentence.lower(), range(NUM_CLASSES)))


def report_findings(text: str) -> frozenset[int]:
    """Class indices asserted present anywhere in a report (the union over its sentences)."""
    lowered = text.lower()
    anchors = [a for a in _ALL_ANCHORS if a in lowered]
    present: set[int] = set()
    if not anchors:
        return frozenset()
    for sentence in split_sentences(text):
        sentence = sentence.lower()
        candidates = _candidates(sentence, anchors) - present
        if candidates:
            present |= _asserted_in(sentence, candidates)
    return frozenset(present)


def labels_from_indices(indices: Iterable[int]) -> list[int]:
    """{2, 9} -> an 18-long 0/1 list in CLASS_NAMES order."""
    chosen = set(indices)
    return [int(i in chosen) for i in range(NUM_CLASSES)]


def indices_from_labels(labels: Sequence[int]) -> frozenset[int]:
    """An 18-long 0/1 vector -> the set of positive class indices."""
    if len(labels) != NUM_CLASSES:
        raise ValueError(f"label vector has {len(labels)} entries, expected {NUM_CLASSES}")
    return frozenset(i for i, v in enumerate(labels) if v)
