"""The rules table and mesh helpers."""

import jax
import pytest

from kervljepa_jax import sharding


def test_every_logical_name_maps_to_known_mesh_axes():
    for name, target in sharding.AXIS_RULES:
        targets = target if isinstance(target, tuple) else (target,)
        assert all(t is None or t in sharding.MESH_AXES for t in targets), name
    assert len(set(sharding.LOGICAL_AXES)) == len(sharding.LOGICAL_AXES)


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="8 devices"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_constrain_is_noop_without_mesh_and_shards_with_one():
    x = jax.numpy.ones((8, 4))
    assert sharding.constrain(x, ("batch", "act_embed")) is x
    mesh = sharding.make_mesh(data=8)
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "act_embed")))(x)
    assert y.addressable_shards[0].data.shape == (1, 4)  # batch split over the 8 data devices
