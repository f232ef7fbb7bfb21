"""The non-finite guard (train/nonfinite.py): a NaN/Inf step changes nothing but the step
counter; a streak rolls the run back once onto another noise stream; a second streak stops
the run with exit status 3 and its checkpoints as they were."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EXPERIMENT, build_method, real_batch

from t2i_jax import cli, rng
from t2i_jax.checkpoint import Checkpointer
from t2i_jax.train import input_pipeline, nonfinite
from t2i_jax.train.logging import read_metrics


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    "experiment", ["experiments/diffusion_shapes.py", "experiments/gan_shapes.py"]
)
def test_a_nonfinite_step_changes_nothing_and_a_finite_one_is_the_unguarded_step(
    experiment, data_dir, tmp_path
):
    config, builder, method, fns = build_method(experiment, data_dir, tmp_path)
    batch = jax.device_put(real_batch(config, builder, method), fns.batch_sharding)
    state = fns.init(jax.random.key(0))
    key = jax.random.key(1)
    host = jax.tree.map(np.asarray, state)  # the step donates `state`

    unguarded = jax.jit(method.train_step)
    plain_state, plain_metrics = unguarded(state, batch, key, fns.frozen)
    guarded_state, metrics = fns.train_step(jax.tree.map(jnp.asarray, host), batch, key)
    assert int(metrics.pop(nonfinite.NONFINITE)) == 0
    assert _leaves_equal(guarded_state, plain_state)  # bit for bit
    assert _leaves_equal(metrics, plain_metrics)

    poisoned = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    skipped, metrics = fns.train_step(jax.tree.map(jnp.asarray, host), poisoned, key)
    assert int(metrics[nonfinite.NONFINITE]) == 1
    assert not all(np.isfinite(float(v)) for v in metrics.values())
    assert int(skipped.step) == int(host.step) + 1
    kept = skipped.replace(step=host.step)
    assert _leaves_equal(kept, host)  # params, every player's optimizer state, the EMA


class PoisonedBatches:
    """`input_pipeline.to_global` with NaN images in the train batches numbered `bad`
    (counted over the process, from 1), recording each step's noise key."""

    def __init__(self, monkeypatch, bad: set[int]):
        self.bad, self.calls, self.keys = bad, 0, []
        to_global, step_key = input_pipeline.to_global, rng.step_key

        def poisoned(batch, sharding):
            self.calls += 1
            if self.calls in self.bad:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            return to_global(batch, sharding)

        def recorded(stream, step):
            self.keys.append((int(step), np.asarray(jax.random.key_data(stream)).tobytes()))
            return step_key(stream, step)

        monkeypatch.setattr(input_pipeline, "to_global", poisoned)
        monkeypatch.setattr(rng, "step_key", recorded)


def _train(workdir, data_dir, steps: int) -> int:
    return cli.main([
        "train", "--config", f"{EXPERIMENT}:test", "--workdir", str(workdir), "--no-progress",
        f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=3", "--config.train.log_every=2",
        "--config.train.max_consecutive_skips=3", "--config.train.eval_every=0",
        "--config.train.keep_checkpoints=10", "--config.train.async_checkpoints=False",
    ])  # fmt: skip


def test_a_streak_rolls_back_once_then_a_second_one_stops_the_run(
    tmp_path, data_dir, monkeypatch, capsys, caplog
):
    """Batch 2 poisoned: step 2 is skipped and the run goes on. Batches 5-7 poisoned:
    steps 5, 6, 7 are skipped, the third in a row rolls the run back to its step-6
    checkpoint (saved mid-streak: skipped steps leave a finite state) and it goes on to
    step 12 on another noise stream. Restarted for 6 more steps with
    its next 3 batches poisoned, it stops at once (one rollback per run, counted in the
    checkpoints), exit status 3, every checkpoint as it was."""
    workdir = tmp_path / "run"
    first = PoisonedBatches(monkeypatch, bad={2, 5, 6, 7})
    assert _train(workdir, data_dir, steps=12) == 0
    assert "rolled back to step 6 on another noise stream" in caplog.text
    assert "step 2 skipped: grad_norm, loss non-finite" in caplog.text
    assert "step 5 skipped: grad_norm, loss non-finite" in caplog.text
    # Step indices 0-7 were dispatched (step 7's flag is read after step 8 is on its way),
    # then 6-11 again after the rollback, each pass on one noise stream of its own.
    steps = [s for s, _ in first.keys]
    assert steps == [*range(8), *range(6, 12)]
    streams = [{k for _, k in first.keys[:8]}, {k for _, k in first.keys[8:]}]
    assert len(streams[0]) == len(streams[1]) == 1 and streams[0] != streams[1]
    rows = read_metrics(str(workdir))
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]
    # Skipped steps' rows hold the count and no NaN. The counters after the rollback are
    # those of the step-6 checkpoint (as a restart there would have them): step 7's skip
    # was undone.
    assert rows[0] == {"step": 2, "skipped_steps": 1}
    assert rows[1]["skipped_steps"] == 1 and rows[2] == {"step": 6, "skipped_steps": 3}
    assert all(row["skipped_steps"] == 3 and np.isfinite(row["loss"]) for row in rows[3:])
    assert Checkpointer(str(workdir / "checkpoints")).restore_meta(12) == {
        "method": "diffusion",
        "image_size": 32,
        "skipped_steps": 3,
        "rollbacks": 1,
    }

    checkpoints = workdir / "checkpoints"
    before = {p: os.path.getsize(p) for p in checkpoints.rglob("*") if p.is_file()}
    capsys.readouterr()
    PoisonedBatches(monkeypatch, bad={1, 2, 3})
    assert _train(workdir, data_dir, steps=18) == cli.EXIT_NONFINITE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "t2i: error: training stopped at step 15: grad_norm, loss non-finite in 3 steps in a "
        "row (steps 13-15), after its one rollback; the checkpoints in "
        f"{checkpoints} are as they were"
    ]
    # Step 15's checkpoint was written mid-streak (finite: skipped steps change nothing).
    after = {p: os.path.getsize(p) for p in checkpoints.rglob("*") if p.is_file()}
    assert {p: s for p, s in after.items() if "/15/" not in str(p)} == before
