"""Orbax phase checkpoints: round trip, best vs latest, resume, shardings, --init_from, warm bridge."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm
from kervljepa_jax.training import checkpoint, optim, phases
from kervljepa_jax.training import config as config_lib
from tests.training import bridge_count, toy_params


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def config():
    return config_lib.load_phase_config(3)


@pytest.fixture(scope="module")
def trained(config):
    """Toy params and the phase-3 optimizer state after one step."""
    params = toy_params()
    labels = phases.trainable_labels(params, config.optimizer_groups, config.phase)
    tx = optim.make_optimizer(config, params, labels, steps_per_epoch=10)
    trainable, frozen = phases.split_params(params, labels)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt_state = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
    return phases.merge_params(optax.apply_updates(trainable, updates), frozen), optim.set_lr_scale(opt_state, 0.5)


def _checkpointer(tmp_path, phase=3, **kw):
    kw = {"keep": 1, "keep_best": 1, "best_metric": "val_gen_f1", "async_save": False, **kw}
    return checkpoint.PhaseCheckpointer(tmp_path, phase, **kw)


def test_round_trip_restores_everything(tmp_path, config, trained):
    params, opt_state = trained
    rng = jax.random.key(7)
    host = {"data": {"epoch": 2, "grain": "{\"pos\": 5}"}, "plateau": {"scale": 0.5, "best": 0.4, "num_bad": 1}}
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(12, params=params, opt_state=opt_state, rng=rng, alpha=1.25, host=host, config=config,
                  metrics={"val_gen_f1": 0.4})
    assert (tmp_path / "phase3" / "checkpoints" / "12").is_dir()
    with _checkpointer(tmp_path) as ckpt:            # a new process resuming
        out = ckpt.restore_latest(checkpoint.abstract_target(params), checkpoint.abstract_target(opt_state))
    assert out.step == 12 and out.alpha == 1.25 and out.host == host
    _assert_trees_equal(out.params, params)
    _assert_trees_equal(out.opt_state, opt_state)
    assert optim.lr_scale(out.opt_state) == 0.5
    np.testing.assert_array_equal(jax.random.key_data(out.rng), jax.random.key_data(rng))
    assert out.config == config.to_dict() and out.config["train"]["batch_size"] == config.train.batch_size
    # Restored without an optimizer target, the optimizer state is not read.
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(12, params).opt_state is None


def test_best_and_latest_are_kept(tmp_path, trained):
    params, _ = trained
    f1s = {1: 0.2, 2: 0.6, 3: None, 4: 0.5, 5: None}
    with _checkpointer(tmp_path) as ckpt:
        for step, f1 in f1s.items():
            scaled = jax.tree.map(lambda x: x * step, params)
            ckpt.save(step, params=scaled, metrics=None if f1 is None else {"val_gen_f1": f1})
        assert ckpt.all_steps() == [2, 5] and ckpt.best_step() == 2 and ckpt.latest_step() == 5
        _assert_trees_equal(ckpt.restore_best(params).params, jax.tree.map(lambda x: x * 2, params))
        with pytest.raises(KeyError, match="best_metric='val_gen_f1'"):
            ckpt.save(6, params=params, metrics={"val_loss": 1.0})
    with _checkpointer(tmp_path, phase=2, best_metric="val_loss", best_mode="min", keep=2) as ckpt:
        for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}.items():
            ckpt.save(step, params=params, metrics={"val_loss": loss})
        assert ckpt.all_steps() == [2, 3, 4] and ckpt.best_step() == 2


def test_fresh_workdir_and_no_metrics(tmp_path, trained):
    params, _ = trained
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None and ckpt.restore_latest(params) is None and ckpt.restore_best(params) is None
        assert not checkpoint.has_checkpoint(tmp_path, 3)        # the folder exists, no step in it
        (checkpoint.phase_directory(tmp_path, 3) / "3.orbax-checkpoint-tmp-1").mkdir()   # an unfinished save
        assert not checkpoint.has_checkpoint(tmp_path, 3)
        ckpt.save(3, params=params)
        assert checkpoint.has_checkpoint(tmp_path, 3) and not checkpoint.has_checkpoint(tmp_path, 2)
        assert ckpt.best_step() is None and ckpt.restore_best(params).step == 3     # best falls back to latest
        assert [ckpt.should_save(s) for s in (0, 5)] == [False, False]
    every = checkpoint.PhaseCheckpointer(tmp_path, 4, every_steps=5, async_save=False)
    assert [every.should_save(s) for s in (0, 4, 5, 10)] == [False, False, True, True]
    every.close()


def test_restore_onto_shardings(tmp_path, trained):
    params, _ = trained
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    def sharding(x):
        spec = PartitionSpec(*([None] * (x.ndim - 1) + ["fsdp"])) if x.ndim and x.shape[-1] % 4 == 0 else PartitionSpec()
        return NamedSharding(mesh, spec)
    shardings = jax.tree.map(sharding, params)
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        out = ckpt.restore(1, checkpoint.abstract_target(params, shardings))
    _assert_trees_equal(out.params, params)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 out.params, shardings)
    assert out.params["compressor"]["queries"].sharding.spec == PartitionSpec(None, "fsdp")


def test_init_from_path(tmp_path, trained):
    params, _ = trained
    with _checkpointer(tmp_path, phase=1, best_metric="val_macro_f1") as ckpt:
        ckpt.save(4, params=params, alpha=2.0, metrics={"val_macro_f1": 0.7})
        ckpt.save(8, params=jax.tree.map(jnp.zeros_like, params), alpha=3.0, metrics={"val_macro_f1": 0.1})
    target = toy_params(seed=5)
    for path in (tmp_path / "phase1", tmp_path / "phase1" / "checkpoints"):    # -> the best step
        restored, meta = checkpoint.restore_params(path, target)
        _assert_trees_equal(restored, params)
        assert meta["alpha"] == 2.0 and meta["step"] == 4
    restored, meta = checkpoint.restore_params(tmp_path / "phase1" / "checkpoints" / "8", target)
    assert meta["step"] == 8 and not np.any(np.asarray(restored["projector_1"]["kernel"]))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint there"):
        checkpoint.restore_params(tmp_path / "nowhere", target)


@pytest.fixture(scope="module")
def phase3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    with _checkpointer(root) as ckpt:
        ckpt.save(30, params=toy_params(seed=0), metrics={"val_gen_f1": 0.5})
    return root


def test_warm_bridge_overwrites_exactly_the_bridge(phase3_dir):
    source, target = toy_params(seed=0), toy_params(seed=1)
    for path in (phase3_dir, phase3_dir / "phase3", phase3_dir / "phase3" / "checkpoints" / "30",
                 phase3_dir / "phase3" / "checkpoints" / "30" / "params"):
        merged, count = checkpoint.restore_bridge(path, target)
        assert count == bridge_count() == 9 + 14 * 4
        n_bridge = 0
        for p, new, old, src in zip(phases.leaf_paths(target), jax.tree.leaves(merged), jax.tree.leaves(target),
                                    jax.tree.leaves(source)):
            is_bridge = p.startswith(("projector_", "xattn_")) or p.endswith(("lora_A", "lora_B"))
            n_bridge += is_bridge
            np.testing.assert_array_equal(np.asarray(new), np.asarray(src if is_bridge else old), err_msg=p)
        assert n_bridge == 9 + 2 * 7 * 2 == len(checkpoint.bridge_paths(target))


def test_warm_bridge_fails_loudly(phase3_dir):
    with pytest.raises(ValueError) as err:
        checkpoint.restore_bridge(phase3_dir / "phase3", toy_params(rank=3))
    msg = str(err.value)
    assert "\n" not in msg and "shape mismatch" in msg and "lora_A" in msg and "(2, 6, 2)" in msg and "(2, 6, 3)" in msg
    with pytest.raises(ValueError, match=r"lacks 9 bridge tensor\(s\), first 'projector_2/bias'") as err:
        checkpoint.restore_bridge(phase3_dir / "phase3", toy_params(injection=(1, 2)))
    assert "\n" not in str(err.value)


def test_warm_bridge_count_for_the_3b_preset():
    """The paper's 27 bridge components + 392 LoRA tensors, on the real VLM's abstract 3B tree."""
    cfg = vlm.make_config("llama3_2_3b", visual_token_id=0, lora=lora_lib.LoraConfig(rank=16, alpha=32.0))
    params = jax.eval_shape(lambda key: vlm.init(cfg, key), jax.random.key(0))["params"]
    assert vlm.count_bridge_tensors(params) == {"projector": 6, "xattn": 21, "lora": 392}
    assert checkpoint.count_tensors(params) == 27 + 392 == 419
    # Leaves: 3 x (2 + 7) bridge + 4 scanned segments x 7 projections x (A, B).
    assert len(checkpoint.bridge_paths(params)) == 27 + 4 * 14


def test_saving_a_step_again_replaces_it(tmp_path, trained):
    """A periodic save and the end-of-phase save on the same step (issue 25): the later one wins."""
    params, _ = trained
    doubled = jax.tree.map(lambda x: x * 2, params)
    with _checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(4, params=params, host={"epoch": 0})
        ckpt.save(4, params=doubled, host={"epoch": 1}, metrics={"val_gen_f1": 0.3})
        ckpt.wait()
        assert ckpt.all_steps() == [4] and ckpt.best_step() == 4
    with _checkpointer(tmp_path) as ckpt:
        out = ckpt.restore_latest(params)
    _assert_trees_equal(out.params, doubled)
    assert out.host == {"epoch": 1}


def test_a_disk_fault_is_one_line_naming_the_folder_and_keeps_the_last_checkpoint(tmp_path, trained, monkeypatch):
    """A read-only folder (Orbax: OSError) or a full disk (tensorstore: ValueError with the errno),
    while saving or while an asynchronous save finishes (issue 25.6)."""
    params, _ = trained
    faults = {"save": OSError(30, "Read-only file system"),
              "wait_until_finished": ValueError("RESOURCE_EXHAUSTED: Error writing \"a/0\" in OCDBT database: "
                                                "Failed to write 255700 bytes to file 4 [os_error_code='28']")}
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        folder = str(ckpt.directory)
        for method, fault in faults.items():
            def fail(*args, fault=fault, **kwargs):
                raise fault
            monkeypatch.setattr(ckpt.manager, method, fail)
        with pytest.raises(checkpoint.CheckpointError) as err:
            ckpt.save(2, params=jax.tree.map(jnp.zeros_like, params))
        assert "\n" not in str(err.value) and folder in str(err.value) and "Read-only file system" in str(err.value)
        with pytest.raises(checkpoint.CheckpointError, match="No space left on device; free disk space"):
            ckpt.wait()
        monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
        with pytest.raises(ValueError, match="a bug") as err:       # anything else keeps its traceback
            ckpt.save(2, params=params)
        assert not isinstance(err.value, checkpoint.CheckpointError)
        monkeypatch.undo()
    with _checkpointer(tmp_path) as ckpt:
        out = ckpt.restore_latest(params)
    assert out.step == 1
    _assert_trees_equal(out.params, params)


def test_latest_host_reads_the_host_state_alone(tmp_path, trained):
    params, opt_state = trained
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_host() == {}
        ckpt.save(2, params=params, opt_state=opt_state, host={"lora_frozen": False})
        ckpt.save(5, params=params, opt_state=opt_state, host={"lora_frozen": True, "epoch": 2})
        assert ckpt.latest_host() == {"lora_frozen": True, "epoch": 2}


def _largest_array_file(step_dir):
    """The biggest array data file of a step's params (OCDBT: params/d/<hash>)."""
    return max((f for f in (step_dir / "params" / "d").iterdir() if f.is_file()), key=lambda f: f.stat().st_size)


DAMAGE = {  # how a step folder gets damaged -> what the damage does to it
    "meta file deleted": lambda step: (step / "meta" / "metadata").unlink(),
    "metrics truncated": lambda step: (step / "metrics" / "metrics").write_text('{"val_gen_f1"'),
    "array file deleted": lambda step: _largest_array_file(step).unlink(),
    "array file truncated": lambda step: _largest_array_file(step).write_bytes(
        _largest_array_file(step).read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_step_is_skipped_with_a_warning_and_the_previous_one_resumed(tmp_path, trained, damage,
                                                                                      caplog):
    """Issue 25.3: a newest step truncated or missing a file is skipped with a warning naming its folder,
    the step before it is restored, and keep / keep_best still hold as the resumed phase saves again."""
    params, _ = trained
    scaled = {s: jax.tree.map(lambda x, s=s: x * s, params) for s in range(1, 5)}
    f1s = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3}
    with _checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, params=scaled[step], host={"epoch": step}, metrics={"val_gen_f1": f1s[step]})
        assert ckpt.all_steps() == [1, 2, 3]             # latest 2 + the best, step 1
    newest = tmp_path / "phase3" / "checkpoints" / "3"
    DAMAGE[damage](newest)
    caplog.set_level(logging.WARNING)
    with _checkpointer(tmp_path, keep=2) as ckpt:
        out = ckpt.restore_latest(params)
        assert out.step == 2 and out.host == {"epoch": 2}
        _assert_trees_equal(out.params, scaled[2])
        assert f"checkpoint {newest} is damaged" in caplog.text and ckpt.skipped_steps == [3]
        assert ckpt.latest_host() == {"epoch": 2}
        for step in (3, 4):                              # the resumed phase saves step 3 again, then 4
            ckpt.save(step, params=scaled[step], host={"epoch": step}, metrics={"val_gen_f1": f1s[step]})
        assert ckpt.all_steps() == [1, 3, 4] and ckpt.best_step() == 1 and ckpt.skipped_steps == []
    assert sorted(p.name for p in newest.parent.iterdir() if p.name.isdigit()) == ["1", "3", "4"]
    with _checkpointer(tmp_path, keep=2) as ckpt:
        out = ckpt.restore_latest(params)
    assert out.step == 4
    _assert_trees_equal(out.params, scaled[4])


def test_a_damaged_best_step_hands_over_the_next_best_and_all_damaged_is_one_line(tmp_path, trained, caplog):
    params, _ = trained
    with _checkpointer(tmp_path, keep=2, keep_best=2) as ckpt:
        for step, f1 in {1: 0.9, 2: 0.5, 3: 0.1}.items():
            ckpt.save(step, params=jax.tree.map(lambda x, s=step: x * s, params), metrics={"val_gen_f1": f1})
    folder = tmp_path / "phase3" / "checkpoints"
    DAMAGE["array file truncated"](folder / "1")
    caplog.set_level(logging.WARNING)
    with _checkpointer(tmp_path, read_only=True) as ckpt:          # the next phase reading this one
        out = ckpt.restore_best(params)
    assert out.step == 2 and f"checkpoint {folder / '1'} is damaged" in caplog.text
    assert (folder / "1").is_dir()                                  # read only: left as it was
    for step in (2, 3):
        DAMAGE["array file deleted"](folder / str(step))
    with _checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=r"every checkpoint there is damaged \(steps \[1, 2, 3\]\); "
                                                              "move the folder aside") as err:
            ckpt.restore_latest(params)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_is_one_line_naming_it_before_any_restore(tmp_path, config, monkeypatch):
    """Issue 25.5: resume, hand-over or --init_from onto a model of other sizes (another preset, LoRA
    rank, layer count) fails with a CheckpointError naming the checkpoint, its first misfit tensor and
    the model settings it was saved with, found from the metadata before Orbax reads an array."""
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(3, params=toy_params(), config=config, metrics={"val_gen_f1": 0.5})
    step_dir = tmp_path / "phase3" / "checkpoints" / "3"
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", lambda *a, **k: pytest.fail("restored"))
    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "restore", lambda *a, **k: pytest.fail("restored"))
    others = {"wider": (toy_params(d=8), r"'compressor/queries'|saved \(.*\), this run's"),
              "lora rank": (toy_params(rank=4), r"lora_A' saved \(2, 6, 2\), this run's \(2, 6, 4\)"),
              "more layers": (toy_params(segments=((0, 1), (2, 5))), r"'llm/model/layers_2_5/.*' absent from it")}
    for name, (target, first) in others.items():
        with _checkpointer(tmp_path, read_only=True) as ckpt:
            for restore in (ckpt.restore_latest, ckpt.restore_best):
                with pytest.raises(checkpoint.CheckpointError, match=first) as err:
                    restore(target)
                message = str(err.value)
                assert f"phase 3: checkpoint {step_dir} holds another model" in message, name
                assert "saved with preset='tiny'" in message and "\n" not in message, message
        with pytest.raises(checkpoint.CheckpointError, match=f"--init_from={tmp_path / 'phase3'}: checkpoint"):
            checkpoint.restore_params(tmp_path / "phase3", target)


def test_check_same_model_compares_the_saved_model_settings_before_any_set_up(tmp_path, config):
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(3, params=toy_params(), config=config, metrics={"val_gen_f1": 0.5})
    step_dir = tmp_path / "phase3" / "checkpoints" / "3"
    same = config_lib.load_phase_config(3)
    same.model.injection_layers = tuple(config.model.injection_layers)      # a tuple is the same list
    checkpoint.check_same_model(tmp_path / "phase3", same, "--init_from")
    other = config_lib.load_phase_config(3)
    other.model.preset, other.model.lora.rank = "llama3_2_3b", 16
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_same_model(tmp_path / "phase3", other, "--init_from")
    assert str(err.value) == (f"--init_from: checkpoint {step_dir} was saved with model.preset='tiny' (this run: "
                              f"'llama3_2_3b'), model.lora.rank={config.model.lora.rank} (this run: 16); pass the "
                              "--config.model settings it was trained with, or a checkpoint of this model")


def _left_out(params, config):
    """Phase 3's frozen base LLM leaves of `params` (its LoRA trains) and their `frozen` record."""
    labels = phases.trainable_labels(params, config.optimizer_groups, config.phase)
    frozen = jax.tree.map(lambda label: label == phases.FROZEN, labels)
    paths = checkpoint.base_leaves(params, frozen, params["llm"])
    return paths, checkpoint.frozen_record(params, paths, "/models/base")


def test_a_step_holds_what_the_phase_trains_and_restores_whole_from_its_base_llm(tmp_path, config, trained):
    """Issue 25.7: the base LLM's frozen leaves are named, not saved; restore puts the whole tree
    back together, bitwise, and a base LLM that is not the one trained from is one line."""
    params, opt_state = trained
    paths, record = _left_out(params, config)
    assert paths and not any("lora" in p for p in paths) and all(p.startswith("llm/") for p in paths)
    assert "llm/model/embed_tokens/weight" in paths
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state, frozen=record, metrics={"val_gen_f1": 0.5})
    step_dir = checkpoint.phase_directory(tmp_path, 3) / "3"
    stored = checkpoint._stored_shapes(step_dir / checkpoint.PARAMS)
    assert not set(paths) & set(stored) and set(stored) | set(paths) == set(phases.leaf_paths(params))
    assert checkpoint.read_json(step_dir / checkpoint.FROZEN)["folder"] == "/models/base"
    with _checkpointer(tmp_path) as ckpt:
        out = ckpt.restore_latest(checkpoint.abstract_target(params), checkpoint.abstract_target(opt_state),
                                  base=params["llm"])
        _assert_trees_equal(out.params, params)
        _assert_trees_equal(out.opt_state, opt_state)
        with pytest.raises(ValueError, match="leaves the base LLM out"):
            ckpt.restore(3, params)
        other = toy_params(seed=9)["llm"]                     # another base LLM of the same shapes
        with pytest.raises(checkpoint.CheckpointError, match=r"frozen weights come from the base LLM /models/base, "
                           r"but \d+ of those \d+ tensors differ in the base LLM loaded \(first 'llm/") as err:
            ckpt.restore(3, params, base=other)
        assert "\n" not in str(err.value)
        lacking = {"model": {k: v for k, v in params["llm"]["model"].items() if k != "embed_tokens"}}
        with pytest.raises(checkpoint.CheckpointError, match="lacks 1 of those tensors"):
            ckpt.restore(3, params, base=lambda: lacking)
    restored, meta = checkpoint.restore_params(tmp_path / "phase3", toy_params(seed=5), base=params["llm"])
    _assert_trees_equal(restored, params)
    assert meta["step"] == 3


def test_a_resume_reads_the_optimizer_it_restores_onto_from_the_step_it_restores(tmp_path, trained):
    """The gap around phase 3's LoRA freeze: a damaged newest step (after the freeze) whose damage shows
    only when its arrays are read is skipped, and the optimizer target is built from the host state
    of the step restored (before the freeze), not of the skipped one."""
    params, opt_state = trained
    after = {"frozen_after": jnp.zeros(3)}                         # another optimizer state structure
    with _checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(2, params=params, opt_state=opt_state, host={"lora_frozen": False})
        ckpt.save(4, params=params, opt_state=after, host={"lora_frozen": True})
    DAMAGE["array file truncated"](checkpoint.phase_directory(tmp_path, 3) / "4")
    asked = []

    def target(host):
        asked.append(host["lora_frozen"])
        return checkpoint.abstract_target(after if host["lora_frozen"] else opt_state)

    with _checkpointer(tmp_path, keep=2) as ckpt:
        out = ckpt.restore_latest(params, target)
    assert out.step == 2 and out.host == {"lora_frozen": False} and asked == [True, False]
    _assert_trees_equal(out.opt_state, opt_state)
