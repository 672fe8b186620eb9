"""Exact resume after a SIGKILL (issue 25.2): real processes killed, as a preemption would, at a
named point (checkpoint.kill_point: KERVLJEPA_TEST_KILL_AT=PHASE:EVENT:STEP) and rerun with the same
command. The resumed run must end where an uninterrupted one does, bitwise on CPU: the saved
parameters, optimizer state, rng, alpha and host state of every phase, and the batches each step saw
(KERVLJEPA_TEST_BATCH_LOG, WORKDIR/batches.jsonl)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kervljepa_jax.training import checkpoint as ckpt_lib

# Every phase 5 steps at most (phase 1: 3 an epoch), saved every 2, asynchronously (the default);
# tiny eval. Phase 3 alone adds FREEZE: LoRA (its row 1) freezes after its first epoch of 3 steps,
# so its step-4 save is after the freeze.
TINY = ["--config.train.max_steps=5", "--config.checkpoint.every_steps=2", "--config.data.num_train=24",
        "--config.data.num_valid=8", "--config.data.min_synthetic_slices=40", "--config.data.max_synthetic_slices=60",
        "--config.data.max_slices=60", "--config.eval.num_examples=8", "--config.eval.max_new_tokens=4",
        "--config.eval.ablation_examples=4"]
FREEZE = ["--phase=3", "--config.optimizer_groups[1].freeze_after_epoch=1"]


def _env(**extra) -> dict:
    # One device, as a user runs it; level 0 halves the compile time and is the same in every run.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0",
            ckpt_lib.KILL_AT: "", "KERVLJEPA_TEST_BATCH_LOG": "1", **extra}


def _command(workdir, *args) -> list[str]:
    phase = [] if any(a.startswith("--phase=") for a in args) else ["--phase=all"]
    return [sys.executable, "-m", "kervljepa_jax.train", f"--workdir={workdir}", *phase, *TINY, *args]


def _train(workdir, kill_at: str = "", *args) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, *args), capture_output=True, text=True, timeout=1500,
                          env=_env(**{ckpt_lib.KILL_AT: kill_at}))


def _start(workdir, *args) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> None:
    if process.returncode is None:
        _, err = process.communicate(timeout=1500)
        assert process.returncode == 0, err[-3000:]


def _item(step_dir: pathlib.Path, name: str) -> dict:
    """A saved array item as numpy leaves by path (no target: read as stored)."""
    if not (step_dir / name).is_dir():
        return {}
    tree = ocp.PyTreeCheckpointer().restore(step_dir / name)
    leaves = ocp.tree.to_flat_dict(tree, sep="/")
    return {path: np.asarray(leaf) for path, leaf in leaves.items()}


def _same_bits(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for path in a:
        x, y = a[path], b[path]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"{what}: {path} differs"


def _final_state(workdir: pathlib.Path, phase: int) -> dict:
    """The phase's latest and best steps: arrays, rng, alpha, host state, frozen-source record."""
    folder = ckpt_lib.phase_directory(workdir, phase)
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    out = {"steps": steps}
    for step in steps:
        step_dir = folder / str(step)
        meta = ckpt_lib.read_json(step_dir / ckpt_lib.META)
        out[step] = {"params": _item(step_dir, ckpt_lib.PARAMS), "opt_state": _item(step_dir, ckpt_lib.OPT_STATE),
                     "rng": meta["rng"], "alpha": meta["alpha"], "host": ckpt_lib.read_json(step_dir / ckpt_lib.HOST),
                     "frozen": ckpt_lib.read_json(step_dir / ckpt_lib.FROZEN)}
    return out


def _batches(workdir: pathlib.Path) -> dict:
    """(phase, step) -> the records of that step's batch; a replayed step's last run counts."""
    seen = {}
    for line in open(workdir / "batches.jsonl"):
        record = json.loads(line)
        seen[record["phase"], record["step"]] = record["records"]
    return seen


def assert_same_run(resumed: pathlib.Path, straight: pathlib.Path, phases=(1, 2, 3, 4)) -> None:
    assert _batches(resumed) == _batches(straight)
    for phase in phases:
        a, b = _final_state(resumed, phase), _final_state(straight, phase)
        assert a["steps"] == b["steps"], (phase, a["steps"], b["steps"])
        for step in a["steps"]:
            what = f"phase {phase} step {step}"
            _same_bits(a[step]["params"], b[step]["params"], f"{what} params")
            _same_bits(a[step]["opt_state"], b[step]["opt_state"], f"{what} opt_state")
            assert (a[step]["rng"], a[step]["alpha"]) == (b[step]["rng"], b[step]["alpha"]), what
            assert a[step]["host"] == b[step]["host"], what
            # The base LLM is left out of every step (25.7), the same leaves with the same digests.
            left_out = set(a[step]["frozen"]["digests"])
            assert left_out and not left_out & set(a[step]["params"]), what
            assert a[step]["frozen"]["digests"] == b[step]["frozen"]["digests"], what


SAVER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from kervljepa_jax.training import checkpoint
    ckpt = checkpoint.PhaseCheckpointer(sys.argv[1], 1, async_save=True)
    for step in (1, 2, 3):
        state = {"w": np.full((512, 256), step, np.float32), "b": np.arange(7, dtype=np.float32) * step}
        ckpt.save(step, params=state, opt_state={"mu": state["b"] + 1}, rng=jax.random.key(step),
                  host={"epoch": step})
    ckpt.close()
""")


def test_a_process_killed_during_an_async_write_resumes_from_a_whole_step(tmp_path):
    """SIGKILL while step 2's asynchronous save is being written (kill_point "save"): the rerun sees no
    half-written step 2 and restores a whole step, bitwise as saved; saving on from there works. ~10 s."""
    env = _env(**{ckpt_lib.KILL_AT: "1:save:2"})
    out = subprocess.run([sys.executable, "-c", SAVER, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    target = {"w": np.zeros((512, 256), np.float32), "b": np.zeros(7, np.float32)}
    with ckpt_lib.PhaseCheckpointer(tmp_path, 1, async_save=False) as ckpt:
        assert ckpt.all_steps() in ([1], [1, 2])          # step 2 only if its write had finished
        out = ckpt.restore_latest(target, {"mu": np.zeros(7, np.float32)})
        step = out.step
        assert out.host == {"epoch": step} and np.asarray(out.params["w"]).tobytes() == \
            np.full((512, 256), step, np.float32).tobytes()
        assert np.asarray(out.opt_state["mu"]).tobytes() == (np.arange(7, dtype=np.float32) * step + 1).tobytes()
        assert (jax.random.key_data(out.rng) == jax.random.key_data(jax.random.key(step))).all()
        ckpt.save(step + 1, params={k: v + 1 for k, v in target.items()}, host={"epoch": step + 1})
        assert ckpt.all_steps()[-1] == step + 1
    assert not [p for p in ckpt_lib.phase_directory(tmp_path, 1).iterdir() if "tmp" in p.name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The curriculum run straight through, started at once (it runs beside the killed runs):
    a function that waits for it and returns its workdir."""
    workdir = tmp_path_factory.mktemp("straight")
    process = _start(workdir)
    yield lambda: _finish(process) or workdir
    if process.poll() is None:
        process.kill()


@pytest.mark.slow       # ~17 min on 2 busy cores: the four-phase curriculum in miniature, five times
def test_curriculum_killed_during_a_step_an_async_save_and_between_phases_resumes_bitwise(tmp_path, uninterrupted):
    """One workdir killed three times, each rerun the same command: during phase 1's step 3 (its
    step-2 save synchronous, so that it has landed: the rerun resumes mid-epoch), during the
    asynchronous write of step 4 (resumed from step 2 again), and between phases 1 and 2; then run
    to the end."""
    resumed = tmp_path / "resumed"
    legs = {"1:step:3": ["--config.checkpoint.async_save=false"], "1:save:4": [], "1:end:5": []}
    for kill_at, args in legs.items():
        out = _train(resumed, kill_at, *args)
        assert out.returncode == -signal.SIGKILL, (kill_at, out.returncode, out.stderr[-3000:])
        assert kill_at != "1:save:4" or "phase 1: resumed at step 2" in out.stderr, out.stderr[-3000:]
    out = _train(resumed)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 1: resumed at step 5" in out.stderr
    assert_same_run(resumed, uninterrupted())


@pytest.mark.slow       # ~4 min on 2 busy cores (after the uninterrupted run's phases 1-2)
def test_phase3_killed_after_its_lora_freeze_resumes_bitwise(tmp_path, uninterrupted):
    """Phase 3 from the uninterrupted run's phases 1-2, LoRA frozen after epoch 1, killed during step
    5: the rerun resumes from the step-4 checkpoint, saved after the freeze, onto the frozen optimizer."""
    source = uninterrupted()
    runs = {name: tmp_path / name for name in ("straight", "resumed")}
    for workdir in runs.values():
        workdir.mkdir()
        for item in ("base_llm", "phase1", "phase2"):
            shutil.copytree(source / item, workdir / item)
        shutil.copy(source / "whitening.npz", workdir)
    straight = _start(runs["straight"], *FREEZE)
    # The step-4 save lands before the kill: a synchronous save (the math is the same).
    out = _train(runs["resumed"], "3:step:5", *FREEZE, "--config.checkpoint.async_save=false")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    host = ckpt_lib.read_json(ckpt_lib.phase_directory(runs["resumed"], 3) / "4" / ckpt_lib.HOST)
    assert host["lora_frozen"] and host["epoch"] == 1, host
    out = _train(runs["resumed"], "", *FREEZE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 3: resumed at step 4" in out.stderr
    _finish(straight)
    assert_same_run(runs["resumed"], runs["straight"], phases=(3,))
