"""`train --distributed`: 2 processes x 2 host CPU devices on localhost train phase 3, save, resume and
run the final evaluation with the generated reports gathered from both processes, and agree with one
process on 4 devices."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

SMALL = ["--config.model.pretrain_steps=10", "--config.data.num_train=64", "--config.data.num_valid=16",
         "--config.eval.num_examples=0", "--config.eval.max_new_tokens=8", "--config.train.log_every=1",
         "--config.eval.temperature=0", "--config.model.lora.dropout=0", "--config.train.batch_size=8"]


def _env(devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}


def _train(workdir, args, devices=4):
    cmd = [sys.executable, "-m", "kervljepa_jax.train", f"--workdir={workdir}", *SMALL, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(devices))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _train_on_two_processes(workdir, args):
    with socket.socket() as s:                      # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "kervljepa_jax.train", f"--workdir={workdir}", *SMALL, *args,
                               "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(2)) for i in range(2)]
    logs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs[0]


def _losses(workdir, phase):
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if r["phase"] == phase and "loss" in r}


def _reports(workdir):
    with open(workdir / "phase3" / "reports.csv", newline="", encoding="utf-8") as f:
        return {row["VolumeName"]: row["report_normal"] for row in csv.DictReader(f)}


@pytest.mark.slow
def test_two_processes_train_resume_and_evaluate_phase3_like_one(tmp_path):
    base = tmp_path / "base"
    for phase in ("1", "2"):
        _train(base, [f"--phase={phase}", "--config.train.max_steps=2"])
    runs = {}
    for name in ("one", "two"):
        shutil.copytree(base, tmp_path / name)
        runs[name] = tmp_path / name
    phase3 = ["--phase=3", "--config.checkpoint.every_steps=2", "--config.eval.ablation_examples=0"]
    _train(runs["one"], [*phase3, "--config.train.max_steps=4"])
    log = _train_on_two_processes(runs["two"], [*phase3, "--config.train.max_steps=2"])
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices" in log
    log = _train_on_two_processes(runs["two"], [*phase3, "--config.train.max_steps=4"])
    assert "resumed at step 2" in log
    one, two = (json.load(open(runs[n] / "report.json"))["phase3"] for n in ("one", "two"))
    assert one["num_volumes"] == two["num_volumes"] == 16
    # The same 16 volumes, every name gathered from both processes' halves of each batch.
    reports = {n: _reports(runs[n]) for n in runs}
    assert len(reports["two"]) == 16 and set(reports["two"]) == set(reports["one"])
    # Same data and weights, the batch rows in another order (each process reads every other record):
    # the first step's loss agrees up to the predictor's dropout masks, which follow the row order.
    first = {n: _losses(runs[n], 3)[1] for n in runs}
    assert abs(first["one"] - first["two"]) <= 0.05 * first["one"], first
