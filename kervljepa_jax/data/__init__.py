"""Data: CT-RATE and synthetic sources, report text building, tokenizer, grain pipeline.

`default_data_config()` is the `config.data` block every phase config embeds; override any field
on the command line, e.g. `--config.data.source=ctrate --config.data.root=/data/ct-rate`.
"""

from __future__ import annotations

import ml_collections

SPLITS = ("train", "valid")


def default_data_config() -> ml_collections.ConfigDict:
    """The data block. Paths under `root` follow the CT-RATE distribution layout."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"            # synthetic (embedded default) | ctrate
    c.root = ""                       # CT-RATE root folder (source=ctrate)
    # Relative paths are resolved under `root`; absolute paths are used as they are.
    c.reports_csv = ml_collections.ConfigDict({
        "train": "radiology_text_reports/train_reports.csv",
        "valid": "radiology_text_reports/validation_reports.csv"})
    c.labels_csv = ml_collections.ConfigDict({
        "train": "multi_abnormality_labels/train_predicted_labels.csv",
        "valid": "multi_abnormality_labels/valid_predicted_labels.csv"})
    c.metadata_csv = ml_collections.ConfigDict({
        "train": "metadata/train_metadata.csv",
        "valid": "metadata/validation_metadata.csv"})
    c.embeddings_dir = ml_collections.ConfigDict({
        "train": "embeddings/train",
        "valid": "embeddings/valid"})
    c.embed_dim = 1024                # d_v of the slice encoder
    c.max_slices = 600                # N_max; batches are padded to it
    c.over_max_slices = "subsample"   # subsample (uniform, counted) | error
    c.slice_dtype = "float16"         # host/batch dtype of slices (the model casts); float16 | float32
    c.skip_bad_records = False        # False: first bad record raises; True: counted skips per epoch
    # Synthetic CT-RATE stand-in.
    c.min_synthetic_slices = 80
    c.max_synthetic_slices = 240
    c.num_train = 2048
    c.num_valid = 256
    c.signal_strength = 1.0           # scale of the per-class slice signal (1.0: synthetic.LESION_AMPLITUDE as tuned there; the embedded profile uses 2.0)
    c.seed = 0
    # Text.
    c.text_mode = "positive_findings"  # positive_findings (phases 2-3) | raw (phase 4: Findings_EN)
    c.max_tokens = 256                 # chat sequence length (prompt + response), fixed
    c.max_condition_tokens = 48        # per-condition text length (MMD / InfoNCE targets)
    c.num_visual_tokens = 32
    c.cache_text = True                # keep each volume's lexicon/tokenizer work across epochs (a few KB each)
    c.tokenizer_path = ""              # HF tokenizer folder; "" = BPE trained on the synthetic corpus
    c.tokenizer_vocab_size = 2048      # BPE vocab for the embedded default
    c.workdir = "/tmp/kervljepa_jax"   # where the trained BPE tokenizer is cached
    # Loader.
    c.batch_size = 8                   # global batch size (all processes together)
    c.num_workers = 0                  # grain worker processes (0 = in-process)
    c.read_threads = 8                 # grain threads reading records in each worker
    c.shuffle = True
    # Repeat-factor sampling of the train split (LVIS, Gupta et al. 2019; not in the paper): a class
    # in a fraction f of the volumes gets r = max(1, sqrt(t / f)), a volume the largest r of its
    # findings; each epoch draws that many copies and keeps N. 0 = off (a plain shuffle).
    c.repeat_factor_threshold = 0.0
    c.drop_remainder = True
    return c
