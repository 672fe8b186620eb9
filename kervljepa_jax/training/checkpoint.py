"""Orbax checkpoints of one curriculum phase, resume, phase hand-over, and the warm bridge.

Layout: `WORKDIR/phase{N}/checkpoints/{step}/` with the items

    params     StandardSave   the param tree, less the leaves the `frozen` record names
    opt_state  StandardSave   the phase optimizer's state (optional)
    meta       JSON           step, phase, rng key data, calibrator alpha, the best-metric rule
    host       JSON           host-side state: data iterator, plateau / early stopping, epoch, ...
    config     JSON           the phase config
    frozen     JSON           (optional) the base LLM's leaves left out of params: its folder and a
                              digest of each; restore takes them from the base LLM it is given

A phase trains a few modules and leaves the base LLM (6.4 GB at 3B) as it was loaded: the trainer
saves `frozen=frozen_record(...)` with each step, which leaves out every frozen leaf equal to the
base LLM's, and restores with `base=` the base LLM's `llm` params (`Run.llm_params`); the restored
params are the whole tree, as saved. Frozen bridge modules (phase 3's compressor, ~MBs) are saved:
a step never depends on another phase's checkpoint.

Kept: the latest `keep` steps and the best `keep_best` by `best_metric` (saved with `metrics=`).
A damaged step (truncated, or missing a file) is skipped with a warning naming it: resume and
hand-over restore the step before it (`restore_latest`, `restore_best`).

    ckpt = PhaseCheckpointer.from_config(workdir, config)
    restored = ckpt.restore_latest(params_target, opt_state_target)      # resume, or None
    ckpt.save(step, params=..., opt_state=..., rng=..., alpha=..., host=..., config=config,
              metrics={"val_gen_f1": f1} or None, frozen=frozen_record(params, paths, folder))
    prev = PhaseCheckpointer(workdir, phase - 1).restore_best(params_target, base=llm)   # hand-over
    params, n = restore_bridge(path, params)                                   # warm bridge

Targets may be concrete arrays or `jax.ShapeDtypeStruct`s with shardings (`abstract_target`):
arrays are restored straight onto those shardings.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from kervljepa_jax.model import lora as lora_lib
from kervljepa_jax.model import vlm
from kervljepa_jax.training import phases

PARAMS, OPT_STATE, META, HOST, CONFIG, FROZEN = "params", "opt_state", "meta", "host", "config", "frozen"


class CheckpointError(ValueError):
    """A checkpoint the user pointed at, or a folder we cannot write: one line, non-zero exit."""


# Test hook (tests/training/test_resume.py): `KERVLJEPA_TEST_KILL_AT=PHASE:EVENT:STEP` kills the process
# with SIGKILL, as a preemption would, at that point; inert when unset. Events: `step` (step STEP
# dispatched, its results not yet back), `save` (step STEP's save handed to the background writer,
# not yet on disk), `end` (phase PHASE finished and evaluated, the next not begun).
KILL_AT = "KERVLJEPA_TEST_KILL_AT"


def kill_point(phase: int, event: str, step: int) -> None:
    """SIGKILL this process if KERVLJEPA_TEST_KILL_AT names this point (a test's preemption)."""
    if os.environ.get(KILL_AT) == f"{int(phase)}:{event}:{int(step)}":
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_fault(error: Exception) -> str | None:
    """What went wrong on disk, or None for any other error. Orbax raises OSError (a read-only
    folder); tensorstore, under it, a ValueError carrying the errno (`[os_error_code='28']`, disk full)."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else None


@contextlib.contextmanager
def _writing(directory: pathlib.Path):
    """Disk full, read-only folder: a CheckpointError naming the folder instead of a traceback.
    Orbax writes each step into a temporary folder first, so the steps already there stay whole."""
    try:
        yield
    except (OSError, ValueError) as e:
        fault = _disk_fault(e)
        if fault is None:
            raise
        raise CheckpointError(f"cannot write checkpoints to {directory}: {fault}; free disk space or make it "
                              "writable, then rerun the same command: it resumes from the last checkpoint "
                              "there") from e


# ------------------------------------------------------------------------------------------------
# Damaged steps: a step folder truncated or missing a file (a copy cut short, a disk fault, a hand
# that deleted a file) is skipped, with a warning naming it, and the step before it is used.
# ------------------------------------------------------------------------------------------------

# Items every saved step holds (opt_state is optional); JsonSave writes each to ITEM/metadata.
_REQUIRED_ITEMS = (PARAMS, META, HOST, CONFIG)
_JSON_FILES = (f"{META}/metadata", f"{HOST}/metadata", f"{CONFIG}/metadata", "metrics/metrics", f"{FROZEN}/metadata",
               f"{PARAMS}/_METADATA", f"{PARAMS}/array_metadatas/process_0")


def step_problem(step_dir: pathlib.Path) -> str | None:
    """What makes a step folder unusable, found without reading its arrays (None: nothing found).
    A truncated array file shows only when read: `restore` finds those."""
    for item in _REQUIRED_ITEMS:
        if not (step_dir / item).is_dir():
            return f"no {item}/ item"
    for name in _JSON_FILES:
        file = step_dir / name
        item = name.split("/")[0]
        required = item in (META, HOST, CONFIG) or (item == FROZEN and (step_dir / FROZEN).is_dir())
        if not file.is_file():
            if required:
                return f"{name} is missing"
            continue
        try:
            json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{name} is unreadable ({e})"
    return None


def _unreadable(error: Exception) -> bool:
    """Whether a restore failed on the step's files (missing, truncated, corrupt), not on the target:
    Orbax raises FileNotFoundError or a JSON error, tensorstore a ValueError with its status code."""
    if isinstance(error, (OSError, json.JSONDecodeError)):
        return True
    return isinstance(error, ValueError) and bool(
        re.search(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|Error (reading|decoding)", str(error)))


class _SkippingNameFormat:
    """Orbax's standard step naming, blind to the steps in `skipped`: the manager neither lists, keeps,
    counts nor restores them (a damaged step's metrics would otherwise fail the manager's start)."""

    def __init__(self):
        self.standard = ocp.step.standard_name_format()
        self.skipped: set[int] = set()

    def build_name(self, step: int) -> str:
        return self.standard.build_name(step)

    def find_all(self, base_path) -> Iterator[Any]:
        return (m for m in self.standard.find_all(base_path) if m.step not in self.skipped)

    def find_step(self, base_path, step: int) -> Any:
        if step in self.skipped:
            raise ValueError(f"step {step} under {base_path} is damaged and skipped")
        return self.standard.find_step(base_path, step)


class Restored(NamedTuple):
    step: int
    params: Any
    opt_state: Any        # None when not asked for
    rng: Any              # a typed key (or raw uint32 key data, as saved); None if none was saved
    alpha: float | None   # calibrator alpha
    host: dict
    config: dict
    meta: dict


def phase_directory(workdir: str | pathlib.Path, phase: int) -> pathlib.Path:
    # Absolute: Orbax refuses a relative path (`--workdir=w` failed at the first save).
    return pathlib.Path(workdir).absolute() / f"phase{phase}" / "checkpoints"


def has_checkpoint(workdir: str | pathlib.Path, phase: int) -> bool:
    """Whether the phase's checkpoint folder holds a finished step (a folder named by its step
    number), without opening Orbax: a preflight check before any model is built."""
    folder = phase_directory(workdir, phase)
    return folder.is_dir() and any(entry.name.isdigit() and entry.is_dir() for entry in folder.iterdir())


def abstract_target(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs), with `shardings` (a matching tree) if given."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _host_value(x: Any) -> np.ndarray:
    """A replicated value on this host (also for arrays spread over several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _rng_to_json(rng: Any) -> dict | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"data": _host_value(jax.random.key_data(rng)).tolist(), "impl": str(jax.random.key_impl(rng))}
    return {"data": _host_value(rng).tolist(), "impl": None}


def _rng_from_json(payload: dict | None) -> Any:
    if payload is None:
        return None
    data = np.asarray(payload["data"], np.uint32)
    return data if payload["impl"] is None else jax.random.wrap_key_data(data, impl=payload["impl"])


def _config_json(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


# ------------------------------------------------------------------------------------------------
# Frozen weights: the base LLM's leaves a phase leaves as loaded are named in the step's `frozen`
# record, with a digest each, instead of being saved again (6.4 GB a step at 3B).
# ------------------------------------------------------------------------------------------------

LLM = "llm/"     # the base LLM's subtree in the VLM's params: `base` trees are this subtree


def _row_digest(row: jax.Array) -> jax.Array:
    """Two position-weighted wrapping sums of the bits of `row` [2] uint32."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[row.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(row, width).astype(jnp.uint32).ravel()
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits * (index * np.uint32(2654435761) + np.uint32(1))),
                      jnp.sum(bits ^ (index * np.uint32(40503)))])


def _digest(x: jax.Array) -> jax.Array:
    """[2] uint32 of `x`'s bits, a row of its leading axis at a time (a stacked leaf's layer: the
    temporaries stay one row's size, not the leaf's), the rows weighted by position: a changed,
    moved or reordered value changes it (a guard against another file, not against forgery)."""
    if x.ndim < 2:
        return _row_digest(x)
    rows = jax.lax.map(_row_digest, x)                                       # [L, 2]
    weight = jnp.arange(x.shape[0], dtype=jnp.uint32) * np.uint32(2246822519) + np.uint32(1)
    return jnp.sum(rows * weight[:, None], axis=0)


_digests_jit = jax.jit(lambda leaves: {path: _digest(x) for path, x in leaves.items()})
_digest_jit = jax.jit(_digest)      # one leaf: compiled per shape, not per path (a restore's loop)


def _hex(digest: Any) -> str:
    return "".join(f"{int(v):08x}" for v in _host_value(digest))


def digests(leaves: dict[str, Any]) -> dict[str, str]:
    """path -> a 16-hex-digit digest of each array's bits (computed where the arrays live)."""
    return {path: _hex(d) for path, d in _digests_jit(leaves).items()}


def _flat(tree: Any) -> dict[str, Any]:
    return dict(zip(phases.leaf_paths(tree), jax.tree.leaves(tree)))


def _same_bits(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.array_equal(jax.lax.bitcast_convert_type(a, jnp.uint8), jax.lax.bitcast_convert_type(b, jnp.uint8))


def base_leaves(params: Any, frozen: Any, base: Any) -> list[str]:
    """The leaves of `params` that a step may leave out: frozen (per `frozen`, a matching tree of
    bools) and bitwise equal to the same leaf of `base`, the base LLM's `llm` params. Not LoRA:
    the base LLM's file has none, a run draws it from its seed (and it is small: saved)."""
    flat, ours, theirs = _flat(frozen), _flat(params), _flat(base)
    lora = re.compile(lora_lib.LORA_PATTERN)
    pairs = {p: (ours[p], theirs[p[len(LLM):]]) for p, is_frozen in flat.items()
             if is_frozen and p.startswith(LLM) and not lora.fullmatch(p) and p[len(LLM):] in theirs
             and ours[p].shape == theirs[p[len(LLM):]].shape and ours[p].dtype == theirs[p[len(LLM):]].dtype}
    equal = jax.jit(lambda pairs: {p: _same_bits(a, b) for p, (a, b) in pairs.items()})(pairs)
    return sorted(p for p, same in equal.items() if bool(_host_value(same)))


def frozen_record(params: Any, paths: list[str], folder: str) -> dict:
    """The `frozen` item of the steps that leave `paths` (see `base_leaves`) out of their params:
    the base LLM folder they come from, and the digest each must have when restored."""
    flat = _flat(params)
    return {"source": "base_llm", "folder": str(folder), "digests": digests({p: flat[p] for p in paths})}


def _without(tree: Any, paths) -> Any:
    """`tree` (nested dicts) less the leaves at `paths`."""
    paths = set(paths)
    if not paths:
        return tree
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items() if k not in paths})


def _placed(value: Any, target: Any) -> Any:
    """`value` on `target`'s sharding (an array or ShapeDtypeStruct with one), else as it is."""
    sharding = getattr(target, "sharding", None)
    return value if sharding is None else jax.device_put(value, sharding)


def _assemble(stored: Any, target: Any, record: dict, base: Any, where: pathlib.Path) -> Any:
    """The whole param tree: `stored` (the step's params item) with the leaves `record` names taken
    from `base` (the base LLM's `llm` params, or a function returning them), digests checked."""
    if not record:
        return stored
    paths = sorted(record["digests"])
    if base is None:
        raise ValueError(f"{where} leaves the base LLM out ({len(paths)} tensors): restore it with base= the "
                         "base LLM's llm params (Run.llm_params)")
    theirs = _flat(base() if callable(base) else base)
    folder = record.get("folder", "?")
    advice = (f"restore with the base LLM the phase was trained from ({folder}; --config.model.llm_path or "
              "WORKDIR/base_llm), or train the phase again")
    missing = [p for p in paths if p[len(LLM):] not in theirs]
    if missing:
        raise CheckpointError(f"{where}: its frozen weights come from the base LLM {folder}, but the base LLM "
                              f"loaded lacks {len(missing)} of those tensors (first {missing[0]!r}); {advice}")
    wanted = _flat(target)
    placed, changed = {}, []
    for p in paths:     # one tensor at a time: the base LLM's copy of each is let go once it is placed
        leaf = theirs.pop(p[len(LLM):])
        if _hex(_digest_jit(leaf)) != record["digests"][p]:
            changed.append(p)
        placed[p] = _placed(leaf, wanted[p])
        del leaf
    if changed:
        raise CheckpointError(f"{where}: its frozen weights come from the base LLM {folder}, but {len(changed)} of "
                              f"those {len(paths)} tensors differ in the base LLM loaded (first {changed[0]!r}): "
                              f"it was moved, changed or is another model; {advice}")
    flat = {**traverse_util.flatten_dict(stored, sep="/"), **placed}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


class PhaseCheckpointer:
    """An Orbax CheckpointManager for `WORKDIR/phase{N}/checkpoints`, keeping the latest and the best."""

    def __init__(self, workdir: str | pathlib.Path, phase: int, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str = "val_macro_f1", best_mode: str = "max", every_steps: int = 0,
                 async_save: bool = True, read_only: bool = False, directory: str | pathlib.Path | None = None):
        if best_mode not in ("max", "min"):
            raise CheckpointError(f"--config.checkpoint.best_mode={best_mode!r}: use 'max' or 'min'")
        if keep < 1:
            raise CheckpointError(f"--config.checkpoint.keep={keep}: keep at least the latest checkpoint (>= 1)")
        self.phase, self.best_metric, self.best_mode = phase, best_metric, best_mode
        self.every_steps = int(every_steps)
        self.directory = pathlib.Path(directory).absolute() if directory is not None else phase_directory(workdir, phase)
        # Latest `keep` plus best `keep_best`; a step saved without metrics survives only as a latest.
        policy = preservation.AnyPreservationPolicy([
            preservation.LatestN(n=keep),
            preservation.BestN(get_metric_fn=self._metric, reverse=best_mode == "min", n=keep_best,
                               keep_checkpoints_without_metrics=False)])
        self._names = _SkippingNameFormat()
        if self.directory.is_dir():
            for step_dir in sorted(d for d in self.directory.iterdir() if d.name.isdigit() and d.is_dir()):
                problem = step_problem(step_dir)
                if problem:
                    self._skip(int(step_dir.name), problem, reload=False)
        options = ocp.CheckpointManagerOptions(
            best_fn=self._metric, best_mode=best_mode, preservation_policy=policy, create=not read_only,
            read_only=read_only, enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            step_name_format=self._names)
        with _writing(self.directory):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def from_config(cls, workdir: str | pathlib.Path, config: Any, phase: int | None = None,
                    **kwargs) -> "PhaseCheckpointer":
        c = config.checkpoint
        return cls(workdir, config.phase if phase is None else phase, keep=c.keep, keep_best=c.keep_best,
                   best_metric=c.best_metric, best_mode=c.best_mode, every_steps=c.every_steps,
                   async_save=c.async_save, **kwargs)

    @property
    def skipped_steps(self) -> list[int]:
        """Damaged steps found in the folder: left on disk, invisible to the manager."""
        return sorted(self._names.skipped)

    def _skip(self, step: int, problem: str, reload: bool = True) -> None:
        self._names.skipped.add(int(step))
        logging.warning("checkpoint %s is damaged (%s): skipped, an earlier step is used; a rerun that saves "
                        "step %d again replaces it, else delete it", self.directory / str(step), problem, step)
        if reload:
            self.manager.reload()

    def _restore_first(self, pick, params_target: Any, opt_state_target: Any, base: Any) -> Restored | None:
        """restore(pick()), skipping each step whose files fail to read, until one restores; None when
        the folder holds no step; CheckpointError when it holds only damaged ones."""
        self.manager.wait_until_finished()
        while (step := pick()) is not None:
            try:
                return self.restore(step, params_target, opt_state_target, base)
            except (OSError, ValueError) as e:
                if isinstance(e, CheckpointError) or not _unreadable(e):
                    raise
                self._skip(step, str(e).splitlines()[0][:300])
        if self._names.skipped:
            raise CheckpointError(f"{self.directory}: every checkpoint there is damaged (steps "
                                  f"{self.skipped_steps}); move the folder aside to start phase {self.phase} over")
        return None

    def _metric(self, metrics: dict) -> float:
        if self.best_metric not in metrics:
            raise KeyError(f"checkpoint metrics {sorted(metrics)} lack checkpoint.best_metric={self.best_metric!r}")
        return float(metrics[self.best_metric])

    # -------------------------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        """True every `every_steps` optimizer steps (0 = never; save at evaluations and phase end)."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def save(self, step: int, *, params: Any, opt_state: Any = None, rng: Any = None, alpha: float | None = None,
             host: dict | None = None, config: Any = None, metrics: dict | None = None, frozen: dict | None = None,
             force: bool = True) -> bool:
        """Save one step (asynchronously unless async_save=False). `metrics` makes it a best candidate;
        `frozen` (a `frozen_record`) leaves the base LLM leaves it names out of the saved params.

        A disk fault, here or from an earlier asynchronous save, raises CheckpointError. A step
        already saved is replaced: the phase's end-of-epoch save may land on a step the
        periodic save (`every_steps`) just wrote, and the later save holds the final state.
        """
        if metrics is not None:
            metrics = {k: float(_host_value(v)) for k, v in metrics.items()}
            self._metric(metrics)
        meta = {"step": int(step), "phase": self.phase, "rng": _rng_to_json(rng),
                "alpha": None if alpha is None else float(_host_value(alpha)),
                "best_metric": self.best_metric, "best_mode": self.best_mode}
        if frozen:
            params = _without(params, frozen["digests"])
        items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta),
                 HOST: ocp.args.JsonSave(host or {}), CONFIG: ocp.args.JsonSave(_config_json(config))}
        if frozen:
            items[FROZEN] = ocp.args.JsonSave(frozen)
        if opt_state is not None:
            items[OPT_STATE] = ocp.args.StandardSave(opt_state)
        with _writing(self.directory):
            if int(step) in self.all_steps():
                self.manager.wait_until_finished()      # an async save of that step must land before it goes
                self.manager.delete(int(step))
            elif int(step) in self._names.skipped:      # a damaged copy of the step this save rewrites
                if jax.process_index() == 0:            # the process that finalizes the new one, after this
                    shutil.rmtree(self.directory / str(int(step)), ignore_errors=True)
                self._names.skipped.discard(int(step))
            saved = self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force)
        kill_point(self.phase, "save", step)
        return saved

    # -------------------------------------------------------------------------------- query

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by `best_metric`; None when no saved step has metrics."""
        return self.manager.best_step() if any(self.manager.metrics(s) for s in self.all_steps()) else None

    def metrics(self, step: int) -> dict | None:
        return self.manager.metrics(step)

    # -------------------------------------------------------------------------------- restore

    def restore(self, step: int, params_target: Any, opt_state_target: Any = None, base: Any = None) -> Restored:
        """Restore `step` onto the targets' shapes, dtypes and shardings; opt_state only if a target is given.

        `opt_state_target` may be a function of the step's host state (the optimizer it belongs to:
        phase 3 before or after the LoRA freeze). `base`: the base LLM's `llm` params (or a function
        returning them), for a step that leaves them out; the params come back whole."""
        self.manager.wait_until_finished()
        step_dir = self.directory / str(int(step))
        record = read_json(step_dir / FROZEN)
        problem = architecture_problem(step_dir, params_target)
        if problem:
            raise CheckpointError(f"phase {self.phase}: {problem}; or move {self.directory} aside to start over")
        items = {META: ocp.args.JsonRestore(), HOST: ocp.args.JsonRestore(), CONFIG: ocp.args.JsonRestore()}
        out = dict(self.manager.restore(int(step), args=ocp.args.Composite(**items)))
        host = dict(out[HOST] or {})
        if callable(opt_state_target):
            opt_state_target = opt_state_target(host)
        arrays = {PARAMS: ocp.args.StandardRestore(abstract_target(_without(params_target, record.get("digests", ()))))}
        if opt_state_target is not None:
            arrays[OPT_STATE] = ocp.args.StandardRestore(abstract_target(opt_state_target))
        out.update(self.manager.restore(int(step), args=ocp.args.Composite(**arrays)))
        meta = dict(out[META])
        params = _assemble(out[PARAMS], params_target, record, base, step_dir)
        opt_state = out[OPT_STATE] if opt_state_target is not None else None
        return Restored(step=int(step), params=params, opt_state=opt_state, rng=_rng_from_json(meta.get("rng")),
                        alpha=meta.get("alpha"), host=host, config=dict(out[CONFIG] or {}), meta=meta)

    def restore_latest(self, params_target: Any, opt_state_target: Any = None, base: Any = None) -> Restored | None:
        """Resume: the latest step that reads back (a damaged one is skipped with a warning naming
        it), or None in a fresh workdir. A function `opt_state_target` gets that step's host state."""
        return self._restore_first(self.latest_step, params_target, opt_state_target, base)

    def latest_host(self) -> dict:
        """The latest step's host state alone ({} in a fresh folder), for a look at a run; a resume
        reads it from the step it restores (`restore_latest` with a function `opt_state_target`): a
        step whose arrays turn out damaged is skipped there, with its host state."""
        step = self.latest_step()
        if step is None:
            return {}
        self.manager.wait_until_finished()
        out = self.manager.restore(int(step), args=ocp.args.Composite(**{HOST: ocp.args.JsonRestore()}))
        return dict(out[HOST] or {})

    def restore_best(self, params_target: Any, opt_state_target: Any = None, base: Any = None) -> Restored | None:
        """The best step (the latest if no step has metrics) that reads back, or None if there is none."""
        return self._restore_first(lambda: self.best_step() if self.best_step() is not None else self.latest_step(),
                                   params_target, opt_state_target, base)

    def wait(self) -> None:
        """Block until the asynchronous saves are on disk; a disk fault raises CheckpointError."""
        with _writing(self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with _writing(self.directory):
            self.manager.close()

    def __enter__(self) -> "PhaseCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# Checkpoints by path: --init_from, --warm_bridge_from
# ------------------------------------------------------------------------------------------------

def resolve_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A step directory from: a step dir, its params/ item, a checkpoints/ dir or a phase dir
    (-> its best step, else latest)."""
    path = pathlib.Path(path)
    if path.name == PARAMS and path.is_dir():
        path = path.parent
    if (path / PARAMS).is_dir():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted((int(p.name), p) for p in path.glob("*") if p.is_dir() and p.name.isdigit()) \
        if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"checkpoint path {path}: no checkpoint there (want a phase dir, its checkpoints/ "
                                "dir, or a step dir holding params/)")
    meta = {}
    for _, folder in reversed(steps):      # the newest step whose meta reads (a damaged one is skipped)
        try:
            meta = read_json(folder / META)
            break
        except ValueError:
            continue
    reader = PhaseCheckpointer(None, meta.get("phase", 0), directory=path, read_only=True, async_save=False,
                               best_metric=meta.get("best_metric", "val_macro_f1"),
                               best_mode=meta.get("best_mode", "max"))
    step = reader.best_step()
    step = reader.latest_step() if step is None else step     # not a step the reader skipped
    reader.close()
    if step is None:
        raise CheckpointError(f"checkpoint path {path}: every step there is damaged; pass another checkpoint")
    return path / str(step)


def read_json(item_dir: pathlib.Path) -> dict:
    """A JsonSave item read back without a manager ({} when absent)."""
    files = [f for f in item_dir.glob("*") if f.is_file() and not f.name.startswith("_")] if item_dir.is_dir() else []
    return json.loads(files[0].read_text()) if files else {}


def restore_params(path: str | pathlib.Path, params_target: Any, base: Any = None) -> tuple[Any, dict]:
    """(params, meta) of the checkpoint at `path` (see `resolve_step_dir`), onto the target (--init_from);
    `base` as for `PhaseCheckpointer.restore`."""
    step_dir = resolve_step_dir(path)
    problem = architecture_problem(step_dir, params_target)
    if problem:
        raise CheckpointError(f"--init_from={path}: {problem}")
    record = read_json(step_dir / FROZEN)
    stored = ocp.StandardCheckpointer().restore(
        step_dir / PARAMS, abstract_target(_without(params_target, record.get("digests", ()))))
    return _assemble(stored, params_target, record, base, step_dir), read_json(step_dir / META)


def _stored_shapes(params_dir: pathlib.Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """path -> (shape, dtype) of every saved array, from the metadata alone; CheckpointError when
    Orbax finds none (it reports a damaged item's metadata as absent)."""
    item = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    if item is None:
        raise CheckpointError(f"{params_dir}: no readable array metadata; the checkpoint is damaged")
    tree = item.tree
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {path: (tuple(m.shape), m.dtype) for path, m in flat.items()}


# The config.model fields that fix the parameter shapes (a checkpoint's config records them).
ARCHITECTURE_FIELDS = ("preset", "d_visual", "num_visual_tokens", "jepa_dim", "injection_layers", "lora.rank")


def model_settings(model: Any) -> dict[str, Any]:
    """ARCHITECTURE_FIELDS of a config's `model` (a ConfigDict or a checkpoint's JSON), as JSON values
    (tuples and lists alike); None for a field it lacks."""
    out = {}
    for key in ARCHITECTURE_FIELDS:
        value = model
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        out[key] = json.loads(json.dumps(value))
    return out


def check_same_model(path: str | pathlib.Path, config: Any, flag: str) -> None:
    """CheckpointError naming the checkpoint at `path` (anything `resolve_step_dir` takes) when it was
    saved with other ARCHITECTURE_FIELDS than `config`: a cheap check of the saved config alone, for
    an entry point to run before any model is built (`flag` names where the path came from)."""
    step_dir = resolve_step_dir(path)
    saved, ours = model_settings(read_json(step_dir / CONFIG).get("model", {})), model_settings(config.model)
    differ = [f"model.{k}={saved[k]!r} (this run: {ours[k]!r})" for k in ARCHITECTURE_FIELDS
              if saved[k] is not None and saved[k] != ours[k]]
    if differ:
        raise CheckpointError(f"{flag}: checkpoint {step_dir} was saved with {', '.join(differ)}; pass the "
                              "--config.model settings it was trained with, or a checkpoint of this model")


def architecture_problem(step_dir: pathlib.Path, params_target: Any) -> str | None:
    """Why the params saved in `step_dir` cannot fill `params_target` (tensors missing, extra or of
    other shapes: a checkpoint of another model preset or sizes), in one line naming the checkpoint
    and the model settings it was saved with; None when they fit. Reads metadata only, so it runs
    before any restore or compilation."""
    try:
        stored = _stored_shapes(step_dir / PARAMS)
    except (OSError, ValueError):       # unreadable metadata is damage: the restore reports it (and skips)
        return None
    # The leaves the step leaves out to its base LLM are wanted from there (restore checks them).
    left_out = set(read_json(step_dir / FROZEN).get("digests", ()))
    wanted = {p: tuple(leaf.shape) for p, leaf in _flat(params_target).items() if p not in left_out}
    bad = [f"{p!r} saved {stored[p][0]}, this run's {wanted[p]}" for p in wanted if p in stored and stored[p][0] != wanted[p]]
    bad += [f"{p!r} (from the base LLM) not in this run's model" for p in left_out if p not in _flat(params_target)]
    bad += [f"{p!r} absent from it" for p in wanted if p not in stored]
    bad += [f"{p!r} not in this run's model" for p in stored if p not in wanted]
    if not bad:
        return None
    settings = model_settings(read_json(step_dir / CONFIG).get("model", {}))
    saved = ", ".join(f"{k}={v!r}" for k, v in settings.items() if v not in (None, "", []))
    return (f"checkpoint {step_dir} holds another model ({len(bad)} tensor(s) do not fit, first "
            f"{bad[0]}); it was saved with {saved or 'no model config'}: use the same --config.model settings "
            "or a checkpoint of this model")


def bridge_paths(params: Any) -> list[str]:
    """The warm bridge in `params`: projectors, cross-attention adapters, every LoRA tensor."""
    return vlm.select(params, vlm.BRIDGE_PATTERNS)


def count_tensors(params: Any) -> int:
    """Bridge tensors as the paper counts them: a scanned [L, ...] LoRA leaf is L tensors (3B: 27 + 392)."""
    return sum(vlm.count_bridge_tensors(params).values())


def restore_bridge(path: str | pathlib.Path, params: Any) -> tuple[Any, int]:
    """Overwrite exactly the bridge leaves of `params` with those of the phase-3 checkpoint at `path`.

    `path`: anything `resolve_step_dir` takes, or a workdir holding phase3/. Partial Orbax restore
    onto the leaves' own shardings; fails with one line if the checkpoint lacks a bridge tensor or
    stores it with another shape. Returns (params, per-layer tensor count).
    """
    path = pathlib.Path(path)
    step_dir = resolve_step_dir(path / "phase3" if (path / "phase3").is_dir() else path)
    wanted = bridge_paths(params)
    if not wanted:
        raise ValueError("warm bridge: the model has no projector_*/xattn_*/lora_[AB] parameters to restore")
    stored = _stored_shapes(step_dir / PARAMS)
    flat = {p: leaf for p, leaf in zip(phases.leaf_paths(params), jax.tree.leaves(params))}
    missing = [p for p in wanted if p not in stored]
    if missing:
        raise CheckpointError(f"warm bridge: {step_dir} lacks {len(missing)} bridge tensor(s), first {missing[0]!r}; "
                         "--warm_bridge_from must be a phase-3 checkpoint of the same model preset and LoRA config")
    bad = [(p, stored[p][0], tuple(flat[p].shape)) for p in wanted if stored[p][0] != tuple(flat[p].shape)]
    if bad:
        p, got, want = bad[0]
        raise CheckpointError(f"warm bridge: {len(bad)} shape mismatch(es) in {step_dir}, first {p!r}: checkpoint {got} "
                         f"vs model {want}; use a phase-3 checkpoint of the same preset and LoRA rank")
    target = traverse_util.unflatten_dict({tuple(p.split("/")): flat[p] for p in wanted})
    abstract = abstract_target(target)
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / PARAMS, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    new = traverse_util.flatten_dict(restored, sep="/")
    merged = phases.map_with_path(lambda p, leaf: new.get(p, leaf), params)
    count = count_tensors(restored)
    logging.info("warm bridge: restored %d tensors (%s) from %s", count, vlm.count_bridge_tensors(restored), step_dir)
    return merged, count

