"""evaluate_run on a tiny trained run: metrics.json, sample grids, the report's table."""

import json
import os
import pathlib

import jax
import pytest
from helpers import EXPERIMENT

from t2i_jax import config as config_lib
from t2i_jax.errors import UserError
from t2i_jax.eval.evaluate import evaluate_run, load_inception
from t2i_jax.eval.training_probe import make_training_probe
from t2i_jax.metrics import fid
from t2i_jax.train import report
from t2i_jax.train.logging import read_metrics
from t2i_jax.train.loop import train_and_evaluate

NUM = 16  # captions per split; the small splits have 64


PROBE_STEPS = 3  # the training probe's sampler steps


@pytest.fixture(scope="module")
def run(evaluators_trained, tmp_path_factory):
    """A 2-step run of the experiment's `test` variant on the session's small data, its
    alignment probed during training at both steps."""
    data_dir = evaluators_trained
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    config.data.dir = data_dir
    config.train.steps = 2
    config.train.checkpoint_every = 2
    config.train.update(eval_every=1, probe_num=NUM, probe_sample_steps=PROBE_STEPS)
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(
        config, workdir, show_progress=False, devices=jax.devices()[:1], probe=make_training_probe
    )
    return workdir


def test_the_training_probe_reads_what_t2i_eval_reads(run, tmp_path):
    """The probe's last reading is `t2i eval`'s validation numbers for the same captions,
    seed and sampler steps; the report plots it against the run's minutes."""
    records = read_metrics(run, perf=True)
    probed = [r for r in records if "probe_caption" in r]
    assert [r["step"] for r in probed] == [1, 2]
    minutes = [r["perf"]["elapsed_min"] for r in probed]
    assert 0 < minutes[0] <= minutes[1]
    options = {"steps": PROBE_STEPS}
    evaluated = evaluate_run(run, num=NUM, seed=0, batch_size=NUM, use_inception=False,
                             sample_options=options, out_dir=str(tmp_path))  # fmt: skip
    want = evaluated["splits"]["validation"]["generated"]
    got = {k.removeprefix("probe_"): v for k, v in probed[-1].items() if k.startswith("probe_")}
    assert got.pop("r_precision") == want["r_precision"]
    assert got == want["attribute_accuracy"] and "caption" in got and "position" in got
    text = pathlib.Path(run, "report.md").read_text()
    assert (
        "## Alignment during training" in text and "![alignment during training](probe.png)" in text
    )
    assert f"| 2 | {minutes[1]:.1f} |" in text
    assert os.path.getsize(os.path.join(run, "probe.png")) > 0


@pytest.fixture(scope="module")
def evaluated(run):
    first = evaluate_run(run, num=NUM, seed=0, batch_size=8, use_inception=False)
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        first_file = json.load(f)
    second = evaluate_run(run, num=NUM, seed=0, batch_size=8, use_inception=False)
    return run, first, first_file, second


def test_same_seed_same_numbers(evaluated):
    run, first, first_file, second = evaluated
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        second_file = json.load(f)
    assert first_file == second_file
    assert json.loads(json.dumps(first)) == first_file
    assert first["step"] == 2 and first["num"] == NUM and first["seed"] == 0
    assert set(first["evaluators"]) == {"seed", "probe", "contrastive"}


def test_metrics_cover_both_splits_and_references(evaluated):
    _, metrics, _, _ = evaluated
    assert set(metrics["splits"]) == {"validation", "compositional"}
    for split in metrics["splits"].values():
        assert split["num_mismatched"] <= NUM - 1 and split["folds"] == 10
        gen, real = split["generated"], split["real"]
        for m in (gen, real):
            acc = m["attribute_accuracy"]
            assert "position2" not in acc  # never named by a caption
            # Whole caption <= every attribute that every caption names.
            everywhere = ("num_objects", "shape", "color", "size")
            assert 0.0 <= acc["caption"] <= min(acc[k] for k in everywhere)
            assert 0.0 <= m["r_precision"] <= 1.0 and m["clip_score"] >= 0.0
        assert gen["probe_fd"] > 0.0
        # Real vs real on other examples of the same split (64 >= 2 * 16).
        assert real["probe_fd"] is not None and real["probe_fd"] < gen["probe_fd"]
        # A 2-step generator is far from the real images of the captions.
        assert real["attribute_accuracy"]["color"] > gen["attribute_accuracy"]["color"]
        for m in (gen, real):
            check_by_objects(m, split["count"])


def check_by_objects(measured: dict, count: int) -> None:
    """The one- and two-object accuracies partition the split: their counts add up to it,
    each attribute's count-weighted mean is its accuracy over the split, and each subset
    has only the attributes its captions name (position: one object; relation: two)."""
    whole, by = measured["attribute_accuracy"], measured["attribute_accuracy_by_objects"]
    assert set(by) <= {"1", "2"} and sum(s["count"] for s in by.values()) == count
    for key in ("num_objects", "shape", "color", "size", "caption"):
        mixed = sum(s[key] * s["count"] for s in by.values()) / count
        assert mixed == pytest.approx(whole[key], abs=1e-12), key
    if "1" in by:
        assert "position" in by["1"] and "relation" not in by["1"]
    if "2" in by:
        assert "relation" in by["2"] and "position" not in by["2"]


def test_grids_and_report_section(evaluated):
    run, metrics, _, _ = evaluated
    for split in ("validation", "compositional"):
        assert os.path.getsize(os.path.join(run, "eval", f"samples_{split}.png")) > 0
    with open(os.path.join(run, "report.md")) as f:
        text = f.read()
    assert text.startswith("# Run report:")
    assert "## Samples at step 2" in text  # the training part is still there
    assert text.count("## Evaluation") == 1  # evaluated twice: replaced, not appended
    row = next(line for line in text.splitlines() if line.startswith("| R-precision |"))
    value = metrics["splits"]["validation"]["generated"]["r_precision"]
    assert row.split("|")[2].strip() == f"{value:.3f}"
    assert "| probe_fd (lower is better) |" in text
    assert "| contrastive_fd (lower is better) |" in text
    by = metrics["splits"]["validation"]["generated"]["attribute_accuracy_by_objects"]
    for n, subset in by.items():
        label = f"| attribute accuracy, {n}-object scenes: color |"
        row = next(line for line in text.splitlines() if line.startswith(label))
        assert row.split("|")[2].strip() == f"{subset['color']:.3f}"
    # Without Inception weights: no FID, KID, IS or precision/recall, in the file or the table.
    assert metrics["inception"] is None
    assert not {"fid", "kid", "inception_score", "precision"} & set(
        metrics["splits"]["validation"]["generated"]
    )
    assert "FID (lower is better)" not in text and "Inception weights: none" in text


def test_missing_inception_weights_are_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fid, "default_weights_path", lambda: str(tmp_path / "absent.pth"))
    assert load_inception(None) is None
    out = capsys.readouterr().out
    assert out.startswith("note: no FID Inception weights") and fid.WEIGHTS_URL in out


def test_different_seed_different_samples(run, evaluated):
    _, first, _, _ = evaluated
    other = evaluate_run(run, num=NUM, seed=1, batch_size=8, use_inception=False)
    a = first["splits"]["validation"]["generated"]["probe_fd"]
    assert other["splits"]["validation"]["generated"]["probe_fd"] != a
    assert other["seed"] == 1


def test_eval_takes_the_familys_sample_options_and_another_folder(run, evaluated, capsys):
    """`t2i eval --sampler dpmpp_2m --steps 3 --out-dir D`: other samples, the options
    recorded in D/metrics.json, and the run's own evaluation (and report) left alone."""
    from t2i_jax import cli

    _, first, _, _ = evaluated
    report, own = pathlib.Path(run, "report.md"), pathlib.Path(run, "eval", "metrics.json")
    report_before, own_before = report.read_text(), own.read_text()  # (other tests rewrite)
    out = os.path.join(run, "eval_dpm")
    argv = ["eval", "--workdir", run, "--num", str(NUM), "--batch-size", "8", "--no-inception",
            "--sampler", "dpmpp_2m", "--steps", "3", "--out-dir", out]  # fmt: skip
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}/metrics.json"
    with open(os.path.join(out, "metrics.json")) as f:
        other = json.load(f)
    assert other["sample_options"] == {**first["sample_options"], "sampler": "dpmpp_2m", "steps": 3}
    a = first["splits"]["validation"]["generated"]["probe_fd"]
    assert other["splits"]["validation"]["generated"]["probe_fd"] != a
    assert os.path.isfile(os.path.join(out, "samples_validation.png"))
    assert own.read_text() == own_before and report.read_text() == report_before


def test_training_report_keeps_the_evaluation(evaluated):
    run, _, _, _ = evaluated
    config = config_lib.load_config(f"{EXPERIMENT}:test")
    with open(os.path.join(run, "report.md")) as f:
        section = f.read().split("## Evaluation", 1)[1]
    report.write_report(
        run, config, final_step=2, grid_path=os.path.join(run, "samples", "step_2.png"), prompts=[]
    )
    with open(os.path.join(run, "report.md")) as f:
        text = f.read()
    assert text.count("## Evaluation") == 1 and text.endswith(section)
    assert text.index("## Samples at step 2") < text.index("## Evaluation")


def test_write_section_without_a_report(tmp_path):
    path = report.write_section(str(tmp_path), "## Evaluation", ["| a |", "|---|"])
    with open(path) as f:
        assert f.read() == f"# Run report: {tmp_path.name}\n\n## Evaluation\n\n| a |\n|---|\n"


def test_too_few_captions_is_an_error(run):
    with pytest.raises(UserError, match="at least 2"):
        evaluate_run(run, num=1, seed=0)
