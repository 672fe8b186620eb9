"""Trainability as data: a phase's regex table -> a label tree -> the (trainable, frozen) split.

    labels = trainable_labels(params, config.trainable, phase=config.phase)
    logging.info(trainable_table(params, labels, config.trainable))
    trainable, frozen = split_params(params, labels)
    grads = jax.grad(lambda t: loss(merge_params(t, frozen), batch))(trainable)

`split_params` puts `optax.MaskedNode()` where the other half has a leaf: MaskedNode is an empty
pytree node, so `jax.grad` w.r.t. `trainable` computes no gradient for a frozen weight, optax
transforms (and `optim.make_optimizer`) skip it, and the frozen half enters the step as an
argument, not as a baked-in constant. Patterns use `re.fullmatch` on '/'-joined paths such as
`llm/model/layers_0_7/self_attn/q_proj/lora_A` (docs: notes/VLM_PATHS.md).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """A jax key path -> 'a/b/c'."""
    return "/".join(_key_name(k) for k in key_path)


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of the leaves of `tree`, in flatten order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn, tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` whose function also gets the leaf's '/'-joined path first."""
    return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest)


def _compile(patterns: Sequence[str], phase: Any) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"phase {phase}: trainable pattern {pattern!r} is not a regex ({err}); "
                             "fix config.trainable") from None
    return compiled


def trainable_labels(params: Any, patterns: Sequence[str], phase: Any = None) -> Any:
    """The label tree of `params`: "trainable" where a path fully matches a pattern, else "frozen".

    A pattern that matches no leaf is an error (a typo would otherwise freeze what it meant to train).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = _compile(patterns, phase)
    paths = leaf_paths(params)
    for pattern, rx in zip(patterns, compiled):
        if not any(rx.fullmatch(p) for p in paths):
            example = paths[0] if paths else "(no parameters)"
            raise ValueError(f"phase {phase}: trainable pattern {pattern!r} matches none of the {len(paths)} "
                             f"parameters (paths look like {example!r}); fix config.trainable")
    return map_with_path(lambda p, _: TRAINABLE if any(rx.fullmatch(p) for rx in compiled) else FROZEN, params)


def freeze(labels: Any, patterns: Sequence[str]) -> Any:
    """`labels` with every leaf whose path matches a pattern set to "frozen" (e.g. LoRA after epoch 6)."""
    compiled = _compile([patterns] if isinstance(patterns, str) else patterns, "freeze")
    return map_with_path(lambda p, label: FROZEN if any(rx.fullmatch(p) for rx in compiled) else label, labels)


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


def trainable_table(params: Any, labels: Any, patterns: Sequence[str]) -> str:
    """The start-up table: per pattern its leaves / parameters / bytes, then trainable and frozen totals.

    Works on concrete arrays and on `jax.ShapeDtypeStruct` trees (`jax.eval_shape` of an init).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
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
