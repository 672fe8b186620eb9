"""Trainability as data: a phase's optimizer-group table -> a label tree -> the (trainable, frozen) split.

    labels = trainable_labels(params, config.optimizer_groups, phase=config.phase)
    logging.info(trainable_table(params, labels, config.optimizer_groups))
    trainable, frozen = split_params(params, labels)
    grads = jax.grad(lambda t: loss(merge_params(t, frozen), batch))(trainable)

The table (`config.optimizer_groups`) is a list of rows, one per group of parameters:

    dict(pattern=r".*/lora_[AB]$",   # re.fullmatch over '/'-joined param paths; the FIRST matching row
                                     # holds a parameter, and a parameter no row matches is frozen
         lr_mult=1.0,                # its updates x this (big_vision's lr_mults)
         frozen=False,               # True: frozen, though a later row would train it
         ewc=0.0,                    # > 0: EWC's pull 2 ewc (theta - theta_anchor) joins its gradient
         trust_ratio=[],             # [min, max]: updates x clip(||w|| / ||g||, min, max) (LARS-like)
         freeze_after_epoch=0)       # > 0: frozen once this many epochs are done (0 = never)

`group_rows` fills the fields a row leaves out; training/optim.py builds one optax group per row.
`split_params` puts `optax.MaskedNode()` where the other half has a leaf: MaskedNode is an empty
pytree node, so `jax.grad` w.r.t. `trainable` computes no gradient for a frozen weight, optax
transforms (and `optim.make_optimizer`) skip it, and the frozen half enters the step as an
argument, not as a baked-in constant. Paths look like `llm/model/layers_0_7/self_attn/q_proj/lora_A`
(docs: notes/VLM_PATHS.md).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"


def path_str(key_path: Sequence[Any]) -> str:
    """A jax key path -> 'a/b/c' (jax's keystr: key names, attribute names and indices; unlike
    flax.traverse_util.flatten_dict it walks any pytree, optax states and MaskedNode included)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of the leaves of `tree`, in flatten order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn, tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` whose function also gets the leaf's '/'-joined path first."""
    return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest)


GROUP_DEFAULTS = dict(lr_mult=1.0, frozen=False, ewc=0.0, trust_ratio=[], freeze_after_epoch=0)


def _row(i: int, row: Any) -> dict:
    """One table row with every field, checked; a bare string is a pattern with the defaults."""
    row = {"pattern": row} if isinstance(row, str) else dict(row)
    where = f"optimizer_groups[{i}]"
    unknown = set(row) - set(GROUP_DEFAULTS) - {"pattern"}
    if "pattern" not in row or unknown:
        raise ValueError(f"{where}: {'unknown field(s) ' + str(sorted(unknown)) if unknown else 'no pattern'}; "
                         f"a row has pattern and any of {sorted(GROUP_DEFAULTS)}")
    row = {**GROUP_DEFAULTS, **row}
    try:
        re.compile(row["pattern"])
    except re.error as err:
        raise ValueError(f"{where}: pattern {row['pattern']!r} is not a regex ({err})") from None
    ratio = list(row["trust_ratio"] or [])
    if ratio and not (len(ratio) == 2 and 0 <= ratio[0] <= ratio[1]):
        raise ValueError(f"{where}: trust_ratio={ratio!r}: use [] or [min, max] with 0 <= min <= max")
    for name in ("lr_mult", "ewc", "freeze_after_epoch"):
        if row[name] < 0:
            raise ValueError(f"{where}: {name}={row[name]!r} must be >= 0")
    return {**row, "pattern": str(row["pattern"]), "lr_mult": float(row["lr_mult"]), "frozen": bool(row["frozen"]),
            "ewc": float(row["ewc"]), "trust_ratio": [float(r) for r in ratio],
            "freeze_after_epoch": int(row["freeze_after_epoch"])}


def group_rows(table: Any) -> list[dict]:
    """The optimizer-group table with every field of every row filled in (GROUP_DEFAULTS), checked:
    ValueError naming the row for an unknown field, a bad regex or an out-of-range value."""
    return [_row(i, row) for i, row in enumerate([table] if isinstance(table, str) else table)]


def update_groups(table: Any, edits: dict) -> list[dict]:
    """The table with each row whose pattern `edits` names updated by that entry's fields (a profile
    changing, say, one row's lr_mult); a pattern that names no row is an error."""
    rows = group_rows(table)
    missing = set(edits) - {row["pattern"] for row in rows}
    if missing:
        raise ValueError(f"optimizer_groups: no row has pattern(s) {sorted(missing)}")
    return group_rows([{**row, **edits.get(row["pattern"], {})} for row in rows])


def row_indices(params: Any, table: Any) -> Any:
    """The tree of `params` with, at each leaf, the index of the first row whose pattern fully
    matches its path, or -1."""
    compiled = [re.compile(row["pattern"]) for row in group_rows(table)]
    return map_with_path(lambda p, _: next((i for i, rx in enumerate(compiled) if rx.fullmatch(p)), -1), params)


def trainable_labels(params: Any, table: Any, phase: Any = None) -> Any:
    """The label tree of `params`: "trainable" where the first row matching the path is not frozen
    (before any freeze_after_epoch), else "frozen". A row that matches no leaf is an error (a typo
    would otherwise freeze what it meant to train)."""
    rows, paths = group_rows(table), leaf_paths(params)
    for row in rows:
        if not any(re.fullmatch(row["pattern"], p) for p in paths):
            example = paths[0] if paths else "(no parameters)"
            raise ValueError(f"phase {phase}: pattern {row['pattern']!r} matches none of the {len(paths)} "
                             f"parameters (paths look like {example!r}); fix config.optimizer_groups")
    return jax.tree.map(lambda i: TRAINABLE if i >= 0 and not rows[i]["frozen"] else FROZEN,
                        row_indices(params, rows))


def freeze_epoch(table: Any) -> int:
    """The epoch from which the table's scheduled freezes apply (0 = none). One epoch per phase:
    the checkpoint records only whether it has passed."""
    epochs = sorted({row["freeze_after_epoch"] for row in group_rows(table)} - {0})
    if len(epochs) > 1:
        raise ValueError(f"optimizer_groups: rows freeze after different epochs {epochs}; use one")
    return epochs[0] if epochs else 0


def freeze_scheduled(labels: Any, table: Any) -> Any:
    """`labels` with every leaf whose row has a freeze_after_epoch set to "frozen" (phase 3's LoRA)."""
    rows = group_rows(table)
    return jax.tree.map(lambda label, i: FROZEN if i >= 0 and rows[i]["freeze_after_epoch"] else label,
                        labels, row_indices(labels, rows))


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def split_params(params: Any, labels: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params`, each with MaskedNode at the other's leaves."""
    def pick(wanted):
        return jax.tree.map(lambda label, x: x if label == wanted else optax.MaskedNode(), labels, params)
    return pick(TRAINABLE), pick(FROZEN)


def merge_params(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split_params`: the full tree, each leaf from whichever half holds it."""
    return jax.tree.map(lambda t, f: f if _is_masked(t) else t, trainable, frozen, is_leaf=_is_masked)


def _nbytes(leaf: Any) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _size(leaf: Any) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64))


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000.0
    return str(n)


def trainable_table(params: Any, labels: Any, table: Any) -> str:
    """The start-up table: per row pattern its leaves / parameters / bytes (every leaf it matches),
    then trainable and frozen totals.

    Works on concrete arrays and on `jax.ShapeDtypeStruct` trees (`jax.eval_shape` of an init).
    """
    patterns = [row["pattern"] for row in group_rows(table)]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    label_leaves = jax.tree.leaves(labels)
    rows = [("pattern", "leaves", "params", "bytes")]
    for pattern in patterns:
        rx = re.compile(pattern)
        hit = [leaf for kp, leaf in leaves if rx.fullmatch(path_str(kp))]
        rows.append((pattern, str(len(hit)), _human(sum(map(_size, hit))), _human(sum(map(_nbytes, hit)), "B")))
    totals = {}
    for (_, leaf), label in zip(leaves, label_leaves):
        n, b, c = totals.get(label, (0, 0, 0))
        totals[label] = (n + 1, b + _nbytes(leaf), c + _size(leaf))
    all_params = sum(c for _, _, c in totals.values()) or 1
    for label in (TRAINABLE, FROZEN):
        n, b, c = totals.get(label, (0, 0, 0))
        rows.append((f"= {label} ({100.0 * c / all_params:.2f}% of parameters)", str(n), _human(c), _human(b, "B")))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>9}  {r[3]:>10}" for r in rows)
