"""What the command-line entry points share: a user mistake ends in one line on stderr and a
non-zero exit, never a traceback from flag parsing.

ml_collections' config_flags applies `--config.a.b=v` while the flags are parsed, so a field that
does not exist surfaces there as a KeyError/AttributeError, before `main` could catch it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from absl import flags


def program_name() -> str:
    """'train' for `python -m kervljepa_jax.train`, 'evaluate' for evaluate, ..."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "kervljepa_jax"


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def bad_config_field(prog: str, argv: list[str], error: Exception) -> NoReturn:
    """One line naming the `--config.a.b` flag whose field does not exist."""
    missing = str(error).strip("\"'")
    names = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((n for n in names if missing in n.split(".")), names[0] if names else "--config")
    fail(prog, f"{bad}: no field {missing!r} in the config; see the phase's configs/phaseN.py", 2)


# `--config.a.b=v` overrides of list-valued fields (config.optimizer_groups):
# ml_collections' config_flags cannot parse a list and fails while the --config flag is being defined,
# so they are taken out of sys.argv before that and applied with every other override by
# `training.config.apply_overrides` (which parses lists).
_held_out: dict[str, str] = {}


def hold_out_list_overrides(argv: list[str], config) -> dict[str, str]:
    """Remove from argv (in place) each `--config.a.b=v` / `--config.a.b v` whose field in `config`
    holds a list; return them, and keep them for `config_overrides`. Unknown fields stay in argv
    (config_flags reports them)."""
    from kervljepa_jax.training import config as config_lib

    held, drop = {}, set()
    for key, value, start, stop in config_lib.override_spans(argv[1:]):
        if isinstance(config_lib.field_value(config, key), list):
            held[key] = value
            drop.update(range(start + 1, stop + 1))         # +1: the spans index argv[1:]
    argv[:] = [a for i, a in enumerate(argv) if i not in drop]
    _held_out.update(held)
    return held


def config_overrides(argv: list[str]) -> dict[str, str]:
    """Every `--config.a.b=v` of the command line, the held-out list overrides included."""
    from kervljepa_jax.training import config as config_lib

    return {**config_lib.command_line_overrides(argv), **_held_out}


def held_out_overrides() -> dict[str, str]:
    return dict(_held_out)


def config_file_argument(argv: list[str]) -> str:
    """The value of `--config=FILE[:arg]` (or `--config FILE[:arg]`) on the command line, else ''."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def check_config_file(prog: str, argv: list[str]) -> None:
    """A `--config` file that does not exist fails here, naming the flag; config_flags would only
    load it on first use (or, with --phase=all, never), deep inside a run."""
    value = config_file_argument(argv)
    path = value.split(":", 1)[0]
    if value and not os.path.isfile(path):
        fail(prog, f"--config={value}: no such file {path!r}; use configs/phaseN.py[:paper]", 2)


def is_local(path: str) -> bool:
    """Not a remote URL (gs://, s3://): a path whose existence can be checked up front."""
    return "://" not in path


def _writable_folder(prog: str, flag: str, value: str, folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(prog, f"--{flag}={value}: cannot create {folder} ({e.strerror}); pass a writable place", 2)
    if not os.access(folder, os.W_OK):
        fail(prog, f"--{flag}={value}: {folder} is not writable; pass a writable place", 2)


def ensure_folder(prog: str, flag: str, path: str) -> None:
    """Create the output folder `--flag=path` now: a file there, or an unwritable parent, fails in one
    line before minutes of work rather than after."""
    if not is_local(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        fail(prog, f"--{flag}={path} is a file; pass a folder", 2)
    _writable_folder(prog, flag, path, path)


def ensure_parent(prog: str, flag: str, path: str) -> None:
    """Create the folder that will hold the output `--flag=path` (a file, or a folder written whole)."""
    if is_local(path):
        _writable_folder(prog, flag, path, os.path.dirname(os.path.abspath(path)))


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """An `app.run(..., flags_parser=...)` that turns flag and config-field errors into one line."""
    def parse(argv: list[str]) -> list[str]:
        check_config_file(prog, argv)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, f"{str(e).splitlines()[0]} (see --helpfull)", 2)
        except (KeyError, AttributeError) as e:
            bad_config_field(prog, argv, e)
        except OSError as e:                     # a --config file that cannot be read
            fail(prog, f"--config: {str(e).splitlines()[-1]}", 2)
    return parse


# Multi-process runs: where each process learns the coordinator, the process count and its own id.
# Flags win; else these variables (a launcher that is neither SLURM nor a TPU VM sets them); else
# jax.distributed's own detection (SLURM, Open MPI, TPU VM / pod metadata).
DISTRIBUTED_ENV = {"coordinator_address": "KERVLJEPA_COORDINATOR", "num_processes": "KERVLJEPA_NUM_PROCESSES",
                   "process_id": "KERVLJEPA_PROCESS_ID"}


def _env_int(environ, key: str, default: int) -> int:
    raw = environ.get(DISTRIBUTED_ENV[key], "")
    if raw and not raw.lstrip("-").isdigit():
        raise ValueError(f"{DISTRIBUTED_ENV[key]}={raw!r}: not an integer")
    return int(raw) if raw else default


def distributed_settings(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                         environ: dict | None = None) -> dict:
    """The keyword arguments for `jax.distributed.initialize`: the flags', else the environment's;
    empty when neither names them (JAX then detects SLURM / MPI / TPU itself). Half a setting (an
    address without a process count) is an error naming what is missing."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address or environ.get(DISTRIBUTED_ENV["coordinator_address"], ""),
             "num_processes": num_processes or _env_int(environ, "num_processes", 0),
             "process_id": process_id if process_id >= 0 else _env_int(environ, "process_id", -1)}
    named = {k: v for k, v in given.items() if v not in ("", 0, -1)}
    if given["process_id"] == 0:
        named["process_id"] = 0
    if named and len(named) < 3:
        missing = sorted(set(given) - set(named))
        raise ValueError(f"--distributed: give all of --coordinator_address, --num_processes and --process_id "
                         f"(or {', '.join(DISTRIBUTED_ENV.values())}); missing {', '.join('--' + m for m in missing)}")
    if named and not 0 <= named["process_id"] < named["num_processes"]:
        raise ValueError(f"--process_id={named['process_id']}: must be in [0, {named['num_processes']})")
    return named


def initialize_distributed(prog: str, coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """`jax.distributed.initialize` with `distributed_settings`; on CPU the cross-process collectives
    go through gloo (XLA's CPU client has none of its own)."""
    import jax
    try:
        settings = distributed_settings(coordinator_address, num_processes, process_id)
    except ValueError as e:
        fail(prog, str(e), 2)
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except (ValueError, RuntimeError) as e:     # nothing to detect, or a coordinator that never answers
        fail(prog, f"--distributed: {str(e).splitlines()[0] if str(e) else type(e).__name__}; give "
                   "--coordinator_address, --num_processes and --process_id", 2)


# ----------------------------------------------------------------------------- the flags train and evaluate share


def _default_phase(argv: list[str]) -> int:
    """N for `--phase=N` (so `--config.x` may name a field only phase N has), else 1."""
    phase = next((a.split("=", 1)[1] for a in argv if a.startswith("--phase=")), None)
    if phase is None and "--phase" in argv[:-1]:
        phase = argv[argv.index("--phase") + 1]
    return int(phase) if phase in ("1", "2", "3", "4") else 1


def define_run_flags() -> None:
    """--phase, --workdir, --config (with --config.a.b=v), --init_from, --warm_bridge_from and the
    multi-process flags: one spelling for train and evaluate, defined once per process (a second call
    does nothing). config_flags applies the --config.a.b=v overrides here, so a field that does not
    exist raises KeyError/AttributeError from this call (`bad_config_field` turns it into one line)."""
    if "workdir" in flags.FLAGS:
        return
    from ml_collections import config_flags
    from kervljepa_jax.training import config as config_lib
    flags.DEFINE_enum("phase", "all", ["1", "2", "3", "4", "all"], "Curriculum phase to run, or all four.")
    flags.DEFINE_string("workdir", None, "Output folder: checkpoints, logs, tokenizer, report.json.")
    flags.DEFINE_string("init_from", "", "Checkpoint to start the phase from (default: best of phase N-1).")
    flags.DEFINE_string("warm_bridge_from", "", "Phase-3 checkpoint whose bridge (projectors, adapters, LoRA) "
                        "overwrites ours at the start of phase 3.")
    flags.DEFINE_bool("distributed", False, "One of several processes (multi-host GPU / TPU pod): call "
                      "jax.distributed.initialize() with the three flags below, or the KERVLJEPA_* variables, or "
                      "what JAX detects (SLURM, Open MPI, TPU VM).")
    flags.DEFINE_string("coordinator_address", "", "With --distributed: host:port of process 0.")
    flags.DEFINE_integer("num_processes", 0, "With --distributed: how many processes in all.")
    flags.DEFINE_integer("process_id", -1, "With --distributed: this process's index, 0..num_processes-1.")
    phase = _default_phase(sys.argv)
    hold_out_list_overrides(sys.argv, config_lib.load_phase_config(phase))
    config_flags.DEFINE_config_file("config", str(config_lib.CONFIGS_DIR / f"phase{phase}.py"),
                                    "Phase config file[:arg]; with --phase=all its arg (profile) applies to every phase.")
