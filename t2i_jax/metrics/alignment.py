"""Text-image alignment: attribute accuracy, R-precision and a CLIP-style score.

- Attribute accuracy: a probe's predicted attributes of an image against the attributes its
  caption names; per attribute and for the whole caption (every named attribute right). States
  are integer (correct, count) sums, so shards merge exactly.
- R-precision, as the AttnGAN / DM-GAN evaluation: each image ranks its own caption and 99
  mismatched captions of the evaluation set (different caption text, drawn without replacement
  from a seeded generator) by cosine similarity; a hit is the true caption strictly above every
  mismatched one (a tie is a miss). The images are cut into `folds` consecutive groups; the
  result is the mean and the (population, ddof=0) standard deviation of the groups' hit rates.
- CLIP-style score: 100 * cos(image, caption), averaged over pairs. Where it is clamped at 0
  matters and the conventions differ: torchmetrics' CLIPScore (1.x) averages the unclamped
  100 * cos and clamps the mean, `max(mean(100 * cos), 0)` (its `compute`, and `clip_score`
  after `score.mean(0)`), although its docstring writes the clamp per pair; Hessel et al.'s
  CLIP-S clamps each pair, `mean(max(100 * cos, 0))` (with w = 2.5 instead of 100).
  `clamp="mean"` (the default) follows torchmetrics, `clamp="pair"` Hessel et al.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from t2i_jax.data import shapes
from t2i_jax.errors import MetricError
from t2i_jax.metrics.base import Metric, State

# The attributes a probe predicts (every `t2i_shapes` attribute but the caption template).
PROBE_ATTRIBUTES: tuple[str, ...] = tuple(k for k in shapes.ATTRIBUTE_KEYS if k != "template")


def _as_int(values) -> np.ndarray:
    return np.asarray(values).astype(np.int64).reshape(-1)


def defined_attributes(attributes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Which attributes a scene has (value >= 0): bool [B] per attribute."""
    return {k: _as_int(attributes[k]) >= 0 for k in PROBE_ATTRIBUTES}


def named_attributes(attributes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Which attributes a `t2i_shapes` caption names: bool [B] per attribute.

    One object: its shape, colour, size and grid position. Two objects: both shapes, colours,
    sizes and their relation; not their grid cells, which the caption leaves open. The number
    of objects is always implied.
    """
    two = _as_int(attributes["num_objects"]) == 2
    one = ~two
    every = np.ones_like(two)
    return {
        "num_objects": every,
        "shape": every,
        "color": every,
        "size": every,
        "position": one,
        "shape2": two,
        "color2": two,
        "size2": two,
        "position2": np.zeros_like(two),
        "relation": two,
    }


def attribute_accuracy(keys: Sequence[str] = PROBE_ATTRIBUTES) -> Metric:
    """Per-attribute and whole-caption accuracy of predicted attributes.

    update(state, predictions, targets, mask): each a dict name -> [B] (mask bool: whether the
    attribute counts for that example; e.g. `named_attributes(targets)`). An example's caption
    is right when every attribute counted for it is right. compute() -> {name: accuracy (nan
    when never counted), "caption": whole-caption accuracy, "count": examples}.
    """
    keys = tuple(keys)

    def init() -> State:
        zeros = {k: np.zeros((), np.int64) for k in keys}
        return {
            "correct": dict(zeros),
            "counted": dict(zeros),
            "caption_correct": np.zeros((), np.int64),
            "examples": np.zeros((), np.int64),
        }

    def update(state: State, predictions, targets, mask) -> State:
        size = _as_int(targets[keys[0]]).shape[0]
        caption_ok = np.ones(size, bool)
        correct, counted = dict(state["correct"]), dict(state["counted"])
        for k in keys:
            m = np.asarray(mask[k], bool).reshape(-1)
            ok = _as_int(predictions[k]) == _as_int(targets[k])
            correct[k] = correct[k] + np.sum(ok & m)
            counted[k] = counted[k] + np.sum(m)
            caption_ok &= ok | ~m
        return {
            "correct": correct,
            "counted": counted,
            "caption_correct": state["caption_correct"] + np.sum(caption_ok),
            "examples": state["examples"] + size,
        }

    def merge(a: State, b: State) -> State:
        return {
            "correct": {k: a["correct"][k] + b["correct"][k] for k in keys},
            "counted": {k: a["counted"][k] + b["counted"][k] for k in keys},
            "caption_correct": a["caption_correct"] + b["caption_correct"],
            "examples": a["examples"] + b["examples"],
        }

    def compute(state: State) -> dict[str, float]:
        def ratio(num, den) -> float:
            return float(num) / float(den) if den else float("nan")

        out = {k: ratio(state["correct"][k], state["counted"][k]) for k in keys}
        out["caption"] = ratio(state["caption_correct"], state["examples"])
        out["count"] = int(state["examples"])
        return out

    return Metric(init, update, merge, compute)


def _normalize(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_ids_of(captions: Sequence[str]) -> np.ndarray:
    """int [N]: equal ids for equal caption text (the R-precision notion of 'mismatched')."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(c, len(index)) for c in captions], np.int64)


def max_mismatched(text_ids: np.ndarray) -> int:
    """The most mismatched captions every image can get: N - (largest group of equal text)."""
    _, counts = np.unique(np.asarray(text_ids), return_counts=True)
    return int(len(text_ids) - counts.max())


def r_precision(
    image_emb,
    text_emb,
    *,
    seed: int,
    text_ids: np.ndarray | None = None,
    num_mismatched: int = 99,
    folds: int = 10,
) -> dict:
    """R-precision (R = 1) of images [N, D] against their captions' embeddings [N, D].

    Row i of `text_emb` is image i's true caption; mismatched captions are drawn for each image
    from the other rows whose `text_ids` differ (default: every other row), without
    replacement, from `np.random.default_rng(seed)` in image order. Returns {"mean", "std",
    "folds", "num_mismatched", "hits": bool [N]}.
    """
    images, texts = _normalize(image_emb), _normalize(text_emb)
    n = images.shape[0]
    if texts.shape[0] != n:
        raise ValueError(f"{n} images but {texts.shape[0]} captions")
    ids = np.arange(n) if text_ids is None else np.asarray(text_ids).reshape(-1)
    if not 1 <= folds <= n:
        raise ValueError(f"folds must be in [1, {n}], got {folds}")
    if num_mismatched < 1:
        raise MetricError(f"R-precision needs at least 1 mismatched caption, got {num_mismatched}")
    if num_mismatched > max_mismatched(ids):
        raise MetricError(
            f"{num_mismatched} mismatched captions asked, but some image has only "
            f"{max_mismatched(ids)} captions with other text"
        )
    rng = np.random.default_rng(seed)
    hits = np.zeros(n, bool)
    for i in range(n):
        candidates = np.flatnonzero(ids != ids[i])
        drawn = rng.choice(candidates, size=num_mismatched, replace=False)
        true_sim = images[i] @ texts[i]
        hits[i] = bool(np.all(true_sim > texts[drawn] @ images[i]))
    per_fold = np.asarray([h.mean() for h in np.array_split(hits, folds)])
    return {
        "mean": float(per_fold.mean()),
        "std": float(per_fold.std()),
        "folds": folds,
        "num_mismatched": num_mismatched,
        "hits": hits,
    }


def _check_clamp(clamp: str) -> None:
    if clamp not in ("mean", "pair"):
        raise ValueError(f"clamp must be 'mean' (torchmetrics) or 'pair' (Hessel et al.): {clamp}")


def clip_score_metric(clamp: str = "mean") -> Metric:
    """Streaming CLIP-style score over (image [B, D], caption [B, D]) embedding pairs."""
    _check_clamp(clamp)

    def init() -> State:
        return {"sum": np.zeros((), np.float64), "count": np.zeros((), np.int64)}

    def update(state: State, image_emb, text_emb) -> State:
        scores = 100.0 * np.sum(_normalize(image_emb) * _normalize(text_emb), axis=-1)
        if clamp == "pair":
            scores = np.maximum(scores, 0.0)
        return {"sum": state["sum"] + scores.sum(), "count": state["count"] + scores.shape[0]}

    def merge(a: State, b: State) -> State:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def compute(state: State) -> float:
        mean = float(state["sum"] / state["count"])
        return max(mean, 0.0) if clamp == "mean" else mean

    return Metric(init, update, merge, compute)


def clip_score(image_emb, text_emb, *, clamp: str = "mean") -> float:
    """The CLIP-style score of paired embeddings [N, D] (see the module docstring)."""
    metric = clip_score_metric(clamp)
    return metric.compute(metric.update(metric.init(), image_emb, text_emb))
