"""Evaluating a run with the evaluators of its data set (`eval/evaluators.py`).

`evaluate_run(workdir, num=..., seed=...)` samples one image per caption for the first `num`
examples (at most the split's size) of `validation` and, where the data set has it,
`compositional` (t2i_shapes scenes with held-out shape-colour pairs), from the run's EMA
parameters with the sample options of the run's config, and measures per split:

- R-precision (99 mismatched captions of the split, or fewer when `num` is small; 10 folds;
  mismatched = stating something else, `evaluators.caption_ids`) and the CLIP-style score
  of the data set's contrastive encoder;
- contrastive_fd: Frechet distance in that encoder's image space between the generated
  images and the real images of the same examples (no downloaded weights);
- with pytorch-fid's Inception weights (`inception_weights`, else torch's hub cache; skipped
  with a note when absent): FID and KID against the real images of the same examples,
  Inception Score, and improved precision/recall (k=3);
- t2i_shapes only: attribute accuracy (the probe's reading of each image against the
  attributes its caption names; "caption" = all of them right) and probe_fd, the Frechet
  distance in the probe's feature space.

The same measures on the real images of those captions are the reference a perfect generator
would reach (their Frechet references are real vs real: examples num..2num-1 against
0..num-1, when the split has them). Writes `eval/metrics.json`, `eval/samples_<split>.png`
and the "## Evaluation" section of `report.md`. Same run, num, seed and batch_size -> same
numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from t2i_jax import rng, sharding
from t2i_jax.batching import map_in_batches, padded_batches
from t2i_jax.data import sources
from t2i_jax.data.examples import Examples, load_examples
from t2i_jax.errors import UserError
from t2i_jax.eval.evaluators import Evaluators, caption_ids, load_evaluators
from t2i_jax.grid import save_grid, to_uint8
from t2i_jax.metrics import alignment, fid
from t2i_jax.metrics.fid import FidInception
from t2i_jax.metrics.frechet import frechet_distance, stats_of
from t2i_jax.metrics.inception_score import inception_score
from t2i_jax.metrics.kid import kernel_inception_distance
from t2i_jax.metrics.precision_recall import precision_recall
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
    where = sharding.rows_sharding(mesh, batch_size)
    out = []
    # Rows are encoded one caption at a time, so padding the encoded rows with the last one
    # equals encoding the last caption again.
    batches = padded_batches(tokenizer.encode(captions, max_len), batch_size, fill="edge")
    for b, (_, (tokens, mask), n) in enumerate(batches):
        text = sharding.put_global({"tokens": tokens, "mask": mask}, where)
        images = sampler(params, text, jax.random.fold_in(key, b), frozen)
        out.append(to_uint8(sharding.to_host(images))[:n])
    return np.concatenate(out)


INCEPTION_BATCH = 50  # pytorch-fid's default batch


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """What the evaluators read from one set of images, computed once per set: the real
    images of a split serve both as the generated images' reference and as the real column."""

    probe_preds: dict[str, np.ndarray] | None  # the probe's attribute readings (t2i_shapes)
    probe: np.ndarray | None  # the probe's features
    contrastive: np.ndarray  # the contrastive encoder's image embeddings
    pool: np.ndarray | None  # Inception pool3 features (with Inception weights)
    logits: np.ndarray | None  # Inception logits


def features_of(
    evaluators: Evaluators, images: np.ndarray, inception: FidInception | None
) -> ImageFeatures:
    preds, probe = evaluators.probe_outputs(images) if evaluators.has_probe else (None, None)
    pool, logits = (None, None) if inception is None else inception_outputs(inception, images)
    return ImageFeatures(preds, probe, evaluators.embed_images(images), pool, logits)


def measure(
    features: ImageFeatures,
    examples: Examples,
    *,
    text_emb: np.ndarray,
    text_ids: np.ndarray,
    reference: ImageFeatures | None,
    num_mismatched: int,
    folds: int,
    seed: int,
) -> dict:
    """All measures of images (one per example of `examples`) from their `features`;
    the distances to `reference` (None: those are None or left out)."""
    out: dict = {}
    if features.probe is not None:
        accuracy = _attribute_accuracy(features.probe_preds, examples.attributes)
        accuracy.pop("count")
        out["attribute_accuracy"] = accuracy
        # One- and two-object scenes apart: a model can draw every single object right and
        # still give two objects one colour (attribute binding), which the totals blur.
        objects = np.asarray(examples.attributes["num_objects"]).reshape(-1)
        out["attribute_accuracy_by_objects"] = {
            str(n): _attribute_accuracy(features.probe_preds, examples.attributes, objects == n)
            for n in sorted(set(objects.tolist()))
        }
        out["probe_fd"] = None if reference is None else _frechet(features.probe, reference.probe)
    img_emb = features.contrastive
    rp = alignment.r_precision(
        img_emb,
        text_emb,
        seed=seed,
        text_ids=text_ids,
        num_mismatched=num_mismatched,
        folds=folds,
    )
    out.update(
        {
            "contrastive_fd": None
            if reference is None
            else _frechet(img_emb, reference.contrastive),
            "r_precision": rp["mean"],
            "r_precision_std": rp["std"],
            "clip_score": alignment.clip_score(img_emb, text_emb, clamp="mean"),
            "clip_score_pair_clamp": alignment.clip_score(img_emb, text_emb, clamp="pair"),
        }
    )
    if features.pool is not None:
        n = len(features.pool)
        out["inception_score"], out["inception_score_std"] = inception_score(
            features.logits, seed=seed, splits=min(10, n)
        )
        if reference is not None:
            out["fid"] = _frechet(features.pool, reference.pool)
            out["kid"], out["kid_std"] = kernel_inception_distance(
                reference.pool, features.pool, seed=seed, subset_size=min(1000, n)
            )
            out["precision"], out["recall"] = precision_recall(
                reference.pool, features.pool, k=min(3, n - 1)
            )
    return out


def _attribute_accuracy(preds: dict, attributes: dict, rows: np.ndarray | None = None) -> dict:
    """The probe's attribute accuracies (those some caption names) and the example count,
    over `rows` (bool [N]; default all)."""
    if rows is not None:
        preds = {k: np.asarray(v)[rows] for k, v in preds.items()}
        attributes = {k: np.asarray(v)[rows] for k, v in attributes.items()}
    acc = alignment.attribute_accuracy()
    mask = alignment.named_attributes(attributes)
    accuracy = acc.compute(acc.update(acc.init(), preds, attributes, mask))
    return {k: v for k, v in accuracy.items() if not (isinstance(v, float) and math.isnan(v))}


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(stats_of(a), stats_of(b))


def inception_outputs(inception: FidInception, images: np.ndarray):
    """(pool3 [N, 2048], logits [N, 1008]) in fixed-size batches (the last one padded)."""
    batch = min(INCEPTION_BATCH, len(images))  # a few images are not padded to 50
    return map_in_batches(inception, [np.asarray(images, np.uint8)], batch)


def load_inception(weights: str | None) -> FidInception | None:
    """pytorch-fid's Inception from `weights` (None: torch's hub cache). Absent from the
    cache and not named: None, and one line says where to get it."""
    if weights is None and not os.path.isfile(fid.default_weights_path()):
        print(
            f"note: no FID Inception weights at {fid.default_weights_path()}: FID, KID, IS "
            f"and precision/recall skipped (pass --inception-weights {fid.WEIGHTS_FILE}, "
            f"from {fid.WEIGHTS_URL})"
        )
        return None
    return fid.load_fid_inception(weights)


def evaluate_run(
    workdir: str,
    *,
    num: int,
    seed: int,
    batch_size: int = 64,
    inception_weights: str | None = None,
    use_inception: bool = True,
    sample_options: dict | None = None,
    out_dir: str | None = None,
) -> dict:
    """Evaluates the run's latest checkpoint on `num` captions per split; returns metrics.json.

    `use_inception=False` skips the Inception metrics without looking for the weights.
    `sample_options` override the run's config (e.g. {"sampler": "heun", "steps": 10});
    metrics.json records the ones used. `out_dir` (default WORKDIR/eval) gets metrics.json
    and the grids; only the default one's numbers go into the run's report."""
    if num < 2:
        raise UserError(f"evaluation needs at least 2 captions per split, got num={num}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    run = load_run(workdir)
    config, method, state, tokenizer = run.config, run.method, run.state, run.tokenizer
    step = run.step
    data = config.data
    builder = sources.prepare_for_run(data)
    inception = load_inception(inception_weights) if use_inception else None
    evaluators = load_evaluators(data.name, data.dir, data.variant, train_if_missing=True)
    sample_options = dict(sample_options or {})
    sampler = make_sampler(method, **sample_options)  # the rest from the run's config
    eval_key = rng.stream_key(seed, "eval")
    default_dir = os.path.join(workdir, "eval")
    out_dir = out_dir or default_dir

    results: dict = {}
    for split_index, split in enumerate(SPLITS):
        if split not in builder.info.splits:
            continue
        size = len(builder.as_data_source(split))
        count = min(num, size)
        if count < 2:
            raise UserError(f"{data.name} {split} has {size} examples; evaluation needs 2")
        # The next `count` examples, when the split has them, are the real-vs-real floor of
        # the distances at this sample size; read in the same pass.
        loaded = load_examples(builder, split, 2 * count if size >= 2 * count else count)
        examples = loaded.head(count)
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
        real = features_of(evaluators, examples.images, inception)
        floor = None
        if len(loaded) > count:
            floor = features_of(evaluators, loaded.images[count:], inception)
        text_emb = evaluators.embed_texts(examples.captions)
        ids = caption_ids(data.name, examples)
        common = {
            "text_emb": text_emb,
            "text_ids": ids,
            "num_mismatched": min(99, alignment.max_mismatched(ids)),
            "folds": min(10, count),
            "seed": seed,
        }
        generated = features_of(evaluators, images, inception)
        results[split] = {
            "count": count,
            "num_mismatched": common["num_mismatched"],
            "folds": common["folds"],
            "real_reference": {
                "split": split,
                "count": count,
                "contrastive_stats_digest": stats_of(real.contrastive).digest(),
            },
            "generated": measure(generated, examples, reference=real, **common),
            "real": measure(real, examples, reference=floor, **common),
        }
        columns = min(count, GRID_COLUMNS)
        grid = np.stack([images[:columns], examples.images[:columns]], axis=1)
        os.makedirs(out_dir, exist_ok=True)  # once the first split sampled: options work
        save_grid(os.path.join(out_dir, f"samples_{split}.png"), grid, examples.captions[:columns])

    sample_options = {**method.sample_defaults(config), **sample_options}
    metrics = {
        "step": step,
        "num": num,
        "seed": seed,
        "batch_size": batch_size,
        "data": {"name": data.name, "variant": data.variant},
        "sample_options": sample_options,
        "evaluators": {"seed": evaluators.info["seed"], **evaluators.digests},
        "evaluators_real_test": {
            "probe_accuracy": (evaluators.info["probe"] or {}).get("test_accuracy"),
            "contrastive": evaluators.info["contrastive"]["test"],
        },
        "inception": None if inception is None else inception.weights,
        "protocol": PROTOCOL,
        "splits": results,
    }
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
    if os.path.abspath(out_dir) == os.path.abspath(default_dir):
        report.write_section(workdir, report.EVALUATION_HEADING, _report_lines(metrics))
    return metrics


PROTOCOL = {
    "attribute_accuracy": "probe's attributes vs those the caption names (t2i_shapes)",
    "attribute_accuracy_by_objects": "the same over the one- and the two-object scenes apart, "
    "with their counts",
    "probe_fd": "Frechet distance in the attribute probe's feature space, generated vs real "
    "images of the same examples",
    "contrastive_fd": "Frechet distance in the contrastive encoder's image space, generated "
    "vs real images of the same examples",
    "r_precision": "true caption vs num_mismatched captions of the split that state something "
    "else (other text; for digits another digit), cosine, top-1, mean/std over folds",
    "clip_score": "max(mean(100 * cos), 0) as torchmetrics; clip_score_pair_clamp: "
    "mean(max(100 * cos, 0))",
    "fid": "pytorch-fid's Inception pool3, generated vs real images of the same examples",
    "kid": "polynomial-kernel MMD on the same features, 100 subsets (torchmetrics)",
    "inception_score": "exp(E KL(p(y|x) || p(y))), min(10, N) splits, torchmetrics' convention",
    "precision": "improved precision/recall (Kynkaanniemi et al.), k=3, pool3 features",
}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# The report's rows of the one- and two-object accuracies (metrics.json has them all).
BY_OBJECTS_KEYS = ("color", "shape", "size", "caption")
ROWS = (  # (metrics key, label); a row shows when the first split's generated column has it
    ("probe_fd", "probe_fd (lower is better)"),
    ("contrastive_fd", "contrastive_fd (lower is better)"),
    ("r_precision", "R-precision"),
    ("r_precision_std", "R-precision std over folds"),
    ("clip_score", "CLIP-style score"),
    ("fid", "FID (lower is better)"),
    ("kid", "KID (lower is better)"),
    ("inception_score", "Inception Score"),
    ("precision", "precision"),
    ("recall", "recall"),
)


def _comparison_note(measured: dict) -> str:
    """What the table's distance rows compare, naming only the rows it has."""
    frechet = [k for k in ("probe_fd", "contrastive_fd", "fid") if k in measured]
    others = [k for k in ("kid", "precision", "recall") if k in measured]
    note = (
        f"{', '.join(frechet + others)}: generated against the real images of the same "
        "captions; in the real column, those real images against others of the split ('-' "
        "when the split has too few). "
    )
    if "attribute_accuracy" in measured:
        note += (
            "Attribute accuracy: the probe's reading of each image against the attributes "
            "its caption names. "
        )
    return note + "Real columns: the same measures on the data set's own images of those captions."


def _report_lines(metrics: dict) -> list[str]:
    """The markdown table of the Evaluation section."""
    splits = metrics["splits"]
    header = ["measure"] + [f"{s} {kind}" for s in splits for kind in ("generated", "real")]
    rows = []
    first = next(iter(splits.values()))
    for key in first["real"].get("attribute_accuracy", {}):
        label = "whole caption" if key == "caption" else key
        cells = [
            splits[s][kind]["attribute_accuracy"].get(key)
            for s in splits
            for kind in ("generated", "real")
        ]
        rows.append([f"attribute accuracy: {label}"] + [_fmt(c) for c in cells])
    for n, subset in first["real"].get("attribute_accuracy_by_objects", {}).items():
        for key in (k for k in BY_OBJECTS_KEYS if k in subset):
            label = "whole caption" if key == "caption" else key
            cells = [
                splits[s][kind]["attribute_accuracy_by_objects"].get(n, {}).get(key)
                for s in splits
                for kind in ("generated", "real")
            ]
            rows.append(
                [f"attribute accuracy, {n}-object scenes: {label}"] + [_fmt(c) for c in cells]
            )
    for key, label in ROWS:
        if key in first["generated"]:
            cells = [splits[s][kind].get(key) for s in splits for kind in ("generated", "real")]
            rows.append([label] + [_fmt(c) for c in cells])
    probe = metrics["evaluators"].get("probe")
    evaluators = f"contrastive `{metrics['evaluators']['contrastive']}`" + (
        f", probe `{probe}`" if probe else ""
    )
    inception = metrics["inception"] or "none (FID, KID, IS, precision/recall skipped)"
    lines = [
        f"Step {metrics['step']}, "
        + ", ".join(f"{s}: the first {splits[s]['count']} captions" for s in splits)
        + f", seed {metrics['seed']}, sample options {metrics['sample_options']}. Evaluators "
        f"(seed {metrics['evaluators']['seed']}): {evaluators}. Inception weights: {inception}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "R-precision: "
        + ", ".join(
            f"{s} {splits[s]['num_mismatched']} mismatched captions, {splits[s]['folds']} folds"
            for s in splits
        )
        + ". CLIP-style score: max(mean(100 * cos), 0), as torchmetrics. "
        + _comparison_note(first["generated"]),
        "",
        *(f"![{s}](eval/samples_{s}.png)" for s in splits),
        "",
        "Sample grids: top row generated, bottom row the real image of the caption.",
    ]
    return lines
