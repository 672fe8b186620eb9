"""The rules table and mesh helpers."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_as_host_f32_widens_bf16_and_keeps_integers():
    """What reaches numpy, scikit-learn or JSON from a bf16 computation is f32 (scikit-learn rejects
    ml_dtypes bfloat16 as non-numeric); ints and bools keep their dtype, f64 stays f64."""
    from sklearn.metrics import roc_auc_score
    tree = {"p": jnp.asarray([0.2, 0.7, 0.4], jnp.bfloat16), "y": jnp.asarray([0, 1, 1], jnp.int32),
            "m": jnp.asarray([True, False, True]), "d": np.ones(2, np.float64)}
    host = sharding.as_host_f32(tree)
    assert {k: v.dtype for k, v in host.items()} == {"p": np.float32, "y": np.int32, "m": np.bool_, "d": np.float64}
    assert roc_auc_score(host["y"], host["p"]) == 1.0


def test_mesh_spec_parses_resolves_and_names_the_flag_when_wrong():
    assert sharding.parse_mesh("data:2,fsdp:2,tensor:2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_sizes("fsdp:-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.mesh_sizes("data:2,tensor:-1", 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert sharding.batch_shards({"data": 2, "fsdp": 2, "tensor": 2}) == 4     # batch -> (data, fsdp)
    for spec, count, words in (("data:3", 8, "data*fsdp*tensor = 3 but 8 devices"),
                               ("data:-1,fsdp:-1", 8, "at most one axis may be -1"),
                               ("pipeline:2", 8, "axis:size pairs"), ("data:0", 8, "axis:size pairs"),
                               ("fsdp:3,data:-1", 8, "not divisible by 3")):
        with pytest.raises(ValueError, match="--config.mesh=") as error:
            sharding.mesh_sizes(spec, count)
        assert words in str(error.value) and "\n" not in str(error.value)
    mesh = sharding.mesh_from_spec("data:2,fsdp:2,tensor:2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
