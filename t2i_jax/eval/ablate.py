"""Ablation sweeps: one base experiment, a few runs that each change some keys, one table.

A sweep file defines `get_sweep(arg) -> {"base": "experiment.py:variant", "runs": {name:
{dotted key: value}}}`. `run_sweep` trains each run in `<workdir>/<name>/` (resuming any
that exist, so a stopped sweep continues where it stopped), optionally evaluates it
(`t2i eval`), and rewrites `<workdir>/results.md`, `results.json` and the bar chart
`results.png` after every run; runs finished (and evaluated) by an earlier call are
tabled first and not revisited. With seeds, each entry runs once per seed in
`<workdir>/<name>/seed_<k>/` and every metric is reported as mean ± std with n.
Every run's config is built and checked (keys, types, registry names, the method's own
section) before the first one starts, and an existing run directory must hold the same
run (only `train.steps` may grow), so a typo in the last run fails in seconds, not hours.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np

from t2i_jax import config as config_lib
from t2i_jax import sharding
from t2i_jax.errors import ConfigError
from t2i_jax.methods import registry
from t2i_jax.train import multihost
from t2i_jax.train.logging import last_perf, read_metrics

log = logging.getLogger(__name__)

FINAL_LOSS_STEPS = 10  # "final loss": the mean of the last this-many logged losses.


RUN_REF = re.compile(r"\{run:([^{}]+)\}")  # "{run:NAME}": the run dir of entry NAME


def _refs(keys: dict) -> list[str]:
    return [m for v in keys.values() if isinstance(v, str) for m in RUN_REF.findall(v)]


def load_sweep(spec: str) -> dict[str, Any]:
    """Loads `path/to/sweep.py[:arg]` by calling its `get_sweep(arg)`; checks its shape.

    `{"base": "exp.py:variant", "runs": {name: {dotted key: value}}}`; a run may name its
    own `"base"` (a sweep across families), and a string value may contain `{run:NAME}`,
    the directory of the earlier entry NAME's run of the same seed (latent diffusion's
    VAE run)."""
    path = spec.partition(":")[0]
    sweep = config_lib.call_file_function(spec, "get_sweep", "sweep")
    shape = f"{path}: get_sweep must return {{'base': str, 'runs': {{name: dict}}}}"
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), dict) or not sweep["runs"]:
        raise ConfigError(shape)
    earlier: list[str] = []
    for name, keys in sweep["runs"].items():
        if not isinstance(keys, dict) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{path}: run {name!r} must be a plain name mapping to a dict")
        if not isinstance(keys.get("base", sweep.get("base")), str):
            raise ConfigError(shape + f" (run {name!r} has no base)")
        for ref in _refs(keys):
            if ref not in earlier:
                raise ConfigError(
                    f"{path}: run {name!r} uses {{run:{ref}}}, which is not an earlier run"
                )
        earlier.append(name)
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
    """Each run's config: its base, its keys, then the command line's overrides; checked.

    A run that uses another's directory (`{run:NAME}`) is checked for its keys and values
    here, and by its family (`registry.check_names`, which may read that run) when it
    starts, after NAME has trained."""
    configs = {}
    for name, keys in sweep["runs"].items():
        keys = dict(keys)
        config = config_lib.load_config(keys.pop("base", sweep.get("base")))
        try:
            config_lib.apply_overrides(config, [_override(k, v) for k, v in keys.items()])
        except ConfigError as e:
            raise ConfigError(f"sweep run '{name}': {e}") from None
        config_lib.apply_overrides(config, overrides)
        # The runs share this process, hence its CPU devices: set before JAX starts (the
        # checks below may run JAX).
        cpu_devices = sharding.mesh_config(config).cpu_devices
        if not configs:
            multihost.split_cpu(cpu_devices)
        elif cpu_devices != sharding.mesh_config(next(iter(configs.values()))).cpu_devices:
            raise ConfigError(f"sweep run '{name}': its mesh.cpu_devices differs from the others'")
        config_lib.validate(config)
        if not _refs(keys):
            registry.check_names(config)
        configs[name] = config
    return configs


def resolve_runs(
    config: ml_collections.ConfigDict, workdir: str, seed: int | None
) -> ml_collections.ConfigDict:
    """`config` with every `{run:NAME}` replaced by NAME's run directory for `seed`."""
    flat = config_lib.flatten(config)
    refs = {k: v for k, v in flat.items() if isinstance(v, str) and RUN_REF.search(v)}
    if not refs:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in refs.items():
        resolved = RUN_REF.sub(lambda m: run_dir(workdir, m.group(1), seed), value)
        config_lib.apply_overrides(config, [_override(key, resolved)])
    return config


def final_losses(records: list[dict], curves: tuple[str, ...]) -> dict[str, float]:
    """Each of the family's curves (`Method.curves`) in a run's log rows, averaged over the
    last FINAL_LOSS_STEPS logged steps."""
    out = {}
    for key in curves:
        values = [m[key] for m in records if key in m]
        if values:
            out[key] = float(np.mean(values[-FINAL_LOSS_STEPS:]))
    return out


def check_existing_run(
    run_dir: str, config: ml_collections.ConfigDict, name: str, chosen: set[str] = frozenset()
) -> None:
    """An existing run directory continues only the same run (train.steps may grow).

    A key the run's saved config lacks was added to the experiment since the run started.
    New options default to what runs did before them (runs are loaded with `.get(key,
    old behaviour)`), so such a key counts as a change only where `chosen` (the keys the
    sweep entry and the command line set) names it."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = config_lib.flatten(config_lib.from_json(f.read()))
    wanted = config_lib.flatten(config)
    added = {k for k in wanted.keys() - saved.keys() if k not in chosen}
    changed = sorted(
        k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k) and k not in added
    )
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
    ("val position", "validation", ("attribute_accuracy", "position")),
    ("val 2-object colour", "validation", ("attribute_accuracy_by_objects", "2", "color")),
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


SUMMARY_NOTE = "mean ± std over n seeds (std: sample standard deviation, ddof 1)"


def run_metrics(entry: dict) -> dict[str, float]:
    """One trained run's scalars by label: its final losses and its eval columns."""
    out = {f"final {c}": v for c, v in entry["final"].items()}
    if entry.get("minutes") is not None:
        out["minutes"] = entry["minutes"]
    for label, split, path in EVAL_COLUMNS:
        value = _lookup(entry.get("eval") or {}, split, path)
        if value is not None:
            out[label] = float(value)
    return out


def summarise(entries: list[dict]) -> dict[str, dict]:
    """Each metric over the runs of one sweep entry (one per seed): mean, std, n, values.
    One run has no sample std: None, not 0, so a partial sweep's table does not show a
    spread that was never measured."""
    per_run = [run_metrics(e) for e in entries]
    labels = list(dict.fromkeys(k for m in per_run for k in m))
    summary = {}
    for label in labels:
        values = [m[label] for m in per_run if label in m]
        summary[label] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values),
            "values": values,
        }
    return summary


def _cell(stats: dict | None, seeded: bool) -> str:
    if stats is None:
        return "-"
    if not seeded or stats["std"] is None:  # one run: its value (n says so)
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def results_table(results: dict[str, dict], *, seeded: bool = False) -> list[str]:
    """The sweep's markdown table: a row per entry, its metrics' values (with seeds: mean ±
    std and the number of seeds done, n)."""
    labels = list(dict.fromkeys(k for r in results.values() for k in r["summary"]))
    finals = [k for k in labels if k.startswith("final ")]
    evals = [label for label, _, _ in EVAL_COLUMNS if label in labels]
    timed = "minutes" in labels
    header = (
        ["run", "changes", "steps"] + (["n"] if seeded else []) + (["minutes"] if timed else [])
    )
    header += [f"{k} (mean of last {FINAL_LOSS_STEPS} logged)" for k in finals] + evals
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        changes = ", ".join(
            f"{k}={os.path.basename(v) if k == 'base' else v}" for k, v in r["changes"].items()
        )
        changes = changes or "-"
        cells = [name, changes, str(r["steps"])]
        if seeded:
            cells.append(str(max((v["n"] for v in r["summary"].values()), default=0)))
        if timed:
            stats = r["summary"].get("minutes")
            cells.append(f"{stats['mean']:.1f}" if stats else "-")  # the mean over seeds
        for k in finals:  # one run's loss keeps its 4 decimals
            stats = r["summary"].get(k)
            one_run = stats and not seeded
            cells.append(f"{stats['mean']:.4f}" if one_run else _cell(stats, seeded))
        cells += [_cell(r["summary"].get(k), seeded) for k in evals]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_results(results: dict[str, dict], path: str, title: str) -> None:
    """One bar chart per metric, a bar per entry, error bars of one std (with seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(k for r in results.values() for k in r["summary"]))
    names = list(results)
    columns = min(4, len(labels))
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, layout="constrained"
    )
    for ax, label in zip(axes.flat, labels, strict=False):
        stats = [results[n]["summary"].get(label) for n in names]
        means = [s["mean"] if s else np.nan for s in stats]
        stds = [s["std"] if s and s["std"] is not None else 0.0 for s in stats]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _write(workdir: str, spec: str, overrides: list[str], results: dict, seeds) -> None:
    seeded = seeds is not None
    note = f"Seeds {', '.join(map(str, seeds))}; {SUMMARY_NOTE}." if seeded else "One run each."
    text = "\n".join(
        [
            f"# Sweep `{spec}`",
            "",
            f"Overrides for every run: {' '.join(overrides) or 'none'}. {note}",
            "",
            *results_table(results, seeded=seeded),
            "",
            "![results](results.png)",
            "",
        ]
    )
    record = {"sweep": spec, "overrides": overrides, "seeds": seeds, "runs": results}
    for name, content in (("results.md", text), ("results.json", json.dumps(record, indent=2))):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    plot_results(results, os.path.join(workdir, "results.png"), f"{spec} ({note})")


def current_eval(
    path: str, config: ml_collections.ConfigDict, step: int, *, num: int, seed: int
) -> dict | None:
    """The run's own `t2i eval` result when it is of this step, count and seed with the
    config's sample options (a resumed sweep does not evaluate a finished run again)."""
    where = os.path.join(path, "eval", "metrics.json")
    if not os.path.isfile(where):
        return None
    with open(where) as f:
        metrics = json.load(f)
    method = registry.method_class(config.method)
    recorded = method.recorded_options(metrics.get("sample_options") or {})
    same = (metrics.get("step"), metrics.get("num"), metrics.get("seed"))
    alike = method.options_in_effect(recorded) == method.options_in_effect(
        method.sample_defaults(config)
    )
    return metrics if same == (step, num, seed) and alike else None


def run_dir(workdir: str, name: str, seed: int | None) -> str:
    """`<workdir>/<name>/`, or with seeds `<workdir>/<name>/seed_<seed>/`."""
    path = os.path.join(workdir, name)
    return path if seed is None else os.path.join(path, f"seed_{seed}")


def job_config(
    config: ml_collections.ConfigDict, workdir: str, seed: int | None
) -> ml_collections.ConfigDict:
    """An entry's config for one seed (None: its own), its `{run:NAME}` resolved."""
    if seed is not None:
        config = ml_collections.ConfigDict(config.to_dict())
        config.seed = seed
    return resolve_runs(config, workdir, seed)


def run_entry(path: str, config: ml_collections.ConfigDict) -> dict:
    """One run's record in results.json, from its log (its evaluation: None, filled in by
    the caller)."""
    records = read_metrics(path, perf=True)  # [] before the run's first log
    return {
        "workdir": path,
        "seed": config.seed,
        "config_sha256": config_lib.digest(config),
        # Training's wall-clock minutes (eval/training_probe.py's time left out), as
        # logged; None for a run from before the log had them.
        "minutes": last_perf(records, "elapsed_min"),
        "steps": max((m["step"] for m in records), default=0),
        "final": final_losses(records, registry.method_class(config.method).curves),
        "eval": None,
    }


def finished_entry(
    path: str, config: ml_collections.ConfigDict, *, evaluate: bool, num: int, seed: int
) -> dict | None:
    """The record of a run that needs nothing more (its last step logged and checkpointed
    and, with `evaluate`, its evaluation there current), else None."""
    entry, total = run_entry(path, config), config.train.steps
    if entry["steps"] != total or not os.path.isdir(os.path.join(path, "checkpoints", str(total))):
        return None
    if evaluate:
        entry["eval"] = current_eval(path, config, total, num=num, seed=seed)
        if entry["eval"] is None:
            return None
    return entry


def recorded_changes(keys: dict) -> dict:
    """An entry's keys as results.json records them: a base experiment under the working
    directory by its relative path (sweep files name theirs absolutely, to run from any
    directory), so the record names no machine's folders."""
    base = keys.get("base")
    if not isinstance(base, str) or not os.path.isabs(base):
        return keys
    relative = os.path.relpath(base)
    return {**keys, "base": base if relative.startswith("..") else relative}


def tabulate(sweep: dict, done: dict[str, dict], seeds: tuple[int, ...] | None) -> dict:
    """results.json's "runs": each entry with a finished run, in the sweep's order, its
    seeds in `seeds`' order."""
    results = {}
    for name, by_seed in done.items():
        entries = [by_seed[s] for s in (seeds or (None,)) if s in by_seed]
        if not entries:
            continue
        results[name] = {
            "changes": recorded_changes(sweep["runs"][name]),
            "steps": entries[-1]["steps"],
            "summary": summarise(entries),
        }
        if seeds is None:
            results[name].update(entries[-1])
        else:
            results[name]["seeds"] = {str(e["seed"]): e for e in entries}
    return results


def run_sweep(
    spec: str,
    workdir: str,
    overrides: list[str],
    *,
    evaluate: bool = False,
    num: int = 256,
    seed: int = 0,
    seeds: tuple[int, ...] | None = None,
    only: tuple[str, ...] | None = None,
    show_progress: bool = True,
) -> dict[str, dict]:
    """Trains (and evaluates) every run of the sweep; returns the results by run name.

    With `seeds`, every entry is trained once per seed (`config.seed`), seed by seed (all
    entries of the first seed, then the next), so a sweep stopped part-way already compares
    every entry; each metric is reported as mean ± std over the seeds done. `seed` is the
    evaluation's own seed, the same for every run: the spread is that of training. `only`
    names the entries to run (in the sweep's order); the results then cover those."""
    from t2i_jax.eval.evaluate import evaluate_run
    from t2i_jax.eval.training_probe import make_training_probe
    from t2i_jax.train.loop import train_and_evaluate

    sweep = load_sweep(spec)
    if seeds is not None and any(o.partition("=")[0] == "seed" for o in overrides):
        raise ConfigError("--seeds sets each run's seed: drop --config.seed")
    configs = run_configs(sweep, overrides)
    if only is not None:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ConfigError(f"--runs: no entry {unknown} in {spec}; its entries: {list(configs)}")
        configs = {name: c for name, c in configs.items() if name in only}
    jobs = [
        (name, s, job_config(configs[name], workdir, s), run_dir(workdir, name, s))
        for s in (seeds or (None,))
        for name in configs
    ]
    overridden = {o.partition("=")[0] for o in overrides}
    for name, _, config, path in jobs:
        check_existing_run(path, config, name, set(sweep["runs"][name]) | overridden)
    os.makedirs(workdir, exist_ok=True)
    # Runs already trained (and evaluated) by an earlier call count from the start: the
    # table covers every finished run, also while the first new one trains.
    done: dict[str, dict] = {name: {} for name in configs}  # name -> {seed: entry}
    for name, s, config, path in jobs:
        entry = finished_entry(path, config, evaluate=evaluate, num=num, seed=seed)
        if entry is not None:
            done[name][s] = entry
    if any(done.values()):
        log.info("sweep: %d of %d runs done already", sum(map(len, done.values())), len(jobs))
        _write(workdir, spec, overrides, tabulate(sweep, done, seeds), seeds)
    for name, s, config, path in jobs:
        if s in done[name]:
            continue
        log.info("sweep run %s%s -> %s", name, "" if s is None else f" seed {s}", path)
        train_and_evaluate(config, path, show_progress=show_progress, probe=make_training_probe)
        entry = run_entry(path, config)
        if evaluate:
            done_eval = current_eval(path, config, entry["steps"], num=num, seed=seed)
            entry["eval"] = done_eval or evaluate_run(path, num=num, seed=seed)
        done[name][s] = entry
        _write(workdir, spec, overrides, tabulate(sweep, done, seeds), seeds)
    return tabulate(sweep, done, seeds)
