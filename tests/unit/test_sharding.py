"""effopd_jax.sharding: mesh construction, logical rules, and sharded == single-device numerics.

Runs on the 8 virtual CPU devices conftest.py requests (mesh data=2, fsdp=2, tensor=2).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from effopd_jax import sharding
from effopd_jax.models.qwen import Qwen, init_cache, param_logical_axes
from helpers_qwen import random_params, stack_layers, tiny_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(sharding.make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, -1, 1, devices=jax.devices()[:2]).shape)["fsdp"] == 2
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match="does not equal"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="tensor"):
        sharding.make_mesh(data=-1, tensor=0)


def test_rules_cover_every_logical_axis_and_map_to_mesh_axes():
    ruled = {name for name, _ in sharding.LOGICAL_RULES}
    used = set()
    for scan in (False, True):
        specs = param_logical_axes(tiny_config(scan_layers=scan, o_proj_bias=True))
        for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
            used.update(spec)
    used |= {"act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
             "act_vocab"}
    assert used <= ruled
    for _, target in sharding.LOGICAL_RULES:
        targets = target if isinstance(target, tuple) else (target,)
        assert set(targets) <= set(sharding.MESH_AXES) | {None}


def test_param_batch_and_cache_shardings():
    mesh = sharding.make_mesh(2, 2, 2)
    config = tiny_config(scan_layers=True)
    shardings = sharding.param_shardings(config, mesh)
    assert shardings["embed_tokens"]["embedding"].spec == PartitionSpec("tensor", "fsdp")
    assert shardings["lm_head"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    assert shardings["layers"]["mlp"]["down_proj"]["kernel"].spec == PartitionSpec(None, "tensor", "fsdp")
    assert shardings["layers"]["self_attn"]["k_proj"]["bias"].spec == PartitionSpec(None, "tensor")
    assert shardings["norm"]["scale"].spec == PartitionSpec(None)
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"), None)
    cache = sharding.cache_shardings(config, mesh)
    assert cache.k.spec == PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
    assert cache.index.spec == PartitionSpec()


@functools.partial(jax.jit, static_argnames="config")
def forward(config, params, ids, attention_mask):
    return Qwen(config).apply({"params": params}, ids, attention_mask=attention_mask)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_forward_equals_single_device(scan_layers):
    base = tiny_config()
    params = random_params(base)
    config = dataclasses.replace(base, scan_layers=scan_layers)
    if scan_layers:
        params = stack_layers(base, params)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 6)))
    mask = jnp.asarray(np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [1] * 6, [0] * 5 + [1]]))
    want = forward(config, params, ids, mask)

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = jax.device_put(params, sharding.param_shardings(config, mesh))
    batch = sharding.batch_sharding(mesh)
    with sharding.sharding_context(mesh):
        sharded_fn = jax.jit(lambda p, i, m: Qwen(config).apply(
            {"params": p}, i, attention_mask=m))
        args = (sharded_params, jax.device_put(ids, batch), jax.device_put(mask, batch))
        got = sharded_fn(*args)
        hlo = sharded_fn.lower(*args).as_text()
    # The logical constraints reached the program and shaped the output's layout.
    assert "tensor" in hlo and ("sharding_constraint" in hlo or "@Sharding" in hlo)
    expected = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    assert got.sharding.is_equivalent_to(expected, 3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_kv_cache_decode_equals_single_device():
    config = tiny_config(scan_layers=True)
    params = stack_layers(tiny_config(), random_params(tiny_config()))
    batch_size, prompt, total = 4, 4, 6
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (batch_size, total)))
    mask = np.ones((batch_size, total), np.int32)
    mask[1, :2] = 0
    mask = jnp.asarray(mask)

    def run(p, cache):
        logits, cache = Qwen(config).apply({"params": p}, ids[:, :prompt], attention_mask=mask,
                                           cache=cache)
        step, cache = Qwen(config).apply({"params": p}, ids[:, prompt:prompt + 1],
                                         attention_mask=mask, cache=cache)
        return jnp.concatenate([logits, step], axis=1), cache

    want, _ = jax.jit(run)(params, init_cache(config, batch_size, total, jnp.float32))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cache_shardings = sharding.cache_shardings(config, mesh)
    with sharding.sharding_context(mesh):
        cache = jax.device_put(init_cache(config, batch_size, total, jnp.float32), cache_shardings)
        got, new_cache = jax.jit(run, out_shardings=(None, cache_shardings))(
            jax.device_put(params, sharding.param_shardings(config, mesh)), cache)
    assert int(new_cache.index) == prompt + 1
    assert new_cache.k.sharding.is_equivalent_to(cache_shardings.k, 5)
    real = np.asarray(mask[:, :prompt + 1]).astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
