"""Synthetic CT-RATE: the embedded default dataset, deterministic from a seed.

A volume is N slices (N in a configurable range, ZSpacing varying per volume) of D-dim
"slice embeddings" built as
  anatomy(t) + patient offset + benign bumps + look-alikes + sum over positive classes of lesions + noise
- anatomy(t): smooth functions of the anatomical position t (apex 0 -> base 1, with a per-scan
  coverage jitter) along fixed directions, so a slice embedding knows roughly where it is;
- a positive class c leaves a bump along its direction u_c over a random sub-interval of its
  `findings.FINDINGS[c].z_range` (a fraction of the volume), with a random per-lesion strength;
  classes whose zones are (almost) disjoint share most of their direction in pairs, and
  label-free look-alikes (a class's direction outside its z-range) occur in any volume, so that
  where a signal is, not only its direction, tells the classes apart: zones matter;
- labels follow `findings` prevalences and co-occurrence lifts (Gaussian copula), with
  `findings.NORMAL_FRACTION` (~37%) normal volumes;
- reports are the project's own prose: normal-anatomy sentences per section (about 90% of the
  text), a finding sentence per positive class placed in its section, and negations of some
  absent classes.
The fixed "world" (directions, anatomy) depends only on D, so every split and seed share it.

CLI: python -m kervljepa_jax.data.synthetic --out=DIR --num_volumes=N --seed=S
writes DIR in the CT-RATE layout that `kervljepa_jax.data.ctrate` reads.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import random
import re
import statistics
import sys

import numpy as np
from absl import app, flags, logging

from kervljepa_jax import findings
from kervljepa_jax.data import records

SPLIT_IDS = {"train": 0, "valid": 1}
WORLD_SEED = 20260323
Z_SPACINGS_MM = (0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
NUM_ANATOMY_DIRECTIONS = 8
NUM_BENIGN_DIRECTIONS = 6
# Signal scale, tuned so a ridge probe on 32 zone-pooled tokens (D=32) reaches macro F1 ~0.86 on
# 1500 volumes while a globally pooled probe stays >= 0.1 lower (tests/data/test_synthetic.py).
LESION_AMPLITUDE = 3.5
NOISE_STD = 1.0
SHARED_WEIGHT = 0.9     # cosine of a zone-confined class direction with its group's shared one
MAX_SHARED_OVERLAP = 0.1  # most z-overlap (fraction of the volume) of two classes sharing a direction
LESION_EXTENT = (0.3, 0.8)   # lesion length as a fraction of its class z-range
LOOKALIKE_RATE = 0.5    # mean number (Poisson) of label-free look-alikes per volume
LOOKALIKE_GAP = 0.1     # a look-alike keeps this far (volume fraction) from its class's z-range
NEGATION_PROBABILITY = 0.5


# ----------------------------------------------------------------------------------------
# Report prose: the project's own normal-anatomy sentences, by section in reading order.
# `topic` routes finding sentences to a section (the finding replaces the section's normal
# sentence); sections are matched in `_ROUTING_ORDER`, most specific first.

@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    topic: str                    # regex over a finding sentence; "" = never a finding's home
    normal: tuple[str, ...]       # variants; one is chosen per report


SECTIONS: tuple[Section, ...] = (
    Section("airways", r"trache|airway", (
        "The tracheal lumen is of normal calibre and the central airways are patent.",
        "The trachea is midline with a smooth wall and a clear lumen.",
        "Central airways show a normal course without endoluminal material.")),
    Section("thyroid", r"thyroid", (
        "The visualised thyroid lobes are symmetric and of homogeneous density.",
        "The thyroid gland at the thoracic inlet appears unremarkable.")),
    Section("aorta", r"aort|great vessel|arch", (
        "The ascending aorta, arch and descending aorta have a normal diameter.",
        "The great vessels arise in a usual pattern and have a normal calibre.",
        "Thoracic aortic dimensions are preserved throughout its course.")),
    Section("veins", r"", (
        "The superior vena cava and the brachiocephalic veins are patent.",
        "Venous structures at the thoracic inlet have a normal calibre.")),
    Section("thymus", r"", (
        "The thymic region contains fatty tissue only.",
        "The anterior mediastinum holds no soft tissue mass.")),
    Section("pulmonary_artery", r"pulmonary arter|pulmonary trunk", (
        "The main pulmonary artery is not dilated.",
        "The pulmonary trunk and its branches have a normal width.")),
    Section("heart", r"\bheart|cardi(?!.*pericard)|ventric", (
        "The cardiac silhouette has normal proportions.",
        "The size and configuration of the cardiac chambers are within the expected range.",
        "The heart appears normal in size and shape.")),
    Section("pericardium", r"pericard", (
        "The pericardium is thin and smooth.",
        "The pericardial layers appear regular.")),
    Section("coronary", r"coronar", (
        "The coronary arteries follow their usual course.",)),
    Section("hila_nodes", r"lymph|node|hil(?:um|ar)|subcarinal", (
        "Mediastinal and hilar structures have a normal appearance.",
        "Mediastinal fat planes are preserved.",
        "The hila have a normal size and contour.")),
    Section("oesophagus", r"esophag|hiat|stomach|gastric", (
        "The oesophagus has a normal course and wall thickness.",
        "The oesophageal calibre is normal along the visualised course.")),
    Section("bronchi", r"bronch", (
        "Segmental and subsegmental bronchi have a normal calibre.",
        "The bronchial tree branches normally in both lungs.")),
    Section("lungs", r"lung|lobe|lingula|pulmonar|parenchym|subpleural|ground|septa", (
        "Both lungs are well aerated.",
        "Lung aeration is symmetric on both sides.",
        "The lung parenchyma has a normal density pattern.")),
    Section("lung_vessels", r"", (
        "The pulmonary vasculature tapers normally towards the periphery.",
        "Peripheral lung markings are preserved.")),
    Section("lung_volumes", r"", (
        "Lung volumes are symmetric and within the expected range.",
        "The interlobar fissures lie in their usual position.")),
    Section("pleura", r"pleura", (
        "The pleural surfaces are smooth on both sides.",
        "The costophrenic angles are sharp.")),
    Section("devices", r"catheter|wires?|pacemaker|stent|clips|tube|sternotomy|device", (
        "The chest wall soft tissues are unremarkable.",
        "Axillary and chest wall soft tissues look normal.")),
    Section("axillae", r"", (
        "Both axillae are unremarkable on the visualised images.",
        "Soft tissues of the thoracic wall and the breasts are symmetric.")),
    Section("liver", r"", (
        "Within the limits of this non-dedicated examination, the liver has a homogeneous density.",
        "The imaged upper abdominal organs show no gross abnormality.")),
    Section("adrenals_spleen", r"", (
        "Both adrenal glands have a normal thickness.",
        "The spleen and the upper poles of the kidneys appear normal.")),
    Section("bones", r"", (
        "The bony thorax shows age-appropriate degenerative change only.",
        "Vertebral bodies keep their height and alignment.",
        "No destructive bone lesion is present in the imaged skeleton.")),
    Section("diaphragm", r"", (
        "The diaphragm contours are smooth on both sides.",
        "Both hemidiaphragms are in the usual position.")),
    Section("ribs", r"", (
        "The sternum and the ribs are intact.",
        "The costal cartilages and the sternoclavicular joints look normal.")),
)
_SECTION_INDEX = {s.name: i for i, s in enumerate(SECTIONS)}
# Most specific topics first: "pericardial" before "heart", "coronary" before "heart"/"aorta".
_ROUTING = tuple((_SECTION_INDEX[name], re.compile(SECTIONS[_SECTION_INDEX[name]].topic, re.IGNORECASE))
                 for name in ("pericardium", "coronary", "oesophagus", "hila_nodes", "pleura", "devices",
                              "bronchi", "heart", "aorta", "pulmonary_artery", "airways", "thyroid", "lungs"))
_DEFAULT_SECTION = _SECTION_INDEX["lungs"]   # unmatched findings go to the lung parenchyma section
IMPRESSION_NORMAL = "Chest CT within normal limits for the patient's age."


def section_of(sentence: str) -> int:
    for s, topic in _ROUTING:
        if topic.search(sentence):
            return s
    return _DEFAULT_SECTION


def finding_sentence(c: int, positives: frozenset[int], rng: random.Random) -> str:
    """A filled positive sentence for class c that asserts c and no class outside `positives`.

    Some templates assert two classes at once; such a sentence is only used when both are
    positive, so that the report text and the labels agree.
    """
    templates = list(findings.FINDINGS[c].positive_sentences)
    rng.shuffle(templates)
    for template in templates:
        sentence = findings.fill_slots(template, rng)
        asserted = findings.sentence_findings(sentence)
        if c in asserted and asserted <= positives:
            return sentence
    return findings.FINDINGS[c].fallback_sentence


def write_report(labels: np.ndarray, rng: random.Random) -> tuple[str, str]:
    """(Findings_EN, Impressions_EN) for a label vector [C]: one sentence list per section."""
    per_section: list[list[str]] = [[rng.choice(s.normal)] for s in SECTIONS]
    replaced: set[int] = set()
    positives = [int(c) for c in np.flatnonzero(labels)]
    for c in positives:
        sentence = finding_sentence(c, frozenset(positives), rng)
        s = section_of(sentence)
        if s not in replaced:       # a finding replaces the section's "normal" sentence
            per_section[s] = []
            replaced.add(s)
        per_section[s].append(sentence)
    for c in range(findings.NUM_CLASSES):
        if labels[c] == 0 and rng.random() < NEGATION_PROBABILITY:
            sentence = rng.choice(findings.FINDINGS[c].negative_sentences)
            per_section[section_of(sentence)].append(sentence)
    report = " ".join(sentence for section in per_section for sentence in section)
    impression = (" ".join(findings.FINDINGS[c].fallback_sentence for c in positives)
                  if positives else IMPRESSION_NORMAL)
    return report, impression


# ----------------------------------------------------------------------------------------
# Labels: marginal prevalences and co-occurrence lifts through a Gaussian copula.

@functools.lru_cache(maxsize=None)
def _label_model() -> tuple[np.ndarray, np.ndarray]:
    """(thresholds [C], cholesky [C, C]) of the copula for ABNORMAL volumes."""
    p_abnormal = 1.0 - findings.NORMAL_FRACTION
    prevalence = np.array([f.prevalence for f in findings.FINDINGS])
    conditional = np.clip(prevalence / p_abnormal, 0.01, 0.95)
    normal = statistics.NormalDist()
    thresholds = np.array([normal.inv_cdf(q) for q in conditional])
    lift = np.asarray(findings.co_occurrence_matrix())
    # A lift of 2.5 between two ~20% classes needs a latent correlation of about 0.5.
    corr = np.clip(0.4 * np.log(lift), -0.6, 0.75)
    np.fill_diagonal(corr, 1.0)
    eigval, eigvec = np.linalg.eigh(corr)
    corr = eigvec @ np.diag(np.maximum(eigval, 1e-3)) @ eigvec.T
    d = np.sqrt(np.diag(corr))
    return thresholds, np.linalg.cholesky(corr / np.outer(d, d))


def sample_labels(rng: np.random.Generator) -> np.ndarray:
    """[C] int32 0/1 labels: normal with NORMAL_FRACTION, else a copula draw with >= 1 positive."""
    labels = np.zeros(findings.NUM_CLASSES, np.int32)
    if rng.random() < findings.NORMAL_FRACTION:
        return labels
    thresholds, chol = _label_model()
    for _ in range(100):
        latent = chol @ rng.standard_normal(findings.NUM_CLASSES)
        labels = (latent < thresholds).astype(np.int32)
        if labels.any():
            return labels
    labels[int(np.argmax(thresholds - latent))] = 1
    return labels


# ----------------------------------------------------------------------------------------
# Slices.

@dataclasses.dataclass(frozen=True)
class World:
    """Fixed directions shared by every volume of a given embedding width."""
    anatomy: np.ndarray      # [A, D]
    classes: np.ndarray      # [C, D] unit
    benign: np.ndarray       # [B, D] unit
    patient: np.ndarray      # [P, D] directions of between-patient variation


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


@functools.lru_cache(maxsize=None)
def shared_groups() -> tuple[int, ...]:
    """Class -> shared direction index (-1: none): pairs of classes in (almost) disjoint zones.

    Two classes of a pair look almost alike (one shared direction) but sit in different parts
    of the volume, so only WHERE the signal is tells them apart: the zones carry information
    that a global pool loses. Pairs are picked greedily by least z-overlap.
    """
    classes = range(findings.NUM_CLASSES)
    pairs = sorted((_overlap(findings.FINDINGS[i].z_range, findings.FINDINGS[j].z_range), i, j)
                   for i in classes for j in classes if i < j)
    assignment, used = [-1] * findings.NUM_CLASSES, set()
    for overlap, i, j in pairs:
        if overlap <= MAX_SHARED_OVERLAP and not {i, j} & used:
            assignment[i] = assignment[j] = len(used) // 2
            used |= {i, j}
    return tuple(assignment)


@functools.lru_cache(maxsize=8)
def world(embed_dim: int) -> World:
    rng = np.random.default_rng([WORLD_SEED, embed_dim])
    shared = _unit(rng.standard_normal((findings.NUM_CLASSES // 2, embed_dim)))
    own = _unit(rng.standard_normal((findings.NUM_CLASSES, embed_dim)))
    groups = np.array(shared_groups())
    weight = np.where(groups >= 0, SHARED_WEIGHT, 0.0)[:, None]
    classes = _unit(weight * shared[np.maximum(groups, 0)] + np.sqrt(1 - weight**2) * own)
    return World(anatomy=rng.standard_normal((NUM_ANATOMY_DIRECTIONS, embed_dim)),
                 classes=classes,
                 benign=_unit(rng.standard_normal((NUM_BENIGN_DIRECTIONS, embed_dim))),
                 patient=rng.standard_normal((4, embed_dim)))


def _bump(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[N] Hann window over the volume fractions u in [lo, hi], 0 outside."""
    width = max(hi - lo, 1e-6)
    x = (u - lo) / width
    return np.where((x >= 0) & (x <= 1), np.sin(np.pi * np.clip(x, 0, 1)) ** 2, 0.0)


def lesion_interval(z_range: tuple[float, float], rng: np.random.Generator) -> tuple[float, float]:
    """A random sub-interval (30-80% of the class's z-range) fully inside it."""
    lo, hi = z_range
    width = (hi - lo) * rng.uniform(LESION_EXTENT[0], LESION_EXTENT[1])
    start = rng.uniform(lo, hi - width)
    return start, start + width


def lesion_signal(labels: np.ndarray, num_slices: int, embed_dim: int, rng: np.random.Generator,
                  signal_strength: float = 1.0) -> np.ndarray:
    """[N, D] sum over positive classes of a bump along u_c inside the class's z-range."""
    classes = world(embed_dim).classes
    u = np.linspace(0.0, 1.0, num_slices)                      # fraction of the volume, apex -> base
    amplitude = LESION_AMPLITUDE * signal_strength * np.sqrt(embed_dim) / np.sqrt(32.0)
    signal = np.zeros((num_slices, embed_dim))
    for c in np.flatnonzero(labels):
        lo, hi = lesion_interval(findings.FINDINGS[c].z_range, rng)
        strength = amplitude * rng.uniform(0.5, 1.5)            # weak and strong lesions
        signal += strength * np.outer(_bump(u, lo, hi), classes[c])
    return signal


def lookalike_spans(c: int) -> tuple[tuple[float, float], ...]:
    """Parts of the volume (>= 0.1 long) at least LOOKALIKE_GAP away from class c's z-range."""
    lo, hi = findings.FINDINGS[c].z_range
    return tuple((a, b) for a, b in ((0.0, lo - LOOKALIKE_GAP), (hi + LOOKALIKE_GAP, 1.0)) if b - a >= 0.1)


LOOKALIKE_CLASSES = tuple(c for c in range(findings.NUM_CLASSES) if lookalike_spans(c))


def lookalikes(rng: np.random.Generator) -> list[tuple[int, float, float, float]]:
    """[(class, start, end, relative strength)] of a volume's label-free look-alikes."""
    out = []
    for _ in range(rng.poisson(LOOKALIKE_RATE)):
        c = LOOKALIKE_CLASSES[rng.integers(len(LOOKALIKE_CLASSES))]
        spans = lookalike_spans(c)
        lo, hi = spans[rng.integers(len(spans))]
        width = (hi - lo) * rng.uniform(0.4, 1.0)
        start = rng.uniform(lo, hi - width)
        out.append((int(c), start, start + width, rng.uniform(0.5, 1.5)))
    return out


def lookalike_signal(num_slices: int, embed_dim: int, rng: np.random.Generator,
                     signal_strength: float = 1.0) -> np.ndarray:
    """[N, D] label-free bumps along class directions OUTSIDE those classes' z-ranges.

    Like a calcified node away from the coronaries: the same appearance means nothing in the
    wrong place. A globally pooled volume cannot tell these from lesions; zones can.
    """
    classes = world(embed_dim).classes
    u = np.linspace(0.0, 1.0, num_slices)
    amplitude = LESION_AMPLITUDE * signal_strength * np.sqrt(embed_dim) / np.sqrt(32.0)
    signal = np.zeros((num_slices, embed_dim))
    for c, start, end, strength in lookalikes(rng):
        signal += amplitude * strength * np.outer(_bump(u, start, end), classes[c])
    return signal


def make_slices(labels: np.ndarray, num_slices: int, embed_dim: int, rng: np.random.Generator,
                signal_strength: float = 1.0) -> np.ndarray:
    """[N, D] float32 slice embeddings for a volume with these labels."""
    w = world(embed_dim)
    u = np.linspace(0.0, 1.0, num_slices)
    start, end = rng.uniform(-0.05, 0.05), rng.uniform(0.95, 1.05)
    t = start + (end - start) * u                              # anatomical position (coverage jitter)
    centers = np.linspace(0.0, 1.0, NUM_ANATOMY_DIRECTIONS)
    anatomy = np.exp(-0.5 * ((t[:, None] - centers[None, :]) / 0.12) ** 2)      # [N, A]
    x = anatomy @ w.anatomy
    x += rng.normal(0, 0.3, len(w.patient)) @ w.patient        # patient offset, constant over z
    for _ in range(rng.integers(0, 3)):                        # benign, label-free variation
        lo = rng.uniform(0, 0.8)
        x += rng.uniform(0.5, 1.5) * np.outer(_bump(u, lo, lo + rng.uniform(0.05, 0.2)),
                                              w.benign[rng.integers(len(w.benign))])
    x += lesion_signal(labels, num_slices, embed_dim, rng, signal_strength)
    x += lookalike_signal(num_slices, embed_dim, rng, signal_strength)
    x += rng.normal(0.0, NOISE_STD, x.shape)
    return x.astype(np.float32)


# Random streams: the two splits, and "pretrain", label sets and reports for the phase-0 stand-in's
# corpus (text only; disjoint from both splits).
STREAM_IDS = {**SPLIT_IDS, "pretrain": len(SPLIT_IDS)}


def volume_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_IDS[split], index])


def sample_volume_text(seed: int, split: str, index: int) -> dict:
    """Labels, report, impression and geometry of one volume (no slices: cheap)."""
    rng = volume_rng(seed, split, index)
    labels = sample_labels(rng)
    report, impression = write_report(labels, random.Random(int(rng.integers(2**63))))
    return {"labels": labels, "report": report, "impression": impression, "rng": rng}


def volume_name(split: str, index: int) -> str:
    return f"{split}_{index + 1}_a_1.nii.gz"


class SyntheticSource:
    """grain RandomAccessDataSource: `source[i]` is a volume record, a pure function of (seed, split, i).

    Records are kept once made (up to MEMO_BYTES of slices, read-only): making a volume costs ~2 ms of
    CPU, which every epoch would pay again on the cores the training step needs (every epoch of
    every phase reads the same training volumes again).
    """

    MEMO_BYTES = 512 << 20

    def __init__(self, config, split: str):
        if split not in SPLIT_IDS:
            raise records.DataError(f"split {split!r}: synthetic splits are {tuple(SPLIT_IDS)}")
        lo, hi = int(config.min_synthetic_slices), int(config.max_synthetic_slices)
        if not 1 <= lo <= hi:
            raise records.DataError(f"data.min_synthetic_slices={lo}, max_synthetic_slices={hi}: "
                                    "need 1 <= min <= max")
        self.split, self.seed = split, int(config.seed)
        self.slice_range = (lo, hi)
        self.embed_dim = int(config.embed_dim)
        self.signal_strength = float(config.signal_strength)
        self.limits = records.SliceLimits(self.embed_dim, config.max_slices, config.over_max_slices)
        self.slice_dtype = np.dtype(config.slice_dtype)
        self.skip_bad_records = bool(config.skip_bad_records)
        self.length = int(config.num_train if split == "train" else config.num_valid)
        self._memo: dict[int, dict] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:      # worker processes make their own records
        return {**self.__dict__, "_memo": {}, "_memo_bytes": 0}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic {self.split} index {index} out of range [0, {self.length})")
        if index in self._memo:
            return dict(self._memo[index])
        record = self._make(index)
        size = record["slices"].nbytes if "slices" in record else 0
        if self._memo_bytes + size <= self.MEMO_BYTES:
            for key in ("slices", "z_mm", "labels"):
                if key in record:
                    record[key].flags.writeable = False
            self._memo[index] = record
            self._memo_bytes += size
        return dict(record)

    def _make(self, index: int) -> dict:
        volume = sample_volume_text(self.seed, self.split, index)
        rng = volume["rng"]
        n = int(rng.integers(self.slice_range[0], self.slice_range[1] + 1))
        spacing = float(rng.choice(Z_SPACINGS_MM))
        slices = make_slices(volume["labels"], n, self.embed_dim, rng, self.signal_strength)
        z_mm = np.arange(n, dtype=np.float32) * np.float32(spacing)
        name = volume_name(self.split, index)
        try:    # only the over-max "error" policy can fail here
            slices, z_mm, subsampled = records.check_slices(slices, z_mm, self.limits, f"synthetic {name}")
        except records.DataError as e:
            if not self.skip_bad_records:
                raise
            return records.bad_record(index, name, str(e))
        return {"volume_name": name, "index": index, "slices": slices.astype(self.slice_dtype),
                "z_mm": z_mm, "labels": volume["labels"], "report": volume["report"],
                "impression": volume["impression"], "z_spacing": spacing, "subsampled": subsampled}

    def texts(self) -> tuple[list[str], list[np.ndarray]]:
        """(reports, [C] labels) of every volume of the split, without making any slice."""
        volumes = [sample_volume_text(self.seed, self.split, i) for i in range(self.length)]
        return [v["report"] for v in volumes], [np.asarray(v["labels"]) for v in volumes]

    def __repr__(self) -> str:
        return f"SyntheticSource(split={self.split!r}, n={self.length}, seed={self.seed}, D={self.embed_dim})"


# ----------------------------------------------------------------------------------------
# Writing the CT-RATE layout.

CTRATE_FILES = {  # split -> (reports, labels, metadata) relative paths, as CT-RATE names them
    "train": ("radiology_text_reports/train_reports.csv", "multi_abnormality_labels/train_predicted_labels.csv",
              "metadata/train_metadata.csv"),
    "valid": ("radiology_text_reports/validation_reports.csv",
              "multi_abnormality_labels/valid_predicted_labels.csv", "metadata/validation_metadata.csv"),
}


def write_ctrate_layout(out: str, config, file_format: str = "npy", dtype: str = "float16") -> None:
    """Write both splits of the synthetic source under `out` in the CT-RATE layout.

    Embeddings go to embeddings/<split>/<VolumeName without .nii.gz>.npy ([N, D] `dtype`) or
    .npz (`embeddings` + `z_mm`).
    """
    from tqdm import tqdm

    if file_format not in ("npy", "npz"):
        raise records.DataError(f"--format={file_format!r}: use npy or npz")
    for split, (reports_path, labels_path, metadata_path) in CTRATE_FILES.items():
        source = SyntheticSource(config, split)
        emb_dir = os.path.join(out, "embeddings", split)
        for path in (reports_path, labels_path, metadata_path):
            os.makedirs(os.path.dirname(os.path.join(out, path)), exist_ok=True)
        os.makedirs(emb_dir, exist_ok=True)
        with open(os.path.join(out, reports_path), "w", newline="", encoding="utf-8") as f_rep, \
                open(os.path.join(out, labels_path), "w", newline="", encoding="utf-8") as f_lab, \
                open(os.path.join(out, metadata_path), "w", newline="", encoding="utf-8") as f_meta:
            reports, labels, metadata = csv.writer(f_rep), csv.writer(f_lab), csv.writer(f_meta)
            reports.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                              "Impressions_EN"])
            labels.writerow(["VolumeName", *findings.CLASS_NAMES])
            metadata.writerow(["VolumeName", "Manufacturer", "XYSpacing", "ZSpacing", "Rows", "Columns"])
            for i in tqdm(range(len(source)), desc=f"synthetic {split}", disable=len(source) < 200):
                record = source[i]
                name, stem = record["volume_name"], record["volume_name"][: -len(".nii.gz")]
                reports.writerow([name, "Not given.", "Non-contrast chest CT, axial images.",
                                  record["report"], record["impression"]])
                labels.writerow([name, *record["labels"].tolist()])
                metadata.writerow([name, "SYNTHETIC", "[0.75, 0.75]", record["z_spacing"], 512, 512])
                slices = record["slices"].astype(dtype)
                if file_format == "npy":
                    np.save(os.path.join(emb_dir, stem + ".npy"), slices)
                else:
                    np.savez(os.path.join(emb_dir, stem + ".npz"), embeddings=slices, z_mm=record["z_mm"])
        logging.info("synthetic: wrote %d %s volumes under %s", len(source), split, out)


def _define_flags():
    flags.DEFINE_string("out", None, "Output folder (CT-RATE layout).")
    flags.DEFINE_integer("num_volumes", 256, "Training volumes.")
    flags.DEFINE_integer("num_valid", None, "Validation volumes (default num_volumes // 4).")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_integer("embed_dim", 1024, "Slice embedding width D.")
    flags.DEFINE_integer("min_slices", 80, "Fewest slices per volume.")
    flags.DEFINE_integer("max_slices", 240, "Most slices per volume.")
    flags.DEFINE_enum("format", "npy", ["npy", "npz"], "Embedding file format.")
    flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Embedding dtype on disk.")


def main(argv) -> None:
    del argv
    from kervljepa_jax.data import default_data_config

    FLAGS = flags.FLAGS
    if not FLAGS.out:
        raise app.UsageError("--out is required: the folder to write the CT-RATE layout into")
    config = default_data_config()
    config.num_train = FLAGS.num_volumes
    config.num_valid = FLAGS.num_valid if FLAGS.num_valid is not None else max(1, FLAGS.num_volumes // 4)
    config.seed, config.embed_dim = FLAGS.seed, FLAGS.embed_dim
    config.min_synthetic_slices, config.max_synthetic_slices = FLAGS.min_slices, FLAGS.max_slices
    config.max_slices = max(config.max_slices, FLAGS.max_slices)
    config.slice_dtype = "float32"
    try:
        write_ctrate_layout(FLAGS.out, config, FLAGS.format, FLAGS.dtype)
    except records.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
