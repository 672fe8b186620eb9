"""The shared run state: phase-0 corpus and packing, the stand-in base LLM (checked against
transformers) and the per-run caches (pipelines, compiled samplers)."""

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
from kervljepa_jax.training import step as step_lib

TINY = {"data.num_train": "24", "data.num_valid": "8", "data.min_synthetic_slices": "40",
        "data.max_synthetic_slices": "60", "data.max_slices": "60", "model.pretrain_steps": "3",
        "model.pretrain_batch_size": "4", "model.pretrain_seq_len": "64", "eval.max_new_tokens": "4",
        "model.stand_in": "phase0"}


def _config(phase=3, **extra):
    return config_lib.apply_overrides(config_lib.load_phase_config(phase), {**TINY, **extra})


def test_pack_documents_starts_every_row_at_a_document():
    ids, mask = run_lib.pack_documents([[1, 2], [3], [4, 5, 6], [7, 8, 9, 10, 11]], eot=0, seq_len=5, pad=-1)
    # "1 2 0 3 0" fills a row; "4 5 6 0" would not fit after it, so it opens the next row (padded);
    # the 6-token "7..11 0" is cut to the row.
    np.testing.assert_array_equal(ids, [[1, 2, 0, 3, 0], [4, 5, 6, 0, -1], [7, 8, 9, 10, 11]])
    np.testing.assert_array_equal(mask, ids != -1)
    assert ids.dtype == np.int32
    with pytest.raises(run_lib.TrainError, match="corpus is empty"):
        run_lib.pack_documents([], eot=0, seq_len=64)


def test_pretraining_corpus_is_every_report_plus_a_findings_by_name_chat_per_volume():
    data = _config().data
    reports, labels = run_lib.training_texts(data)
    assert len(reports) == len(labels) == 24
    corpus = run_lib.pretraining_corpus(data, seed=0)
    assert corpus == run_lib.pretraining_corpus(data, seed=0)                  # deterministic
    assert sorted(d for d in corpus if d in set(reports)) == sorted(reports)
    chats = [d for d in corpus if d not in set(reports)]
    assert len(chats) == 24 and all(d.endswith(text_lib.EOT) for d in chats)
    assert corpus != run_lib.pretraining_corpus(data, seed=1)                  # shuffled by the seed


def test_pretraining_corpus_extra_chats_come_from_outside_both_splits():
    data = _config().data
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
        run_lib.pretraining_corpus(config_lib.apply_overrides(_config(), {"data.source": "ctrate"}).data,
                                   seed=0, extra_chats=5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return run_lib.Run(_config(), str(workdir))


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


def test_injection_layers_come_from_the_config_else_the_preset(run):
    assert run.llm_cfg.injection_layers == (1,)                                   # the tiny preset's
    cfg, params = run_lib.load_base_llm(_config(**{"model.injection_layers": "(0, 2)"}), run.tokenizer,
                                        run.workdir, run.log)
    assert cfg.injection_layers == (0, 2)
    assert jax.tree.leaves(params) and cfg.segments == ((0, 0), (1, 2), (3, 3))
    with pytest.raises(run_lib.TrainError, match=r"--config.model.injection_layers: .*\[0, 2\]"):
        run_lib.load_base_llm(_config(**{"model.injection_layers": "(3,)"}), run.tokenizer, run.workdir, run.log)


def test_run_reuses_pipelines_and_compiled_samplers(run):
    config = _config()
    assert run.pipeline(config, "valid", shuffle=False) is run.pipeline(config, "valid", shuffle=False)
    assert run.pipeline(config, "valid", shuffle=False) is not run.pipeline(config, "valid", shuffle=True)
    assert run.report_generator(config) is run.report_generator(_config(phase=4))   # same sampling settings
    assert run.report_generator(config) is not run.report_generator(_config(**{"eval.top_p": "0.5"}))
    assert run_lib.sampling_config(config).max_new_tokens == 4


def test_restored_variables_place_params_and_alpha_on_the_mesh(run):
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), run.abstract_params)
    variables = run.place(run_lib.restored_variables(params, 2.5))
    assert run_lib.alpha_of(variables) == 2.5
    assert run_lib.alpha_of(run_lib.restored_variables(params, None)) == 1.0     # no alpha saved: identity
    leaf = variables["params"]["compressor"]["queries"]
    assert leaf.sharding.mesh.shape == run.mesh.shape


def test_tokenizer_config_prefers_the_base_llms_own_tokenizer(tmp_path):
    config = _config()
    base = tmp_path / "base_llm"
    assert run_lib.tokenizer_config(config, str(base)) is config.data                   # none there yet: BPE
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    assert run_lib.tokenizer_config(config, str(base)).tokenizer_path == str(base)
    assert config.data.tokenizer_path == ""                                               # not mutated
    given = _config(**{"data.tokenizer_path": "/models/llama"})
    assert run_lib.tokenizer_config(given, str(base)).tokenizer_path == "/models/llama"


def test_cached_text_targets_equal_what_the_step_embeds(run):
    # prepare_targets embeds every record's texts once; the batches then carry them, and the step
    # uses them instead of running the frozen LLM: the values must be the step's own.
    config = _config()
    run.prepare_targets(config, {"llm": run.llm_params})
    params = {"llm": run.llm_params}
    for split in ("train", "valid"):
        batch = next(iter(run.pipeline(config, split, shuffle=False).epoch(0)))
        assert {"target_embedding", "condition_embedding"} <= set(batch)
        bare = {k: v for k, v in batch.items() if not k.endswith("_embedding")}
        want_target = step_lib.report_targets(run.encoder, params, bare, run.whitening)
        want_cond = step_lib.condition_targets(run.encoder, params, bare, run.whitening)
        np.testing.assert_allclose(np.asarray(batch["target_embedding"]), np.asarray(want_target), atol=2e-4)
        present = np.asarray(batch["condition_valid"])
        assert present.any() and not np.asarray(batch["condition_embedding"])[~present].any()
        np.testing.assert_allclose(np.asarray(batch["condition_embedding"])[present],
                                   np.asarray(want_cond)[present], atol=2e-4)
        # The cached path returns the batch's arrays unchanged.
        assert step_lib.report_targets(run.encoder, params, batch, run.whitening) is batch["target_embedding"]
    # A fresh pipeline (another batch size) gets them too; turned off, none do.
    other = run.pipeline(_config(**{"train.batch_size": "4"}), "train")
    assert other.text_embeddings is not None
    off = run_lib.Run(_config(**{"train.cache_text_targets": "false"}), run.workdir)
    off.prepare_targets(_config(**{"train.cache_text_targets": "false"}), {"llm": off.llm_params})
    assert "target_embedding" not in next(iter(off.pipeline(config, "train").epoch(0)))


def test_frozen_compressor_tokens_are_what_the_step_computes(run):
    # Phase 3 freezes the compressor: its V' of every training volume is computed once and the
    # batches carry it. Without dropout the step's loss must be the same either way.
    from kervljepa_jax.model import vlm as vlm_lib
    from kervljepa_jax.training import phases as phases_lib

    config = _config()
    run.prepare_targets(config, {"llm": run.llm_params})
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    params = jax.tree.map(lambda s: 0.05 * jax.random.normal(next(keys), s.shape, s.dtype), run.abstract_params)
    variables = run.place(run_lib.restored_variables(params, 1.7))
    labels = phases_lib.trainable_labels(variables["params"], config.optimizer_groups, 3)
    table = run.compressor_tokens(config, variables["params"], labels)
    cfg = run.vcfg.compressor
    assert table.shape == (config.data.num_train, cfg.num_zones, cfg.d_visual) and np.abs(table).min(axis=(1, 2)).all()
    pipe = run.pipeline(config, "train")
    pipe.attach_visual_tokens(table)
    try:
        batch = next(iter(pipe.epoch(0)))
    finally:
        pipe.attach_visual_tokens(None)
    eval_step = jax.jit(step_lib.make_eval_step(3, vlm_lib.VLM(run.vcfg), run.encoder, dict(config.loss_weights)))
    batch = {k: v for k, v in batch.items() if k != "meta"}
    bare = {k: v for k, v in batch.items() if k != "visual_tokens"}
    got = eval_step(variables["params"], variables["calibration"], batch, run.consts())
    want = eval_step(variables["params"], variables["calibration"], bare, run.consts())
    for name in want:
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, err_msg=name)
    # A phase that trains the compressor, or the flag off: no table.
    phase1 = _config(phase=1)
    assert run.compressor_tokens(phase1, variables["params"],
                                 phases_lib.trainable_labels(variables["params"], phase1.optimizer_groups, 1)) is None
    off = _config(**{"train.cache_visual_tokens": "false"})
    assert run.compressor_tokens(off, variables["params"], labels) is None


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
