"""The curriculum CLI: one-line errors, a short run of every phase with resume, and (slow) the
paper's claims in miniature on the default `--phase=all`."""

import json
import os
import subprocess
import sys

import pytest


SMALL = ["--config.train.max_steps=2", "--config.model.pretrain_steps=10", "--config.data.num_train=64",
         "--config.data.num_valid=16", "--config.eval.num_examples=8", "--config.eval.max_new_tokens=8",
         "--config.train.log_every=1"]


def _run(args, workdir, timeout=900):
    cmd = [sys.executable, "-m", "kervljepa_jax.train", f"--workdir={workdir}", *args]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}   # one device: the CLI as a user runs it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_unknown_config_field_on_the_command_line_is_one_line(tmp_path):
    out = _run(["--config.train.no_such_field=1"], tmp_path / "w", timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "train: --config.train.no_such_field: no field 'no_such_field' in the config; see the phase's "
        "configs/phaseN.py"]


def test_list_override_reaches_the_config_parser(tmp_path):
    """config_flags cannot parse list fields; they are held out of it and parsed by training.config."""
    out = _run(["--phase=3", "--config.optimizer_groups=5"], tmp_path / "w", timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("train: --config.optimizer_groups='5' does not parse as "
                                                   "the field's list")


def test_missing_workdir_and_missing_previous_phase_are_one_line_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.train", "--phase=1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "--workdir is required" in out.stderr
    out = _run(["--phase=2", *SMALL], tmp_path / "w")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no checkpoint of phase 1" in out.stderr.splitlines()[-1]


def test_flag_mistakes_fail_in_one_line_before_any_set_up(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cases = {  # args -> (exit code, text of the only stderr line)
        ("--config=configs/nope.py",): (2, "--config=configs/nope.py: no such file"),       # --phase=all too
        ("--phase=1", "--config=configs/nope.py", "--config.train.lr=1"): (2, "no such file 'configs/nope.py'"),
        ("--phase=1", f"--warm_bridge_from={tmp_path}"): (2, "--warm_bridge_from applies to phase 3 only"),
        ("--phase=3", f"--warm_bridge_from={tmp_path / 'nope'}"): (2, "--warm_bridge_from="),
        ("--phase=2", f"--init_from={tmp_path / 'nope'}"): (2, "--init_from="),
        ("--phase=1", "--config.train.batch_size=0"): (1, "--config.train.batch_size=0: the global batch must be >= 1"),
        ("--phase=1", "--config.train.epochs=-1"): (1, "--config.train.epochs=-1"),
        ("--phase=1", f"--workdir={a_file}"): (2, f"--workdir={a_file} is a file"),
        ("--phase=1", f"--config.model.llm_path={tmp_path / 'nope'}"): (2, "--config.model.llm_path="),
        ("--phase=1", "--config.model.preset=nope"): (1, "--config.model.preset='nope': no such preset"),
        ("--phase=1", "--config.data.embed_dim=100"): (1, "--config.model.d_visual=100"),
        ("--phase=1", "--config.mesh=data:3"): (1, "--config.mesh='data:3': data*fsdp*tensor = 3 but 1 devices"),
    }
    running = {}
    for args in cases:
        workdir = [] if any(a.startswith("--workdir=") for a in args) else [f"--workdir={tmp_path / 'w'}"]
        running[args] = subprocess.Popen([sys.executable, "-m", "kervljepa_jax.train", *workdir, *args], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for args, process in running.items():
        _, err = process.communicate(timeout=300)
        code, text = cases[args]
        lines = err.strip().splitlines()
        assert process.returncode == code and len(lines) == 1 and lines[0].startswith("train: "), (args, err[-1500:])
        assert text in lines[0], (args, lines)
    assert not (tmp_path / "w" / "phase1").exists()      # nothing trained


@pytest.mark.slow
def test_each_phase_trains_checkpoints_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    for phase in ("1", "2", "3", "4"):     # from a phase-0 base LLM (the packaged one: the default run)
        out = _run([f"--phase={phase}", *SMALL, "--config.model.stand_in=phase0"], workdir)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (workdir / f"phase{phase}" / "checkpoints").is_dir()
        # The final evaluation is evaluate's: its metrics.json and figures land in the phase folder.
        metrics = json.load(open(workdir / f"phase{phase}" / "metrics.json"))
        assert metrics["phase"] == int(phase) and (workdir / f"phase{phase}" / "per_class_f1.png").is_file()
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert {r["phase"] for r in records} == {0, 1, 2, 3, 4}
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)          # finite, logged every step
    # A rerun of a finished phase resumes from its latest checkpoint and trains no further step.
    out = _run(["--phase=4", *SMALL], workdir)
    assert out.returncode == 0 and "resumed at step 2" in out.stderr
    assert (workdir / "phase4" / "reports.csv").is_file()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default, exactly as the README runs it."""
    workdir = tmp_path_factory.mktemp("default")
    out = _run(["--phase=all"], workdir, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.load(open(workdir / "report.json")), workdir


@pytest.mark.slow
def test_default_curriculum_writes_the_report_and_figures(default_run):
    report, workdir = default_run
    for phase in ("phase3", "phase4"):
        assert report[phase]["num_volumes"] == 512                    # every validation volume
        assert set(report[phase]["ablations"]) == {"zero", "shuffle", "noise"}
        assert all(a["num_volumes"] == 128 for a in report[phase]["ablations"].values())
        for key in ("macro_f1", "precision", "recall", "wall_seconds"):
            assert key in report[phase]
    assert (workdir / "loss_curves.png").is_file() and (workdir / "ablations.png").is_file()


# The paper's claims in miniature (issue 6), one test each, on the default run's report.json.

@pytest.mark.slow
def test_generated_reports_reach_0_8_macro_f1(default_run):
    """On all 512 validation volumes (bootstrap 95% CI about +-0.015). Measured phase-3 macro F1 of
    the default (4,096 training volumes seen 3 times): seeds 0 and 3 on one AVX-512 machine 0.877
    and 0.870. With two epochs, seeds 0-3 0.860, 0.867, 0.858, 0.842 (sd 0.010), and seed 0 with
    XLA's CPU code limited to AVX2 (XLA_FLAGS=--xla_cpu_max_isa=AVX2) 0.858. The earlier default
    moved by ~0.02 from one CPU to another; the threshold sits 0.04 below the lowest run of either
    schedule. The zeroed visual tokens score ~0.10-0.17."""
    report, _ = default_run
    assert report["phase3"]["num_volumes"] == 512 and report["phase3"]["macro_f1"] >= 0.80, report["phase3"]


@pytest.mark.slow
def test_zeroed_visual_tokens_remove_half_the_f1(default_run):
    report, _ = default_run
    zero = report["phase3"]["ablations"]["zero"]      # against the full model on the same (first 128) volumes
    assert zero["macro_f1"] <= 0.5 * zero["full_macro_f1"], zero


@pytest.mark.slow
def test_phase4_keeps_phase3_f1(default_run):
    """Phase 4 (raw reports, LoRA only, EWC) must not undo phase 3: measured 0.878 vs 0.877 (seed 0);
    with two phase-3 epochs 0.861 vs 0.860, 0.871 vs 0.867, 0.858 vs 0.858, 0.843 vs 0.842 (seeds 0-3). The run's ten minutes are a benchmark
    (benchmarks/default_run.py), not a test: this machine's speed moves by up to 1.7x by the day."""
    report, _ = default_run
    p3, p4 = report["phase3"], report["phase4"]
    assert p4["macro_f1"] >= p3["macro_f1"] - 0.02, (p3, p4)


@pytest.mark.slow
def test_warm_bridge_beats_cold_bridge_at_the_first_evaluation(default_run):
    """Paper IV-B / Table VI: phase 3 started with the bridge of a finished phase 3 (projectors,
    adapters, LoRA) is ahead of a cold phase 3 at its first evaluation (here: after one epoch of the
    first 512 training volumes, 64 steps: the paper's epoch 1 of 50), both from the same base LLM
    and phases 1-2. Built by `python -m kervljepa_jax.experiments --table=VI`."""
    from kervljepa_jax import experiments
    _, source = default_run
    table = open(experiments.build("VI", str(source), epochs=1, train_args=["--config.data.num_train=512"])).read()
    f1 = {name: json.load(open(source / "experiments" / "VI" / name / "report.json"))["phase3"]["macro_f1"]
          for name in ("cold", "warm")}
    assert "| warm bridge |" in table and "| cold bridge |" in table
    assert f1["warm"] > f1["cold"], f1
    ablations = open(experiments.build("IX", str(source))).read()     # Table IX from the final evaluations
    assert "| 3 | Zeroed |" in ablations and "| 4 | Random noise |" in ablations


@pytest.mark.slow
def test_paper_profile_recipe_runs_every_phase_on_an_fsdp_mesh_of_8_devices(tmp_path):
    """README's real-data recipe in miniature: the paper profile (its bf16 compute, losses, schedules,
    LoRA r=16 and FSDP mesh) on a CT-RATE-layout folder from the synthetic writer and a small HF
    Llama folder (the packaged stand-in), 8 forced host devices, two steps of each phase and the
    evaluation after each. 12 validation volumes: the last batch does not split over 8 devices."""
    data = tmp_path / "ct-rate"
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.data.synthetic", f"--out={data}", "--num_volumes=48",
                          "--embed_dim=64", "--max_slices=96"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    llm = os.path.join(os.path.dirname(__file__), os.pardir, "kervljepa_jax", "assets", "stand_in_llm")
    args = ["--phase=all", "--config=configs/phase1.py:paper", f"--config.model.llm_path={llm}",
            f"--config.data.tokenizer_path={llm}", f"--config.data.root={data}", "--config.model.injection_layers=[1]",
            "--config.model.whiten_layer=-1", "--config.data.embed_dim=64", "--config.data.max_slices=96",
            "--config.model.whiten_texts=targets",      # 48 reports are too few to fit a 64-wide whitening
            "--config.train.max_steps=2", "--config.train.batch_size=8", "--config.eval.max_new_tokens=8",
            "--config.eval.ablation_examples=4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "kervljepa_jax.train", f"--workdir={workdir}", *args],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(workdir / "report.json"))
    for phase in (1, 2, 3, 4):
        assert report[f"phase{phase}"]["steps"] == 2 and report[f"phase{phase}"]["num_volumes"] == 12
        saved = json.load(open(workdir / f"phase{phase}" / "metrics.json"))
        assert saved["phase"] == phase
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} over 8 devices" in out.stderr


LOSS_WEIGHT_MISSING = '''
from kervljepa_jax.training import config as config_lib


def get_config(arg=None):
    c = config_lib.load_phase_config(1, arg)
    del c.loss_weights["mmd"]
    return c
'''


@pytest.mark.slow
def test_bad_workdir_files_and_config_files_fail_in_one_line_before_training(tmp_path):
    """Mistakes raised deep in set-up (issue 25): a corrupt WORKDIR/whitening.npz (whitening.load) and a
    --config file without a loss weight (step.check_loss_weights) end in one line naming the file or
    setting, exit 1, and train nothing. ~100 s on 2 cores: each gets through the set-up first."""
    bad_whitening = tmp_path / "w_whitening"
    bad_whitening.mkdir()
    (bad_whitening / "whitening.npz").write_bytes(b"not a zip file at all")
    config_file = tmp_path / "phase1_no_mmd_weight.py"
    config_file.write_text(LOSS_WEIGHT_MISSING)
    cases = {  # workdir, args -> text of the only stderr line after "train: "
        (bad_whitening, ("--phase=1",)): f"{bad_whitening / 'whitening.npz'}: unreadable whitening file (not an .npz "
                                         "archive); delete it and rerun",
        (tmp_path / "w_weights", ("--phase=1", f"--config={config_file}")):
            "the phase 1 config has no loss_weights for ['mmd']; add loss_weights.<name> to the --config file",
    }
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    running = {case: subprocess.Popen([sys.executable, "-m", "kervljepa_jax.train", f"--workdir={case[0]}", *case[1],
                                       *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for case in cases}
    for (workdir, args), process in running.items():
        _, err = process.communicate(timeout=600)
        last = err.strip().splitlines()[-1]
        assert process.returncode == 1 and "Traceback" not in err, (args, err[-3000:])
        assert last.startswith("train: " + cases[workdir, args]), (args, last)
        assert not (workdir / "phase1" / "checkpoints").exists() or not os.listdir(workdir / "phase1" / "checkpoints")


@pytest.mark.slow
def test_init_from_a_checkpoint_of_another_model_is_one_line_naming_it(tmp_path):
    """Issue 25.5: --init_from pointing at a checkpoint of another model fails in one line naming the
    checkpoint and the settings it was saved with, before any array is read into the run's model."""
    from kervljepa_jax.training import checkpoint, config as config_lib
    from tests.training import toy_params
    with checkpoint.PhaseCheckpointer(tmp_path / "other", 1, async_save=False) as ckpt:
        ckpt.save(5, params=toy_params(), config=config_lib.load_phase_config(1), metrics={"val_macro_f1": 0.5})
    source = tmp_path / "other" / "phase1"
    out = _run(["--phase=2", f"--init_from={source}", *SMALL], tmp_path / "w")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert last.startswith(f"train: --init_from={source}: checkpoint {source / 'checkpoints' / '5'} holds another "
                           "model ("), last
    assert "it was saved with preset='tiny'" in last
