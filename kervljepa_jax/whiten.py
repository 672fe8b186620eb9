"""PCA whitening of the frozen LLM's text embeddings (paper III-B4): `python -m kervljepa_jax.whiten`.

    python -m kervljepa_jax.whiten --workdir=DIR [--config=configs/phase1.py[:paper]] \\
        [--config.model.llm_path=HF_DIR --config.data.root=... ...] [--overwrite]

Embeds the training split's texts that `model.whiten_texts` names (the reports, as the paper; or
the text targets, the embedded profile) with the base LLM (hidden layer `model.whiten_layer`,
mean-pooled, exactly as the training batches carry them), fits the top-min(`model.jepa_dim`, LLM
width) PCA whitening, writes DIR/whitening.npz (what every phase then loads) and prints one JSON line:
mean pairwise cosine, d' and retained variance before and after (paper Table I: 0.949 -> ~0,
d' 1.36 -> 16.03, 97.3%). `python -m kervljepa_jax.train` does the same at the start of the first
phase it trains when DIR has no whitening.npz; an existing one is kept unless --overwrite.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from kervljepa_jax import cli as cli_lib
from kervljepa_jax import whitening as whitening_lib
from kervljepa_jax.data.records import DataError
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training.run import Run, TrainError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Only when run as a program: an import (tests, a notebook) must not define --workdir and
    --config, which train and evaluate define too."""
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Run folder: whitening.npz goes here (and the base LLM copy).")
    flags.DEFINE_bool("overwrite", False, "Refit when DIR/whitening.npz exists (default: keep it and stop).")
    try:  # config_flags applies --config.a.b=v at definition: a missing field fails here
        cli_lib.hold_out_list_overrides(sys.argv, config_lib.load_phase_config(1))
        config_flags.DEFINE_config_file("config", str(config_lib.CONFIGS_DIR / "phase1.py"),
                                        "Phase config file[:arg] whose data and model settings to use.")
    except (KeyError, AttributeError) as error:
        cli_lib.bad_config_field(cli_lib.program_name(), sys.argv, error)


def whiten(config, workdir: str, overwrite: bool = False) -> dict:
    """Fit and save WORKDIR/whitening.npz; the before/after figures."""
    path = os.path.join(workdir, "whitening.npz")
    if os.path.isfile(path) and not overwrite:
        raise TrainError(f"{path} exists (training loads it); pass --overwrite to refit it")
    run = Run(config, workdir)
    w, stats, _ = run.targets.fit_whitening(config, run.pipeline(config, "train"))
    whitening_lib.save(w, path)
    logging.info("whitening -> %s", path)
    return {"path": path, "layer": run.targets.layer, **stats}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli_lib.fail("whiten", f"unexpected arguments {argv[1:]}; flags are --workdir, --config, --overwrite", 2)
    if not FLAGS.workdir:
        cli_lib.fail("whiten", "--workdir is required: where whitening.npz goes", 2)
    cli_lib.ensure_folder("whiten", "workdir", FLAGS.workdir)
    config = FLAGS.config
    try:
        config_lib.validate(config_lib.apply_overrides(config, cli_lib.held_out_overrides()))
        print(json.dumps(whiten(config, FLAGS.workdir, FLAGS.overwrite)))
    except (TrainError, DataError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"whiten: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli_lib.flags_parser("whiten"))
