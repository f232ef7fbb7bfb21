"""`t2i ablate`: every run of a sweep trained (and evaluated), one results table.

The sweep's two runs are also the CLI's test of two text encoders with files of their own:
`tfidf` (its idf stored with the run) and `embedding` (initialised from a word-vector
file); test_cli.py trains `bert`, the `trained` fixture `transformer`, the GAN `bow`."""

import hashlib
import json
import re

import numpy as np
import pytest
from helpers import EXPERIMENT, check_eval_r_precision, run_cli
from PIL import Image

from t2i_jax import config as config_lib
from t2i_jax.data import sources
from t2i_jax.errors import ConfigError
from t2i_jax.eval import ablate
from t2i_jax.text.bow import TfidfStats, fit_tfidf
from t2i_jax.text.tokenizer import Tokenizer
from t2i_jax.train.logging import read_metrics

SWEEP = """
def get_sweep(arg=None):
    return {{
        "base": {base!r},
        "runs": {{
            "tfidf": {{"text.encoder": "tfidf"}},
            "embedding": {{"text.encoder": "embedding", "text.width": {width},
                           "text.word_vectors": {vectors!r}}},
        }},
    }}
"""


def write_word_vectors(path, width: int) -> str:
    """A small GloVe-format file: a few caption words, seeded values."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "large", "small", "zebra"]
    lines = [" ".join([w, *(f"{v:.5f}" for v in rng.normal(size=width))]) for w in words]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_sweep(path, width=16) -> str:
    vectors = write_word_vectors(path.with_name("vectors.txt"), width)
    path.write_text(SWEEP.format(base=f"{EXPERIMENT}:test", width=width, vectors=vectors))
    return str(path)


def test_sweep_trains_evaluates_and_tabulates(tmp_path, evaluators_trained):
    data_dir = evaluators_trained
    sweep = write_sweep(tmp_path / "sweep.py")
    workdir = tmp_path / "sweep"
    args = ["ablate", "--sweep", sweep, "--workdir", str(workdir), "--eval", "--num", "8",
            "--no-progress", f"--config.data.dir={data_dir}", "--config.train.steps=2"]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["runs"]) == ["tfidf", "embedding"]
    table = (workdir / "results.md").read_text()
    for name, run in results["runs"].items():
        config = json.loads((workdir / name / "config.json").read_text())
        assert config["text"]["encoder"] == name and config["train"]["steps"] == 2
        metrics = [json.loads(line) for line in (workdir / name / "metrics.jsonl").open()]
        losses = [m["loss"] for m in metrics]
        assert run["final"]["loss"] == pytest.approx(sum(losses) / len(losses))  # <= 10 logged
        assert run["steps"] == 2
        # The table's evaluation is the run's own eval/metrics.json, whose R-precision is
        # that of the images in its sample grid.
        assert run["eval"] == json.loads((workdir / name / "eval" / "metrics.json").read_text())
        r_precision = check_eval_r_precision(workdir / name)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f" {r_precision:.3f} |" in row
    assert json.loads((workdir / "embedding" / "config.json").read_text())["text"]["width"] == 16
    assert "| tfidf | text.encoder=tfidf | 2 |" in table and "val R-precision" in table
    # Words missing from the vector file are counted in the log.
    assert re.search(r"word vectors from .*: \d+ of \d+ pieces missing", result.stderr)
    # The idf of the training captions is stored with the tfidf run.
    stats = TfidfStats.load(str(workdir / "tfidf" / "tfidf.npz"))
    tokenizer = Tokenizer.load(str(workdir / "tfidf" / "tokenizer.model"))
    builder = sources.load_builder("t2i_shapes", data_dir, "small")
    tokens, mask = tokenizer.encode(sources.training_captions(builder), 16)
    assert len(tokens) == int(stats.num_documents) == 512
    np.testing.assert_array_equal(stats.idf, fit_tfidf(tokens, mask, stats.vocab_size).idf)
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3

    # The same workdir with other settings is refused before anything is trained.
    changed = run_cli("ablate", "--sweep", sweep, "--workdir", str(workdir),
                      f"--config.data.dir={data_dir}", "--config.text.width=8")  # fmt: skip
    assert changed.returncode == 2, changed.stderr
    assert "holds a run with other settings (text.width)" in changed.stderr


def test_sweep_over_seeds_reports_mean_and_std(tmp_path, evaluators_trained):
    """`--seeds 0,1`: each entry trained once per seed in its own workdir, every metric the
    mean and sample std (ddof 1) of the seeds' own values, in the json, table and chart."""
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        f"def get_sweep(arg=None):\n    return {{'base': '{EXPERIMENT}:test', "
        "'runs': {'bow': {'text.encoder': 'bow'}}}\n"
    )
    workdir = tmp_path / "sweep"
    args = ["ablate", "--sweep", str(sweep), "--workdir", str(workdir), "--eval", "--num", "8",
            "--seeds", "0,1", "--no-progress", f"--config.data.dir={evaluators_trained}",
            "--config.train.steps=2"]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["runs"]) == ["bow"]
    run = results["runs"]["bow"]
    per_seed = {}
    for seed in (0, 1):
        seed_dir = workdir / "bow" / f"seed_{seed}"
        assert json.loads((seed_dir / "config.json").read_text())["seed"] == seed
        entry = run["seeds"][str(seed)]
        assert entry["eval"] == json.loads((seed_dir / "eval" / "metrics.json").read_text())
        # The config's hash is that of the run's config.json; its minutes, the last logged.
        sha = hashlib.sha256((seed_dir / "config.json").read_bytes()).hexdigest()
        assert entry["config_sha256"] == sha
        rows = read_metrics(str(seed_dir), perf=True)
        assert entry["minutes"] == rows[-1]["perf"]["elapsed_min"] > 0
        losses = [json.loads(line)["loss"] for line in (seed_dir / "metrics.jsonl").open()]
        per_seed[seed] = {
            "final loss": float(np.mean(losses)),
            "val R-precision": entry["eval"]["splits"]["validation"]["generated"]["r_precision"],
        }
    assert per_seed[0]["final loss"] != per_seed[1]["final loss"]  # the seed was used
    table = (workdir / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| bow |"))
    assert row.startswith("| bow | text.encoder=bow | 2 | 2 |")  # steps, then n
    assert "| minutes |" in table.splitlines()[4]
    for label in ("final loss", "val R-precision"):
        values = [per_seed[0][label], per_seed[1][label]]
        stats = run["summary"][label]
        assert stats["n"] == 2 and stats["values"] == pytest.approx(values)
        assert stats["mean"] == pytest.approx(np.mean(values))
        assert stats["std"] == pytest.approx(np.std(values, ddof=1))
        assert f" {stats['mean']:.3f} ± {stats['std']:.3f} |" in row
    with Image.open(workdir / "results.png") as chart:
        assert chart.format == "PNG" and min(chart.size) > 100

    # Called again with a third seed, the sweep tables the two finished runs before it
    # trains anything (here the training is cut short): a stopped sweep's table keeps
    # every run an earlier call finished.
    overrides = [a.removeprefix("--config.") for a in args if a.startswith("--config.")]
    (workdir / "results.json").unlink()
    (workdir / "results.md").unlink()

    def stopped(config, path, **kwargs):
        raise KeyboardInterrupt(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("t2i_jax.train.loop.train_and_evaluate", stopped)
        with pytest.raises(KeyboardInterrupt, match="seed_2"):
            ablate.run_sweep(str(sweep), str(workdir), overrides, evaluate=True, num=8,
                             seeds=(0, 1, 2), show_progress=False)  # fmt: skip
    again = json.loads((workdir / "results.json").read_text())
    assert again["seeds"] == [0, 1, 2] and again["runs"] == results["runs"]
    assert (workdir / "results.md").read_text().replace("Seeds 0, 1, 2", "Seeds 0, 1") == table

    # Another setting in the same workdir is refused before anything is trained.
    changed = run_cli(*args[:-1], "--config.train.steps=2", "--config.text.width=8")
    assert changed.returncode == 2 and "holds a run with other settings (text.width)" in (
        changed.stderr
    )


def test_a_resumed_sweep_reuses_a_current_evaluation(tmp_path):
    """A finished run's own eval/metrics.json stands when it is of the run's step, the
    sweep's count and seed and the config's sample options; anything else is redone."""
    from t2i_jax import config as config_lib

    config = config_lib.load_config(f"{EXPERIMENT}:test")
    options = {"guidance": 3.0, "steps": 4, "sampler": "ddim", "eta": 0.0, "sigma_max": 80.0}
    assert options["steps"] == config.diffusion.sample_steps
    (tmp_path / "eval").mkdir()
    for step, num, changed, current in [
        (6, 8, {}, True),
        (5, 8, {}, False),  # trained further since
        (6, 16, {}, False),  # another count
        (6, 8, {"sampler": "heun"}, False),  # `t2i eval --sampler heun` without --out-dir
    ]:
        metrics = {"step": step, "num": num, "seed": 0, "sample_options": {**options, **changed}}
        (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
        found = ablate.current_eval(str(tmp_path), config, 6, num=8, seed=0)
        assert (found == metrics) if current else found is None
    # A record from before `sigma_max` was an option: sampled from the schedule's largest
    # sigma. That is DDIM's sample whatever sigma_max says; Heun's only for a config that
    # predates the option too.
    older = {k: v for k, v in options.items() if k != "sigma_max"}
    for sampler, current in [("ddim", True), ("heun", False)]:
        config.diffusion.sampler = sampler
        metrics = {"step": 6, "num": 8, "seed": 0, "sample_options": {**older, "sampler": sampler}}
        (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
        found = ablate.current_eval(str(tmp_path), config, 6, num=8, seed=0)
        assert (found == metrics) if current else found is None
    del config.diffusion["sigma_max"]
    assert ablate.current_eval(str(tmp_path), config, 6, num=8, seed=0) == metrics


def test_a_run_can_use_an_earlier_runs_directory(tmp_path):
    """`{run:NAME}` is NAME's run directory of the same seed (latent diffusion's VAE); a run
    may name its own base experiment."""
    sweep = {
        "runs": {
            "first": {"base": f"{EXPERIMENT}:test"},
            "second": {"base": f"{EXPERIMENT}:test", "text.word_vectors": "{run:first}/v.txt"},
        }
    }
    path = tmp_path / "sweep.py"
    path.write_text(f"def get_sweep(arg=None):\n    return {sweep!r}\n")
    configs = ablate.run_configs(ablate.load_sweep(str(path)), [])
    assert configs["second"].text.word_vectors == "{run:first}/v.txt"  # until it runs
    for seed, where in ((None, "first"), (2, "first/seed_2")):
        config = ablate.job_config(configs["second"], "/w", seed)
        assert config.text.word_vectors == f"/w/{where}/v.txt"
        assert config.seed == (0 if seed is None else seed)
    assert ablate.job_config(configs["first"], "/w", 2).seed == 2


@pytest.mark.parametrize(
    "sweep_text, message",
    [
        ("def get_sweep(arg=None):\n    return {'runs': {}}\n", "get_sweep must return"),
        (
            "def get_sweep(arg=None):\n    return {'base': 'x.py', 'runs': {'a': "
            "{'ldm.autoencoder': '{run:b}'}, 'b': {}}}\n",
            "run 'a' uses {run:b}, which is not an earlier run",
        ),
        (None, "sweep run 'embedding': unknown config key 'text.widht'"),
    ],
)
def test_bad_sweeps_fail_before_training(tmp_path, data_dir, sweep_text, message):
    path = tmp_path / "sweep.py"
    if sweep_text is None:
        write_sweep(path)
        path.write_text(path.read_text().replace('"text.width"', '"text.widht"'))
    else:
        path.write_text(sweep_text)
    workdir = tmp_path / "sweep"
    result = run_cli("ablate", "--sweep", str(path), "--workdir", str(workdir),
                     f"--config.data.dir={data_dir}")  # fmt: skip
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists()  # Nothing was trained, not even the first (valid) run.


def test_a_key_added_to_the_experiment_since_a_run_started(tmp_path):
    """An existing run whose saved config lacks a key the experiment has gained is the same
    run, unless the sweep entry or the command line sets that key; a changed key that the
    run has is another run."""
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    saved = config.to_dict()
    del saved["model"]["pooled_text"]  # as written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    ablate.check_existing_run(str(tmp_path), config, "old")  # no error
    with pytest.raises(ConfigError, match=r"other settings \(model.pooled_text\)"):
        ablate.check_existing_run(str(tmp_path), config, "old", {"model.pooled_text"})
    config.text.width += 8
    with pytest.raises(ConfigError, match=r"other settings \(text.width\)"):
        ablate.check_existing_run(str(tmp_path), config, "old")


def test_one_seed_has_no_std_and_its_cell_is_its_value():
    """A partial seeded sweep: an entry with one seed done shows its value and n = 1, not a
    "± 0.000" that was never measured; two seeds show their sample std."""
    entries = [{"final": {"loss": v}, "minutes": 2.0, "eval": None} for v in (1.0, 3.0)]
    one, two = ablate.summarise(entries[:1]), ablate.summarise(entries)
    assert one["final loss"] == {"mean": 1.0, "std": None, "n": 1, "values": [1.0]}
    assert two["final loss"]["std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    results = {
        "a": {"changes": {}, "steps": 5, "summary": one},
        "b": {"changes": {}, "steps": 5, "summary": two},
    }
    rows = ablate.results_table(results, seeded=True)[2:]
    assert rows[0] == "| a | - | 5 | 1 | 2.0 | 1.000 |"
    assert rows[1] == f"| b | - | 5 | 2 | 2.0 | 2.000 ± {np.std([1.0, 3.0], ddof=1):.3f} |"


def test_results_name_a_base_under_the_working_directory_relatively(tmp_path, monkeypatch):
    """Sweep files give their bases absolute paths (to run from any folder); results.json
    records one under the working directory by its relative path, so a committed record
    names no machine's folders."""
    monkeypatch.chdir(tmp_path)
    inside = {"base": str(tmp_path / "experiments" / "vae.py") + ":demo", "vae.beta": 2.0}
    assert ablate.recorded_changes(inside) == {"base": "experiments/vae.py:demo", "vae.beta": 2.0}
    outside = {"base": "/elsewhere/vae.py:demo"}
    assert ablate.recorded_changes(outside) == outside
    assert ablate.recorded_changes({"vae.beta": 2.0}) == {"vae.beta": 2.0}
