"""`python -m kervljepa_jax.parity`: our Llama against transformers on the same weights, and its
one-line errors."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kervljepa_jax import parity  # noqa: E402


def test_compare_on_a_tiny_random_llama_agrees_to_1e_4(tmp_path):
    parity._tiny_hf_llama(str(tmp_path / "tiny"), seed=0)
    result = parity.compare(str(tmp_path / "tiny"), "float32", batch=2, seq_len=16, seed=0)
    assert result["forward_max_abs_diff"] <= 1e-4 and result["decode_max_abs_diff"] <= 1e-4, result


def test_cli_mistakes_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {(f"--hf_path={empty}",): "no config.json there",
             ("--seq_len=2",): "seq_len >= 4",
             ("--dtype=float16",): "--dtype"}
    running = {args: subprocess.Popen([sys.executable, "-m", "kervljepa_jax.parity", *args], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in cases}
    for args, process in running.items():
        _, err = process.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1 and lines[0].startswith("parity: "), (args, err[-1500:])
        assert cases[args] in lines[0], (args, lines)
