"""Logical axis names -> mesh axes: the one rules table, and the helpers that apply it.

Every weight and main activation in the model carries logical axis names (see
`LOGICAL_AXES`). Modules never name a mesh axis; they call
`flax.linen.with_logical_partitioning` on initialisers and `constrain` on
activations. `AXIS_RULES` maps those names onto the mesh axes (data, fsdp, tensor).
A multi-host run is the same code under `jax.distributed.initialize()`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Weights use the plain names, activations the `act_` names, so that the two may map
# differently (an activation's embed dim is replicated while the weight's is fsdp-sharded).
AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("slices", None),
    ("zones", None),
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("visual_embed", "fsdp"),
    ("classes", None),
    ("proj", None),
)

LOGICAL_AXES = tuple(name for name, _ in AXIS_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}; fix the mesh sizes")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices are visible; "
                         "set the mesh sizes to multiply to the device count")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def parse_mesh(spec: str) -> dict[str, int]:
    """`--config.mesh` -> axis sizes: "data:2,fsdp:2,tensor:2" -> {"data": 2, "fsdp": 2, "tensor": 2}.

    An axis left out has size 1; one axis may be -1 (every remaining device)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (t.strip() for t in spec.split(","))):
        name, _, size = item.partition(":")
        if name not in MESH_AXES or not size.lstrip("-").isdigit() or int(size) == 0 or int(size) < -1:
            raise ValueError(f"--config.mesh={spec!r}: write axis:size pairs such as 'data:2,fsdp:4' with axes "
                             f"{'/'.join(MESH_AXES)} and sizes >= 1 (one may be -1: the remaining devices)")
        sizes[name] = int(size)
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--config.mesh={spec!r}: at most one axis may be -1")
    return sizes


def mesh_sizes(spec: str, num_devices: int) -> dict[str, int]:
    """`parse_mesh` with the -1 resolved against `num_devices`; a product that is not the device
    count is an error naming the flag."""
    sizes = parse_mesh(spec)
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if num_devices % known:
            raise ValueError(f"--config.mesh={spec!r}: {num_devices} devices are not divisible by {known}")
        sizes = {k: num_devices // known if v == -1 else v for k, v in sizes.items()}
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise ValueError(f"--config.mesh={spec!r}: data*fsdp*tensor = {total} but {num_devices} devices are "
                         f"visible; make the sizes multiply to {num_devices} (or set one to -1)")
    return sizes


def batch_shards(sizes: dict[str, int]) -> int:
    """How many ways the batch is split: the mesh axes that the logical 'batch' axis maps to."""
    axes = dict(AXIS_RULES)["batch"]
    return int(np.prod([sizes[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh that `--config.mesh` names, over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(spec, len(devices))
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> Iterator[Mesh]:
    """Activate the mesh and the rules table: inside, logical constraints become real."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_mesh`."""
    return nn.with_logical_constraint(x, names)


def logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree of `nn.LogicallyPartitioned` boxes (from init/eval_shape)."""
    return nn.get_partition_spec(boxed_tree)


def named_shardings(boxed_tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> Any:
    """NamedShardings for every leaf of a boxed (logically annotated) tree.

    A dimension that its mesh axes do not divide is replicated instead: the 3B vocabulary with
    <|visual_region|> appended has 128,257 rows, which no tensor axis splits evenly."""
    shardings = nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    shapes = jax.tree.map(lambda x: tuple(np.shape(x.value)) if is_box(x) else tuple(np.shape(x)), boxed_tree,
                          is_leaf=is_box)
    return jax.tree.map(lambda s, shape: divisible(s, shape), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def divisible(named: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`named` with each dimension that its mesh axes do not divide evenly left unsharded."""
    spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
    for dim, axes in enumerate(spec[:len(shape)]):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if shape[dim] % int(np.prod([named.mesh.shape[a] for a in names])):
            spec[dim] = None
    return NamedSharding(named.mesh, PartitionSpec(*spec[:len(shape)]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params: Any, shardings: Any) -> Any:
    """Place an (unboxed) param tree onto its shardings."""
    return jax.tree.map(jax.device_put, params, shardings)


def host_copy(tree: Any) -> Any:
    """A param tree as numpy on every process, whatever its sharding: device_get when this
    process holds every shard, an all-gather over processes (multi-host FSDP) otherwise."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # only multi-host runs need it
    return multihost_utils.process_allgather(tree, tiled=True)


def as_host_f32(tree: Any) -> Any:
    """`tree` on the host as numpy, every floating leaf at least f32.

    What leaves the device for numpy, scikit-learn or JSON goes through here: a bf16 computation
    (the 3B preset) returns ml_dtypes bfloat16 arrays, which scikit-learn rejects as non-numeric
    and which round 0.801 to 0.80078. Integer and bool leaves keep their dtype."""
    def widen(x):
        x = np.asarray(x)
        narrow_float = jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and x.dtype.itemsize < 4
        return x.astype(np.float32) if narrow_float else x
    return jax.tree.map(widen, host_copy(tree))


def host_strings(local: list[str]) -> list[str]:
    """Every process's `local` strings, in process order (the order of a batch's rows split over
    processes): the volume names that go with gathered outputs. One process: `local` itself."""
    if jax.process_count() == 1:
        return list(local)
    from jax.experimental import multihost_utils  # only multi-host runs need it
    encoded = [s.encode("utf-8") for s in local]
    width = int(np.max(multihost_utils.process_allgather(np.asarray([max(map(len, encoded), default=0)]))))
    rows = np.zeros((len(encoded), max(width, 1)), np.uint8)
    for i, b in enumerate(encoded):
        rows[i, :len(b)] = np.frombuffer(b, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in gathered]
