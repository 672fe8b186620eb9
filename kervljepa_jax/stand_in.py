"""The packaged stand-in for a pretrained Llama: the tiny decoder, pretrained once on synthetic text.

Llama 3.2 3B arrives knowing radiology English and following its prompt; the curriculum's four
phases start from it and never pay for its pretraining. The embedded default does the same with
the tiny preset: it starts from the stand-in shipped in `kervljepa_jax/assets/stand_in_llm` (a HF
Llama folder with its byte-level BPE tokenizer and a provenance.json), copied into WORKDIR/base_llm
and loaded from there exactly like a real checkpoint.

    python -m kervljepa_jax.stand_in --out=kervljepa_jax/assets/stand_in_llm    # rebuild (~70 min, 2 cores)

What it learned from (text only, no slice): the reports of synthetic volumes of the "pretrain"
stream and findings-by-name conversations about them (the user turn names a volume's positive
findings, the answer is its positive-findings text; `text.findings_by_name_chat`). That stream is
disjoint from the train and valid splits. Why this matters (docs/embedded_profile.md, "What the
packaged stand-in buys"): a stand-in pretrained for the default's 300 steps on the training split
ignores its prompt, and phase 3 then has to teach the tiny decoder both to follow a prompt and to
read the visual tokens.

Staleness: provenance.json holds a fingerprint of the synthetic text generator (a fixed sample of
the corpus). When the generator's sentences change, the packaged model no longer matches; the
trainer then warns and falls back to phase 0 in the workdir (`model.stand_in=phase0`), and
tests/test_stand_in.py fails until the stand-in is rebuilt with the command above.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib, data as data_lib
from kervljepa_jax.data import pipeline as pipeline_lib, synthetic
from kervljepa_jax.data import text as text_lib
from kervljepa_jax.training import pretrain

PACKAGED_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "stand_in_llm"
PROVENANCE = "provenance.json"
CHOICES = ("packaged", "phase0")   # config.model.stand_in
STREAM = "pretrain"

# The recipe of the packaged stand-in (what it buys against shorter recipes: docs/embedded_profile.md,
# "What the packaged stand-in buys"; measured by benchmarks/stand_in_llm.py).
RECIPE = dict(steps=8000, lr=3e-3, batch=8, seq_len=384, num_reports=4096, num_chats=32768,
              vocab_size=2048, seed=0)


def volume_texts(seed: int, count: int) -> list[dict]:
    """Labels and report of the first `count` volumes of the pretrain stream (no slices)."""
    return [synthetic.sample_volume_text(seed, STREAM, i) for i in range(count)]


def fixed_texts() -> list[str]:
    """The tokenizer's fixed texts (prompt, normal and fallback sentences) for the default 32 tokens."""
    return pipeline_lib.tokenizer_fixed_texts(data_lib.default_data_config().num_visual_tokens)


def corpus(seed: int, num_reports: int, num_chats: int) -> tuple[list[str], list[str]]:
    """(reports, documents): the first `num_reports` reports of the pretrain stream, and those reports
    plus `num_chats` findings-by-name conversations, shuffled for packing."""
    rng = np.random.default_rng(seed)
    volumes = volume_texts(seed, max(num_reports, num_chats))
    reports = [v["report"] for v in volumes[:num_reports]]
    chats = [text_lib.findings_by_name_conversation(v["report"], v["labels"], rng) for v in volumes[:num_chats]]
    documents = reports + chats
    return reports, [documents[i] for i in rng.permutation(len(documents))]


def fingerprint(seed: int) -> str:
    """sha256 of a fixed sample of the corpus: changes whenever the synthetic text generator does."""
    reports, documents = corpus(seed, 16, 16)
    blob = "\n".join([*fixed_texts(), *reports, *documents])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_provenance(folder: os.PathLike | str) -> dict | None:
    path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stale_reason(folder: os.PathLike | str = PACKAGED_DIR) -> str:
    """"" when `folder` holds a stand-in built from today's text generator, else why not."""
    provenance = read_provenance(folder)
    if provenance is None or not os.path.isfile(os.path.join(folder, "config.json")):
        return f"{folder} holds no stand-in (config.json and {PROVENANCE} expected)"
    if provenance.get("fingerprint") != fingerprint(int(provenance.get("recipe", {}).get("seed", 0))):
        return f"{folder} was built from an older synthetic text generator (fingerprint differs)"
    return ""


def wanted(config) -> bool:
    """Does this config start from the packaged stand-in? (tiny preset, synthetic data, neither an
    llm_path nor a tokenizer_path: the stand-in's embeddings belong to its own tokenizer)."""
    choice = str(config.model.stand_in)
    if choice not in CHOICES:
        raise ValueError(f"--config.model.stand_in={choice!r}: use one of {', '.join(CHOICES)}")
    return (choice == "packaged" and not config.model.llm_path and not config.data.tokenizer_path
            and config.model.preset == "tiny" and config.data.source == "synthetic")


def install(dest: str, source: os.PathLike | str = PACKAGED_DIR) -> bool:
    """Copy the packaged stand-in to `dest` (WORKDIR/base_llm) unless a base LLM is already there.

    Returns True when `dest` now holds the packaged stand-in; False (with a warning) when it is
    stale or missing, so that the caller runs phase 0 instead.
    """
    if os.path.isfile(os.path.join(dest, "config.json")):
        return read_provenance(dest) is not None
    reason = stale_reason(source)
    if reason:
        logging.warning("stand-in: %s; running phase 0 in the workdir instead. Rebuild it with "
                        "`python -m kervljepa_jax.stand_in --out=%s`", reason, source)
        return False
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dest)), prefix="base_llm.")
    shutil.copytree(source, staging, dirs_exist_ok=True)
    try:
        os.replace(staging, dest)       # atomic: another process (host) never sees half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)   # another process installed it first
    logging.info("stand-in: copied the packaged base LLM %s -> %s", source, dest)
    return True


def build(out: str, recipe: dict) -> dict:
    """Train the BPE and the tiny decoder on the pretrain stream with `recipe` (the keys of RECIPE);
    write the HF folder + provenance to `out`."""
    from kervljepa_jax.data import tokenizer as tokenizers

    if set(recipe) != set(RECIPE):
        raise ValueError(f"stand_in.build: recipe keys {sorted(recipe)} != {sorted(RECIPE)}")
    t0, r = time.time(), recipe
    reports, documents = corpus(r["seed"], r["num_reports"], r["num_chats"])
    tokenizer = tokenizers.train_bpe(fixed_texts() + reports, r["vocab_size"])
    staging = f"{out.rstrip('/')}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    loss = pretrain.pretrain_llm("tiny", tokenizer, documents, staging, steps=r["steps"], lr=r["lr"],
                                batch=r["batch"], seq_len=r["seq_len"], seed=r["seed"])
    provenance = {"fingerprint": fingerprint(r["seed"]), "recipe": recipe, "final_lm_loss": round(loss, 4),
                  "documents": len(documents), "build_seconds": round(time.time() - t0, 1),
                  "command": "python -m kervljepa_jax.stand_in " + " ".join(f"--{k}={v}" for k, v in recipe.items())}
    with open(os.path.join(staging, PROVENANCE), "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return provenance


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags. Not at import: training.run imports this module, so train, evaluate and
    export would get these flags (export's own --out would clash)."""
    flags.DEFINE_string("out", None, "Folder to write the stand-in to (e.g. kervljepa_jax/assets/stand_in_llm).")
    for name, value in RECIPE.items():
        (flags.DEFINE_float if isinstance(value, float) else flags.DEFINE_integer)(
            name, value, f"Recipe: {name} (packaged stand-in: {value}).")


def main(argv):
    del argv
    if not FLAGS.out:
        cli_lib.fail("stand_in", "--out is required: the folder to write the stand-in to", 2)
    bad = [k for k in RECIPE if k != "seed" and getattr(FLAGS, k) <= 0]
    if bad:
        cli_lib.fail("stand_in", f"--{bad[0]}={getattr(FLAGS, bad[0])} must be positive", 2)
    if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
        cli_lib.fail("stand_in", f"--out={FLAGS.out} is a file; pass a folder", 2)
    cli_lib.ensure_parent("stand_in", "out", FLAGS.out)   # before an hour of training, not after
    provenance = build(FLAGS.out, {k: getattr(FLAGS, k) for k in RECIPE})
    print(json.dumps(provenance))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("stand_in"))
