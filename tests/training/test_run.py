"""The shared run set-up: phase-0 corpus and packing, the stand-in base LLM (checked against
transformers), the per-run caches (pipelines, compiled samplers) and the mesh layout checks."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kervljepa_jax.data import synthetic
from kervljepa_jax.data import text as text_lib
from kervljepa_jax.training import config as config_lib
from kervljepa_jax.training import run as run_lib

def test_pack_documents_starts_every_row_at_a_document():
    ids, mask = run_lib.pack_documents([[1, 2], [3], [4, 5, 6], [7, 8, 9, 10, 11]], eot=0, seq_len=5, pad=-1)
    # "1 2 0 3 0" fills a row; "4 5 6 0" would not fit after it, so it opens the next row (padded);
    # the 6-token "7..11 0" is cut to the row.
    np.testing.assert_array_equal(ids, [[1, 2, 0, 3, 0], [4, 5, 6, 0, -1], [7, 8, 9, 10, 11]])
    np.testing.assert_array_equal(mask, ids != -1)
    assert ids.dtype == np.int32
    with pytest.raises(run_lib.TrainError, match="corpus is empty"):
        run_lib.pack_documents([], eot=0, seq_len=64)


def test_pretraining_corpus_is_every_report_plus_a_findings_by_name_chat_per_volume(tiny_config):
    data = tiny_config().data
    reports, labels = run_lib.training_texts(data)
    assert len(reports) == len(labels) == 24
    corpus = run_lib.pretraining_corpus(data, seed=0)
    assert corpus == run_lib.pretraining_corpus(data, seed=0)                  # deterministic
    assert sorted(d for d in corpus if d in set(reports)) == sorted(reports)
    chats = [d for d in corpus if d not in set(reports)]
    assert len(chats) == 24 and all(d.endswith(text_lib.EOT) for d in chats)
    assert corpus != run_lib.pretraining_corpus(data, seed=1)                  # shuffled by the seed


def test_pretraining_corpus_extra_chats_come_from_outside_both_splits(tiny_config):
    data = tiny_config().data
    base = run_lib.pretraining_corpus(data, seed=0)
    corpus = run_lib.pretraining_corpus(data, seed=0, extra_chats=5)
    extra = list((collections.Counter(corpus) - collections.Counter(base)).elements())  # normal chats repeat
    assert len(corpus) == len(base) + 5 and len(extra) == 5
    assert all("Findings:" in d and d.endswith(text_lib.EOT) for d in extra)
    split_reports = {synthetic.sample_volume_text(int(data.seed), s, i)["report"] for s in ("train", "valid")
                     for i in range(5)}
    assert split_reports.isdisjoint(synthetic.sample_volume_text(int(data.seed), "pretrain", i)["report"]
                                    for i in range(5))
    with pytest.raises(run_lib.TrainError, match="pretrain_chats=5"):
        run_lib.pretraining_corpus(config_lib.apply_overrides(tiny_config(), {"data.source": "ctrate"}).data,
                                   seed=0, extra_chats=5)


@pytest.fixture
def run(tiny_run):
    return tiny_run                      # the session's Run (conftest.py)


def test_phase_zero_writes_a_base_llm_that_transformers_loads_with_the_same_logits(run):
    """The stand-in LLM is saved as a HF folder and reloaded like a real Llama: transformers'
    LlamaForCausalLM must give our logits (LoRA is zero-initialised, so it does not change them)."""
    from kervljepa_jax.model import llama as llama_lib

    folder = f"{run.workdir}/base_llm"
    ids = np.array([[1, 5, 9, 42, 7, 3]], np.int32)
    ours = llama_lib.Llama(run.llm_cfg).apply({"params": run.llm_params}, jnp.asarray(ids)).logits
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    vocab = hf_model.config.vocab_size
    np.testing.assert_allclose(np.asarray(ours)[..., :vocab], theirs, atol=2e-4, rtol=2e-4)
    rows = [json.loads(line) for line in open(f"{run.workdir}/metrics.jsonl")]
    assert [r["step"] for r in rows if r["phase"] == 0] == [0, 2]          # every 20 steps and the last


def test_injection_layers_come_from_the_config_else_the_preset(run, tiny_config):
    assert run.llm_cfg.injection_layers == (1,)                                   # the tiny preset's
    cfg, params = run_lib.load_base_llm(tiny_config(**{"model.injection_layers": "(0, 2)"}), run.tokenizer,
                                        run.workdir, run.log)
    assert cfg.injection_layers == (0, 2)
    assert jax.tree.leaves(params) and cfg.segments == ((0, 0), (1, 2), (3, 3))
    with pytest.raises(run_lib.TrainError, match=r"--config.model.injection_layers: .*\[0, 2\]"):
        run_lib.load_base_llm(tiny_config(**{"model.injection_layers": "(3,)"}), run.tokenizer, run.workdir, run.log)


def test_run_reuses_pipelines_and_compiled_samplers(run, tiny_config):
    config = tiny_config()
    assert run.pipeline(config, "valid", shuffle=False) is run.pipeline(config, "valid", shuffle=False)
    assert run.pipeline(config, "valid", shuffle=False) is not run.pipeline(config, "valid", shuffle=True)
    assert run.report_generator(config) is run.report_generator(tiny_config(phase=4))   # same sampling settings
    assert run.report_generator(config) is not run.report_generator(tiny_config(**{"eval.top_p": "0.5"}))
    assert run_lib.sampling_config(config).max_new_tokens == 4


def test_restored_variables_place_params_and_alpha_on_the_mesh(run):
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), run.abstract_params)
    variables = run.place(run_lib.restored_variables(params, 2.5))
    assert run_lib.alpha_of(variables) == 2.5
    assert run_lib.alpha_of(run_lib.restored_variables(params, None)) == 1.0     # no alpha saved: identity
    leaf = variables["params"]["compressor"]["queries"]
    assert leaf.sharding.mesh.shape == run.mesh.shape


def test_tokenizer_config_prefers_the_base_llms_own_tokenizer(tmp_path, tiny_config):
    config = tiny_config()
    base = tmp_path / "base_llm"
    assert run_lib.tokenizer_config(config, str(base)) is config.data                   # none there yet: BPE
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    assert run_lib.tokenizer_config(config, str(base)).tokenizer_path == str(base)
    assert config.data.tokenizer_path == ""                                               # not mutated
    given = tiny_config(**{"data.tokenizer_path": "/models/llama"})
    assert run_lib.tokenizer_config(given, str(base)).tokenizer_path == "/models/llama"


def test_check_layout_names_the_mesh_or_batch_that_cannot_work():
    from kervljepa_jax.training import config as config_lib
    from kervljepa_jax.training.run import TrainError, check_layout
    config = config_lib.load_phase_config(3, "paper")
    assert config.mesh == "fsdp:-1" and config_lib.load_phase_config(3).mesh == "data:-1"
    assert check_layout(config, num_devices=8) == {"data": 1, "fsdp": 8, "tensor": 1}
    config.mesh = "data:4"
    with pytest.raises(TrainError, match=r"--config.mesh='data:4': data\*fsdp\*tensor = 4 but 8 devices"):
        check_layout(config, num_devices=8)
    config.mesh, config.train.batch_size = "data:2,fsdp:2,tensor:2", 6
    with pytest.raises(TrainError, match="--config.train.batch_size=6: the global batch must divide by the mesh's 4"):
        check_layout(config, num_devices=8)
