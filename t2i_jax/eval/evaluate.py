"""Evaluating a run's text-image alignment with the built-in evaluators of its data set.

`evaluate_run(workdir, num=..., seed=...)` samples one image per caption for the first `num`
examples of `validation` and of `compositional` (scenes with held-out shape-colour pairs) from
the run's EMA parameters, with the sample options of the run's config, and measures per split:

- attribute accuracy: the probe's reading of each image against the attributes its caption
  names (per attribute; "caption" = all of them right);
- probe_fd: Frechet distance in the attribute probe's feature space (not FID: no Inception)
  between the generated images and the real images of the same examples;
- R-precision (99 mismatched captions of the split, or fewer when `num` is small; 10 folds)
  and the CLIP-style score of the contrastive encoder.

The same measures on the real images of those captions are the reference a perfect generator
would reach (its probe_fd reference is real vs real: examples num..2num-1 against 0..num-1,
when the split has them). Writes `eval/metrics.json`, `eval/samples_<split>.png` and the
"## Evaluation" section of `report.md`. Same run, num, seed and batch_size -> same numbers.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from t2i_jax import rng, sharding
from t2i_jax.batching import padded_batches
from t2i_jax.data import sources
from t2i_jax.data.examples import Examples, load_examples
from t2i_jax.errors import UserError
from t2i_jax.eval.evaluators import Evaluators, load_evaluators
from t2i_jax.grid import save_grid, to_uint8
from t2i_jax.metrics import alignment
from t2i_jax.metrics.frechet import frechet_distance, stats_of
from t2i_jax.runs.loading import load_run
from t2i_jax.runs.sampling import make_sampler
from t2i_jax.train import report

SPLITS: tuple[str, ...] = ("validation", "compositional")
GRID_COLUMNS = 8


def generate(
    sampler,
    params,
    frozen,
    tokenizer,
    captions: list[str],
    *,
    max_len: int,
    key,
    batch_size: int,
) -> np.ndarray:
    """uint8 [N, H, W, 3], one image per caption, in batches of `batch_size`.

    Batch b uses fold_in(key, b); the last batch is padded with its last caption (outputs
    dropped), so every call has one shape and the sampler compiles once. With a batch size
    divisible by the mesh's batch shards, the batch is split over the devices.
    """
    mesh = sharding.mesh_of(params) or sharding.make_mesh()  # the run's (maybe FSDP) mesh
    split = batch_size % sharding.batch_shards(mesh) == 0
    where = sharding.batch_sharding(mesh) if split else sharding.replicated(mesh)
    out = []
    # Rows are encoded one caption at a time, so padding the encoded rows with the last one
    # equals encoding the last caption again.
    batches = padded_batches(tokenizer.encode(captions, max_len), batch_size, fill="edge")
    for b, (_, (tokens, mask), n) in enumerate(batches):
        text = jax.device_put({"tokens": tokens, "mask": mask}, where)
        images = sampler(params, text, jax.random.fold_in(key, b), frozen)
        out.append(to_uint8(sharding.to_host(images))[:n])
    return np.concatenate(out)


def measure(
    evaluators: Evaluators,
    images: np.ndarray,
    examples: Examples,
    *,
    text_emb: np.ndarray,
    reference_features: np.ndarray | None,
    num_mismatched: int,
    folds: int,
    seed: int,
) -> dict:
    """All alignment measures of `images` (one per example of `examples`)."""
    preds, features = evaluators.probe_outputs(images)
    acc = alignment.attribute_accuracy()
    mask = alignment.named_attributes(examples.attributes)
    accuracy = acc.compute(acc.update(acc.init(), preds, examples.attributes, mask))
    accuracy.pop("count")
    img_emb = evaluators.embed_images(images)
    rp = alignment.r_precision(
        img_emb,
        text_emb,
        seed=seed,
        text_ids=alignment.text_ids_of(examples.captions),
        num_mismatched=num_mismatched,
        folds=folds,
    )
    fd = None
    if reference_features is not None:
        fd = frechet_distance(stats_of(features), stats_of(reference_features))
    return {
        "attribute_accuracy": {k: v for k, v in accuracy.items() if not math.isnan(v)},
        "probe_fd": fd,
        "r_precision": rp["mean"],
        "r_precision_std": rp["std"],
        "clip_score": alignment.clip_score(img_emb, text_emb, clamp="mean"),
        "clip_score_pair_clamp": alignment.clip_score(img_emb, text_emb, clamp="pair"),
    }


def evaluate_run(workdir: str, *, num: int, seed: int, batch_size: int = 64) -> dict:
    """Evaluates the run's latest checkpoint on `num` captions per split; returns metrics.json."""
    if num < 2:
        raise UserError(f"evaluation needs at least 2 captions per split, got num={num}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    run = load_run(workdir)
    config, method, state, tokenizer = run.config, run.method, run.state, run.tokenizer
    step = run.step
    data = config.data
    evaluators = load_evaluators(data.name, data.dir, data.variant, train_if_missing=True)
    builder = sources.prepare_for_run(data)
    sampler = make_sampler(method)  # The run's config gives the sample options.
    eval_key = rng.stream_key(seed, "eval")
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)

    results: dict = {}
    for split_index, split in enumerate(SPLITS):
        size = len(builder.as_data_source(split))
        examples = load_examples(builder, split, num)
        images = generate(
            sampler,
            state.ema_params,
            run.frozen,
            tokenizer,
            examples.captions,
            max_len=config.text.max_len,
            key=jax.random.fold_in(eval_key, split_index),
            batch_size=batch_size,
        )
        _, real_features = evaluators.probe_outputs(examples.images)
        # Real vs real on other examples of the split: probe_fd's floor at this sample size.
        floor_features = None
        if size >= 2 * num:
            floor = load_examples(builder, split, 2 * num)
            floor_features = evaluators.probe_outputs(floor.images[num:])[1]
        text_emb = evaluators.embed_texts(examples.captions)
        ids = alignment.text_ids_of(examples.captions)
        common = {
            "text_emb": text_emb,
            "num_mismatched": min(99, alignment.max_mismatched(ids)),
            "folds": min(10, num),
            "seed": seed,
        }
        results[split] = {
            "num_mismatched": common["num_mismatched"],
            "folds": common["folds"],
            "probe_fd_reference": {
                "split": split,
                "count": num,
                "stats_digest": stats_of(real_features).digest(),
            },
            "generated": measure(
                evaluators, images, examples, reference_features=real_features, **common
            ),
            "real": measure(
                evaluators,
                examples.images,
                examples,
                reference_features=None,
                **common,
            ),
        }
        if floor_features is not None:
            results[split]["real"]["probe_fd"] = frechet_distance(
                stats_of(floor_features), stats_of(real_features)
            )
        columns = min(num, GRID_COLUMNS)
        grid = np.stack([images[:columns], examples.images[:columns]], axis=1)
        save_grid(os.path.join(out_dir, f"samples_{split}.png"), grid, examples.captions[:columns])

    sample_options = method.sample_defaults(config)
    metrics = {
        "step": step,
        "num": num,
        "seed": seed,
        "batch_size": batch_size,
        "data": {"name": data.name, "variant": data.variant},
        "sample_options": sample_options,
        "evaluators": {"seed": evaluators.info["seed"], **evaluators.digests},
        "evaluators_real_test": {
            "probe_accuracy": evaluators.info["probe"]["test_accuracy"],
            "contrastive": evaluators.info["contrastive"]["test"],
        },
        "protocol": {
            "attribute_accuracy": "probe's attributes vs those the caption names",
            "probe_fd": "Frechet distance in the attribute probe's feature space, "
            "generated vs real images of the same examples",
            "r_precision": "true caption vs num_mismatched captions of other text from the "
            "split, cosine, top-1, mean/std over folds",
            "clip_score": "max(mean(100 * cos), 0) as torchmetrics; clip_score_pair_clamp: "
            "mean(max(100 * cos, 0))",
        },
        "splits": results,
    }
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
    report.write_section(workdir, report.EVALUATION_HEADING, _report_lines(metrics))
    return metrics


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _report_lines(metrics: dict) -> list[str]:
    """The markdown table of the Evaluation section."""
    splits = metrics["splits"]
    header = ["measure"] + [f"{s} {kind}" for s in splits for kind in ("generated", "real")]
    rows = []
    first = next(iter(splits.values()))
    for key in first["real"]["attribute_accuracy"]:
        label = "whole caption" if key == "caption" else key
        cells = [
            splits[s][kind]["attribute_accuracy"].get(key)
            for s in splits
            for kind in ("generated", "real")
        ]
        rows.append([f"attribute accuracy: {label}"] + [_fmt(c) for c in cells])
    for key, label in (
        ("probe_fd", "probe_fd (lower is better)"),
        ("r_precision", "R-precision"),
        ("r_precision_std", "R-precision std over folds"),
        ("clip_score", "CLIP-style score"),
    ):
        rows.append(
            [label] + [_fmt(splits[s][kind][key]) for s in splits for kind in ("generated", "real")]
        )
    lines = [
        f"Step {metrics['step']}, {metrics['num']} captions per split (the first of each), "
        f"seed {metrics['seed']}, sample options {metrics['sample_options']}. Evaluators "
        f"(seed {metrics['evaluators']['seed']}): probe `{metrics['evaluators']['probe']}`, "
        f"contrastive `{metrics['evaluators']['contrastive']}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Attribute accuracy: the attribute probe's reading of each image against the "
        "attributes its caption names. probe_fd: Frechet distance in the attribute probe's "
        "feature space to the real images of the same captions (real column: real images of "
        "other examples of the split; '-' when the split has too few). R-precision: "
        + ", ".join(
            f"{s} {splits[s]['num_mismatched']} mismatched captions, {splits[s]['folds']} folds"
            for s in splits
        )
        + ". CLIP-style score: max(mean(100 * cos), 0), as torchmetrics. Real columns: the "
        "same measures on the data set's own images of those captions.",
        "",
        *(f"![{s}](eval/samples_{s}.png)" for s in splits),
        "",
        "Sample grids: top row generated, bottom row the real image of the caption.",
    ]
    return lines
