"""Ablation sweeps: one base experiment, a few runs that each change some keys, one table.

A sweep file defines `get_sweep(arg) -> {"base": "experiment.py:variant", "runs": {name:
{dotted key: value}}}`. `run_sweep` trains each run in `<workdir>/<name>/` (resuming any
that exist, so a stopped sweep continues where it stopped), optionally evaluates it
(`t2i eval`), and rewrites `<workdir>/results.md` and `results.json` after every run.
Every run's config is built and checked (keys, types, registry names, the method's own
section) before the first one starts, and an existing run directory must hold the same
run (only `train.steps` may grow), so a typo in the last run fails in seconds, not hours.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from t2i_jax import config as config_lib
from t2i_jax.errors import ConfigError
from t2i_jax.methods import registry
from t2i_jax.train.logging import read_metrics

log = logging.getLogger(__name__)

FINAL_LOSS_STEPS = 10  # "final loss": the mean of the last this-many logged losses.


def load_sweep(spec: str) -> dict[str, Any]:
    """Loads `path/to/sweep.py[:arg]` by calling its `get_sweep(arg)`; checks its shape."""
    path = spec.partition(":")[0]
    sweep = config_lib.call_file_function(spec, "get_sweep", "sweep")
    if (
        not isinstance(sweep, dict)
        or not isinstance(sweep.get("base"), str)
        or not isinstance(sweep.get("runs"), dict)
        or not sweep["runs"]
    ):
        raise ConfigError(f"{path}: get_sweep must return {{'base': str, 'runs': {{name: dict}}}}")
    for name, keys in sweep["runs"].items():
        if not isinstance(keys, dict) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{path}: run {name!r} must be a plain name mapping to a dict")
    return sweep


def one_key_sweep(experiment: str, variant: str, key: str, values) -> dict[str, Any]:
    """A sweep of `experiment:variant` with one run per value of `key`, named by the value."""
    return {
        "base": f"{os.path.normpath(experiment)}:{variant}",
        "runs": {str(value): {key: value} for value in values},
    }


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else repr(value)}"


def run_configs(sweep: dict, overrides: list[str]) -> dict[str, ml_collections.ConfigDict]:
    """Each run's config: the base, the run's keys, then the command line's overrides."""
    configs = {}
    for name, keys in sweep["runs"].items():
        config = config_lib.load_config(sweep["base"])
        try:
            config_lib.apply_overrides(config, [_override(k, v) for k, v in keys.items()])
        except ConfigError as e:
            raise ConfigError(f"sweep run '{name}': {e}") from None
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
        registry.check_names(config)
        configs[name] = config
    return configs


def final_losses(workdir: str, curves: tuple[str, ...]) -> dict[str, float]:
    """Each of the family's curves (`Method.curves`), averaged over the last
    FINAL_LOSS_STEPS logged steps."""
    records = read_metrics(workdir)
    out = {}
    for key in curves:
        values = [m[key] for m in records if key in m]
        if values:
            out[key] = float(np.mean(values[-FINAL_LOSS_STEPS:]))
    return out


def check_existing_run(run_dir: str, config: ml_collections.ConfigDict, name: str) -> None:
    """An existing run directory continues only the same run (train.steps may grow)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = config_lib.flatten(config_lib.from_json(f.read()))
    wanted = config_lib.flatten(config)
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    others = [k for k in changed if k != "train.steps"]
    if others:
        raise ConfigError(
            f"sweep run '{name}': {run_dir} holds a run with other settings "
            f"({', '.join(others)}); use a new --workdir"
        )


# (label, split, path into the split's "generated" measures)
EVAL_COLUMNS = (
    ("val caption acc", "validation", ("attribute_accuracy", "caption")),
    ("val colour", "validation", ("attribute_accuracy", "color")),
    ("val shape", "validation", ("attribute_accuracy", "shape")),
    ("val R-precision", "validation", ("r_precision",)),
    ("val CLIP-style", "validation", ("clip_score",)),
    ("val probe_fd", "validation", ("probe_fd",)),
    ("val contrastive_fd", "validation", ("contrastive_fd",)),
    ("comp caption acc", "compositional", ("attribute_accuracy", "caption")),
    ("comp R-precision", "compositional", ("r_precision",)),
)


def _lookup(metrics: dict, split: str, path: tuple[str, ...]) -> float | None:
    node: Any = metrics.get("splits", {}).get(split, {}).get("generated", {})
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def results_table(results: dict[str, dict]) -> list[str]:
    evaluated = any(r.get("eval") for r in results.values())
    curves = list(dict.fromkeys(c for r in results.values() for c in r["final"]))
    header = ["run", "changes", "steps"]
    header += [f"final {c} (mean of last {FINAL_LOSS_STEPS} logged)" for c in curves]
    if evaluated:
        header += [label for label, _, _ in EVAL_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "-"
        cells = [name, changes, str(r["steps"])]
        cells += [f"{r['final'][c]:.4f}" if c in r["final"] else "-" for c in curves]
        if evaluated:
            for _, split, path in EVAL_COLUMNS:
                value = _lookup(r.get("eval") or {}, split, path)
                cells.append("-" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write(workdir: str, spec: str, overrides: list[str], results: dict) -> None:
    text = "\n".join(
        [
            f"# Sweep `{spec}`",
            "",
            f"Overrides for every run: {' '.join(overrides) or 'none'}.",
            "",
            *results_table(results),
            "",
        ]
    )
    for name, content in (
        ("results.md", text),
        (
            "results.json",
            json.dumps({"sweep": spec, "overrides": overrides, "runs": results}, indent=2),
        ),
    ):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)


def run_sweep(
    spec: str,
    workdir: str,
    overrides: list[str],
    *,
    evaluate: bool = False,
    num: int = 256,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, dict]:
    """Trains (and evaluates) every run of the sweep; returns the results by run name."""
    from t2i_jax.eval.evaluate import evaluate_run
    from t2i_jax.train.loop import train_and_evaluate

    sweep = load_sweep(spec)
    configs = run_configs(sweep, overrides)
    for name, config in configs.items():
        check_existing_run(os.path.join(workdir, name), config, name)
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, dict] = {}
    for name, config in configs.items():
        run_dir = os.path.join(workdir, name)
        log.info("sweep run %s -> %s", name, run_dir)
        train_and_evaluate(config, run_dir, show_progress=show_progress)
        results[name] = {
            "workdir": run_dir,
            "changes": sweep["runs"][name],
            "steps": max((m["step"] for m in read_metrics(run_dir)), default=0),
            "final": final_losses(run_dir, registry.method_class(config.method).curves),
            "eval": evaluate_run(run_dir, num=num, seed=seed) if evaluate else None,
        }
        _write(workdir, spec, overrides, results)
    return results
