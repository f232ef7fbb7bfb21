"""FSDP: parameters and optimizer state split over `mesh.fsdp`, the same training as
data parallelism, and checkpoints that restore onto other meshes."""

import math

import jax
import numpy as np
import pytest
from helpers import build_method, real_batch, train_steps

from t2i_jax import sharding
from t2i_jax.checkpoint import Checkpointer
from t2i_jax.runs.loading import abstract_state
from t2i_jax.train import loop

MIN_SHARD = 1024  # below the default, so that the small test networks have many to split


@pytest.fixture(scope="module")
def method_and_batch(data_dir, tmp_path_factory):
    config, builder, method, _ = build_method(
        "experiments/diffusion_shapes.py",
        data_dir,
        tmp_path_factory.mktemp("fsdp"),
        **{"train.batch_size": 8, "mesh.min_shard_size": MIN_SHARD},
    )
    return config, method, real_batch(config, builder, method)


def compiled(config, method, devices, **mesh):
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh)
    return loop.compile_functions(method, config, sharding.make_mesh(devices, config))


def train(fns, batch, steps: int):
    state, logs = train_steps(fns, batch, steps)
    return state, [log["loss"] for log in logs]


def test_fsdp_shards_the_state_and_trains_like_one_device(method_and_batch):
    config, method, batch = method_and_batch
    fsdp = compiled(config, method, jax.devices(), data=1, fsdp=8)
    one = compiled(config, method, jax.devices()[:1])
    state, losses = train(fsdp, batch, steps=3)

    # Each device holds 1/8 of every tensor of MIN_SHARD elements or more: parameters, EMA
    # and both Adam moments alike. (Every such tensor of this network has a dimension
    # that 8 divides and that its logical axes name.)
    large = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        (state.params, state.ema_params, state.opt_state)
    ):
        name = jax.tree_util.keystr(path)
        if leaf.size < MIN_SHARD:
            assert leaf.sharding.is_fully_replicated, name
            continue
        large += 1
        assert "fsdp" in leaf.sharding.spec, name
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            assert math.prod(shard.data.shape) * 8 == leaf.size, name
    assert large >= 30  # the UNet's convolutions and attention, the text transformer

    # The same math in another order: XLA sums the batch mean over 8 shards and gathers
    # the parameters, one device does neither. float32 round-off only: measured 3.6e-7
    # relative on the losses and 3.8e-8 absolute on the parameters after 3 steps; the
    # bounds are those of the 1-vs-8-device data-parallel test (test_diffusion.py).
    reference, ref_losses = train(one, batch, steps=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[2]  # the steps changed the parameters
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)),
        jax.tree.leaves(jax.device_get(reference.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoints_restore_across_meshes(method_and_batch, tmp_path):
    """Saved sharded on 8 devices, restored on 4 and on 1; saved on 1, restored on 8."""
    config, method, batch = method_and_batch
    eight = compiled(config, method, jax.devices(), data=1, fsdp=8)
    state, _ = train(eight, batch, steps=1)
    expected = jax.device_get(state)

    def restore_on(directory, devices, **mesh):
        cfg = config.copy_and_resolve_references()
        cfg.mesh.update(mesh)
        target = abstract_state(method, cfg, sharding.make_mesh(devices, cfg), {})
        checkpointer = Checkpointer(str(directory), read_only=True)
        restored = checkpointer.restore(1, target)
        checkpointer.close()
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
            assert leaf.sharding == want.sharding
        return restored

    saved = Checkpointer(str(tmp_path / "on8"))
    saved.save(1, state, None)
    saved.close()
    on4 = restore_on(tmp_path / "on8", jax.devices()[:4], data=1, fsdp=4)
    on1 = restore_on(tmp_path / "on8", jax.devices()[:1])
    for restored in (on4, on1):
        for a, b in zip(
            jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected), strict=True
        ):
            np.testing.assert_array_equal(a, b)

    back = Checkpointer(str(tmp_path / "on1"))
    back.save(1, on1, None)
    back.close()
    on8 = restore_on(tmp_path / "on1", jax.devices(), data=2, fsdp=4)
    assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(on8.params))
    for a, b in zip(jax.tree.leaves(jax.device_get(on8)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
