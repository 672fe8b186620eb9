"""The packaged stand-in LLM: current with the text generator, loadable with its own tokenizer,
installed into a workdir once, rebuilt by its CLI; stale or absent -> phase 0 instead."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kervljepa_jax import hf, stand_in
from kervljepa_jax.data import tokenizer as tokenizers
from kervljepa_jax.training import config as config_lib


def test_packaged_stand_in_matches_todays_text_generator():
    """Fails when the synthetic sentences change: rebuild with `python -m kervljepa_jax.stand_in
    --out=kervljepa_jax/assets/stand_in_llm` (see its provenance.json for the recipe)."""
    assert stand_in.stale_reason() == ""
    provenance = stand_in.read_provenance(stand_in.PACKAGED_DIR)
    assert provenance["recipe"] == stand_in.RECIPE


def test_packaged_stand_in_loads_with_a_tokenizer_of_its_own_vocabulary():
    tokenizer = tokenizers.load_hf(str(stand_in.PACKAGED_DIR))
    cfg, params = hf.load_llama(str(stand_in.PACKAGED_DIR))
    assert cfg.vocab_size == tokenizers.vocab_size(tokenizer) == params["model"]["embed_tokens"]["weight"].shape[0]
    ids = tokenizers.special_ids(tokenizer)
    prompt = tokenizer(stand_in.fixed_texts()[0], add_special_tokens=False)["input_ids"]
    assert prompt.count(ids["visual"]) == 32 and max(prompt) < cfg.vocab_size


def test_fingerprint_follows_the_corpus():
    assert stand_in.fingerprint(0) == stand_in.fingerprint(0)
    assert stand_in.fingerprint(0) != stand_in.fingerprint(1)       # another pretrain stream
    reports, documents = stand_in.corpus(0, 3, 5)
    assert len(reports) == 3 and len(documents) == 8 and set(reports) <= set(documents)
    assert sum(d.endswith("<|eot_id|>") for d in documents) == 5


def _config(**overrides):
    return config_lib.apply_overrides(config_lib.load_phase_config(3), overrides)


def test_wanted_only_for_the_tiny_preset_on_synthetic_data_without_an_llm_path():
    assert stand_in.wanted(_config())
    assert not stand_in.wanted(_config(**{"model.stand_in": "phase0"}))
    assert not stand_in.wanted(_config(**{"model.llm_path": "/models/llama"}))
    assert not stand_in.wanted(_config(**{"data.source": "ctrate"}))
    assert not stand_in.wanted(_config(**{"data.tokenizer_path": "/models/llama"}))   # phase 0 with that one
    with pytest.raises(ValueError, match="model.stand_in='pretrained'"):
        stand_in.wanted(_config(**{"model.stand_in": "pretrained"}))


def test_install_copies_once_and_refuses_a_stale_stand_in(tmp_path):
    dest = tmp_path / "w" / "base_llm"
    dest.parent.mkdir()
    assert stand_in.install(str(dest))
    assert sorted(os.listdir(dest)) == sorted(os.listdir(stand_in.PACKAGED_DIR))
    assert stand_in.install(str(dest))                                  # already there: kept
    stale = tmp_path / "stale"
    shutil.copytree(stand_in.PACKAGED_DIR, stale)
    provenance = json.loads((stale / stand_in.PROVENANCE).read_text())
    (stale / stand_in.PROVENANCE).write_text(json.dumps({**provenance, "fingerprint": "0" * 64}))
    assert "older synthetic text generator" in stand_in.stale_reason(stale)
    other = tmp_path / "v" / "base_llm"
    other.parent.mkdir()
    assert not stand_in.install(str(other), source=stale) and not other.exists()
    assert "holds no stand-in" in stand_in.stale_reason(tmp_path)


def test_cli_builds_a_current_hf_folder(tmp_path):
    """Through `python -m kervljepa_jax.stand_in`, the documented rebuild command."""
    out = tmp_path / "stand_in"
    recipe = dict(steps=3, lr=1e-3, batch=2, seq_len=64, num_reports=8, num_chats=8, vocab_size=400, seed=0)
    cli = subprocess.run([sys.executable, "-m", "kervljepa_jax.stand_in", f"--out={out}",
                          *(f"--{k}={v}" for k, v in recipe.items())], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    provenance = json.loads(cli.stdout.strip().splitlines()[-1])
    assert provenance == json.loads((out / stand_in.PROVENANCE).read_text())
    assert stand_in.stale_reason(out) == ""
    assert provenance["recipe"]["steps"] == 3 and np.isfinite(provenance["final_lm_loss"])
    cfg, _ = hf.load_llama(str(out))
    assert cfg.vocab_size == tokenizers.vocab_size(tokenizers.load_hf(str(out)))
    assert not (tmp_path / "stand_in.partial").exists()


def test_cli_without_out_is_a_one_line_usage_error():
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.stand_in", "--steps=0"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "stand_in: --out is required: the folder to write the stand-in to"]


@pytest.mark.slow
def test_packaged_stand_in_writes_the_findings_its_prompt_names(tmp_path):
    """The point of packaging it: unlike the embedded 300-step phase 0 (names F1 ~0.25, the same answer
    NLL under its own and another volume's names), the packaged stand-in follows its prompt."""
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "stand_in_llm.py")
    out = subprocess.run([sys.executable, bench, f"--workdir={tmp_path}"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["names_macro_f1"] >= 0.9, figures                   # 0.963 measured
    assert figures["answer_nll_own_names"] < 0.6 * figures["answer_nll_other_names"], figures   # 0.344 vs 0.800
