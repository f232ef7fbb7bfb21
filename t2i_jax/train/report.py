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
from t2i_jax.train.logging import PERF, read_metrics  # noqa: E402

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


def _save(fig, ax, path: str) -> None:
    """Grid, tight layout, written to `path` (a failed write names it); the figure closed."""
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path)
    finally:
        plt.close(fig)


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
    _save(fig, ax, path)
    return True


PROBE_PREFIX = "probe_"  # the training probe's measures (eval/training_probe.py)
# Plotted (the table has every measure): the whole caption and its main parts.
PROBE_PLOTTED = ("color", "shape", "size", "position", "caption", "r_precision")


def probe_rows(records: list[dict]) -> list[dict]:
    """The rows with probe measures: their step, minutes so far and measures."""
    out = []
    for r in records:
        probes = {k[len(PROBE_PREFIX) :]: v for k, v in r.items() if k.startswith(PROBE_PREFIX)}
        if probes:
            out.append(
                {"step": r["step"], "minutes": r.get("perf", {}).get("elapsed_min"), **probes}
            )
    return out


def plot_probe(rows: list[dict], path: str) -> None:
    """The probe's measures against the run's wall-clock minutes (steps on the top axis)."""
    names = [k for k in PROBE_PLOTTED if k in rows[0]]
    minutes = [r["minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name in names:
        ax.plot(minutes, [r.get(name, np.nan) for r in rows], marker="o", ms=3, label=name)
    ax.set_xlabel("wall-clock minutes of the run (probing excluded)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(minutes, [str(r["step"]) for r in rows], fontsize=7)
    top.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, ax, path)


def _probe_section(workdir: str, records: list[dict]) -> list[str]:
    """The report's probe plot and table, from log rows read with their timings."""
    rows = [r for r in probe_rows(records) if r["minutes"] is not None]
    if not rows:
        return []
    plot_probe(rows, os.path.join(workdir, "probe.png"))
    names = [k for k in rows[0] if k not in ("step", "minutes")]
    table = ["| step | minutes | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [str(r["step"]), f"{r['minutes']:.1f}"] + [
            f"{r.get(n, float('nan')):.3f}" for n in names
        ]
        table.append("| " + " | ".join(cells) + " |")
    return [
        "## Alignment during training",
        "",
        "The evaluators' reading of samples of the EMA parameters (`train.probe_num` "
        "validation captions, `train.probe_sample_steps` sampler steps: cheaper, and lower, "
        "than `t2i eval`) against the run's minutes:",
        "",
        "![alignment during training](probe.png)",
        "",
        *table,
        "",
    ]


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
    timed = read_metrics(workdir, perf=True)  # one read: the probe section needs timings
    records = [{k: v for k, v in r.items() if k != PERF} for r in timed]
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
    lines += _probe_section(workdir, timed)
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
