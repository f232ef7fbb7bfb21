"""A run stopped after N steps and resumed to 2N equals 2N steps straight, bit for bit.

(Same seed, same numbers across separate processes is tested through the CLI in
test_cli.py, whose killed-and-resumed runs are compared with a reference run.)"""

import jax
import numpy as np

from t2i_jax.eval.sample import load_run
from t2i_jax.train.logging import read_metrics
from t2i_jax.train.loop import train_and_evaluate


def params_of(workdir):
    return jax.device_get(load_run(str(workdir))[3])


def test_resume_is_bitwise_equal(test_config, tmp_path):
    n = 3
    test_config.train.steps = 2 * n
    test_config.train.checkpoint_every = n
    test_config.train.log_every = 1  # The first leg logs its last step; so does straight.
    straight = tmp_path / "straight"
    train_and_evaluate(test_config, str(straight), show_progress=False)

    resumed = tmp_path / "resumed"
    first = test_config.copy_and_resolve_references()
    first.train.steps = n
    train_and_evaluate(first, str(resumed), show_progress=False)
    assert int(params_of(resumed).step) == n
    train_and_evaluate(test_config, str(resumed), show_progress=False)

    a, b = params_of(straight), params_of(resumed)
    assert int(a.step) == int(b.step) == 2 * n
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert read_metrics(str(resumed)) == read_metrics(str(straight))
