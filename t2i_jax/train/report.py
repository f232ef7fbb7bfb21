"""`report.md` of a run: the latest sample grid, the loss curve and the run's facts.

`eval.evaluate.evaluate_run` adds an "## Evaluation" section (`write_section`); rewriting the
training part of the report (a resumed or extended run) keeps that section at the end.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # Headless: reports are written on clusters without a display.
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from t2i_jax.errors import writing  # noqa: E402
from t2i_jax.train.logging import read_metrics  # noqa: E402

EVALUATION_HEADING = "## Evaluation"


def _cut_section(text: str, heading: str) -> tuple[str, str]:
    """(text without the section, the section) for the `heading` line up to the next "## "."""
    lines = text.splitlines()
    if heading not in lines:
        return text, ""
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = lines[:start] + lines[end:]
    return "\n".join(rest).rstrip("\n") + "\n", "\n".join(lines[start:end]).rstrip("\n") + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with writing(path):
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def write_section(workdir: str, heading: str, body: list[str]) -> str:
    """Adds (or replaces) the section `heading` at the end of `workdir/report.md`."""
    path = os.path.join(workdir, "report.md")
    if os.path.isfile(path):
        with open(path) as f:
            text, _ = _cut_section(f.read(), heading)
    else:
        text = f"# Run report: {os.path.basename(os.path.abspath(workdir))}\n"
    _write_atomic(path, text + "\n" + "\n".join([heading, "", *body]).rstrip("\n") + "\n")
    return path


def plot_metric(records: list[dict], name: str, path: str) -> bool:
    points = [(r["step"], r[name]) for r in records if name in r]
    if not points:
        return False
    steps, values = zip(*points, strict=True)
    # Logged values are single batches; a centred moving mean shows the trend without lag.
    half = max(1, len(values) // 40)
    padded = np.pad(np.asarray(values, float), half, mode="edge")
    smoothed = np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, lw=0.8, alpha=0.35, label="logged batch")
    ax.plot(steps, smoothed, lw=1.6, label=f"moving mean of {2 * half + 1} points")
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.legend()
    ax.set_title(f"training {name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path)
    finally:
        plt.close(fig)
    return True


def write_report(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    final_step: int,
    grid_path: str,
    prompts: list[str],
    curves: tuple[str, ...] = ("loss",),
) -> str:
    """Writes `workdir/report.md` (with a plot `<curve>.png` per curve); returns its path."""
    records = read_metrics(workdir)
    plotted = [c for c in curves if plot_metric(records, c, os.path.join(workdir, f"{c}.png"))]
    last = records[-1] if records else {}
    lines = [
        f"# Run report: {os.path.basename(os.path.abspath(workdir))}",
        "",
        f"- method: `{config.method}`, data: `{config.data.name}` ({config.data.variant}), "
        f"text encoder: `{config.text.encoder}`",
        f"- seed: {config.seed}, steps: {final_step}, global batch: {config.train.batch_size}",
        "- final logged metrics: "
        + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"),
        "",
        f"## Samples at step {final_step}",
        "",
        "One column per prompt, its caption under the column; sampled from the EMA "
        "parameters with the run's fixed sample seed.",
        "",
        f"![samples]({os.path.relpath(grid_path, workdir)})",
        "",
        "Prompts: " + "; ".join(f"`{p}`" for p in prompts),
        "",
    ]
    if plotted:
        lines += ["## Training curves", "", *(f"![{c}]({c}.png)" for c in plotted), ""]
    path = os.path.join(workdir, "report.md")
    evaluation = ""
    if os.path.isfile(path):  # Keep the section evaluate_run wrote.
        with open(path) as f:
            _, evaluation = _cut_section(f.read(), EVALUATION_HEADING)
    text = "\n".join(lines)
    if evaluation:
        text = text.rstrip("\n") + "\n\n" + evaluation
    with open(path, "w") as f:
        f.write(text)
    return path
