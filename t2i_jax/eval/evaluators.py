"""The alignment evaluators of a data set: a contrastive image-text encoder for every data set,
and an attribute probe for `t2i_shapes`.

`train_evaluators(name, data_dir, variant, seed=...)` trains them (`evaluator_training.py`) on
the data set's own training split, measures them on a held-out split and stores them under
`<builder.data_dir>/evaluators/`:

  evaluators.json          architecture configs, training plan, seed, tokenizer file, digests,
                           image size, real held-out probe accuracy and R-precision
  probe.safetensors        AttributeProbe params (flattened with "/"; t2i_shapes only)
  contrastive.safetensors  ContrastiveEncoder params
  tokenizer.model          the data set's SentencePiece model the text tower was trained with

Images larger than `MAX_IMAGE_SIZE` are resized to it (antialiased bicubic) before the
evaluators see them, in training and in use alike.

For `t2i_shapes` the evaluators must recognise the held-out (shape, colour) pairs that the
generators never see, or the `compositional` scores would measure the evaluators' blind spot.
So they also train on `Plan.held_out_scenes` scenes made by `shapes.make_example(..,
"compositional", i)` under a seed of their own: the same kind of scenes as the
`compositional` split, never its records.

The folder is written under a temporary name and renamed into place, so a killed run leaves
either the previous evaluators or none, never half of them. `load_evaluators` reads them (and
trains them first when missing, if asked).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from t2i_jax.batching import map_in_batches
from t2i_jax.data import sources
from t2i_jax.data.examples import Examples, concat, held_out_scenes, load_examples
from t2i_jax.data.image_decode import square_image
from t2i_jax.errors import DataError
from t2i_jax.eval.evaluator_training import (
    CONTRASTIVE_CONFIG,
    PLANS,
    PROBE_CONFIG,
    to_float,
    train_contrastive,
    train_probe,
)
from t2i_jax.metrics import alignment
from t2i_jax.nets.contrastive import ContrastiveEncoder
from t2i_jax.nets.probe import HEADS, AttributeProbe
from t2i_jax.text.tokenizer import Tokenizer, prepare_tokenizer

FORMAT_VERSION = 3  # 2: trained with held-out scenes too; 3: any data set, image_size
DIRNAME = "evaluators"
PROBE_DATA_SETS = ("t2i_shapes",)  # The probe's heads are this data set's attributes.
MAX_IMAGE_SIZE = 64  # larger data sets are scored at this size
MAX_TRAIN_EXAMPLES = 50_000  # the first records of `train` the contrastive encoder sees
MAX_HELD_OUT_EXAMPLES = 5_000  # the first records of the held-out split it is measured on
TOKENIZER_VOCAB = 128  # The data set's tokenizer file the runs use by default.
EVAL_BATCH = 250  # rows per call of the applied evaluators (the last call padded)
PROBE_TARGET = 0.99  # per attribute, on real test images, for a probe worth trusting


# -- applying them -------------------------------------------------------------------------
def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _module_config(config: dict) -> dict:
    """JSON lists back to the tuples a Flax module field holds (hashable, as jit needs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_probe(model: AttributeProbe, params, images):
    out = model.apply({"params": params}, to_float(images))
    return {k: jnp.argmax(v, axis=-1) for k, v in out.logits.items()}, out.features


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_images(model: ContrastiveEncoder, params, images):
    return model.apply({"params": params}, to_float(images), method="encode_image")


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_texts(model: ContrastiveEncoder, params, tokens, mask):
    return model.apply({"params": params}, tokens, mask, method="encode_text")


@dataclasses.dataclass
class Evaluators:
    """A trained probe and contrastive encoder with the functions that apply them."""

    probe_params: dict | None  # None: a data set without the probe's attributes
    contrastive_params: dict
    tokenizer: Tokenizer
    info: dict  # the contents of evaluators.json
    path: str

    @functools.cached_property
    def probe(self) -> AttributeProbe:
        return AttributeProbe(**_module_config(self.info["probe"]["config"]))

    @functools.cached_property
    def encoder(self) -> ContrastiveEncoder:
        return ContrastiveEncoder(
            vocab_size=self.tokenizer.vocab_size,
            **_module_config(self.info["contrastive"]["config"]),
        )

    @property
    def has_probe(self) -> bool:
        return self.probe_params is not None

    @property
    def image_size(self) -> int | None:
        return self.info.get("image_size")

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        if self.image_size is None or images.shape[1:3] == (self.image_size,) * 2:
            return images
        return np.stack([square_image(im, self.image_size) for im in images])

    def probe_outputs(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """uint8 images [N, H, W, 3] -> (predicted attribute values [N] by name, features)."""
        fn = functools.partial(_apply_probe, self.probe, self.probe_params)
        return map_in_batches(fn, [self._inputs(images)], EVAL_BATCH, fill="edge")

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] -> unit embeddings [N, E]."""
        fn = functools.partial(_embed_images, self.encoder, self.contrastive_params)
        return map_in_batches(fn, [self._inputs(images)], EVAL_BATCH, fill="edge")

    def embed_texts(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> unit embeddings [N, E]."""
        tokens, mask = self.tokenizer.encode(list(captions), self.encoder.max_len)
        fn = functools.partial(_embed_texts, self.encoder, self.contrastive_params)
        return map_in_batches(fn, [tokens, mask], EVAL_BATCH, fill="edge")

    @property
    def digests(self) -> dict[str, str]:
        return dict(self.info["digests"])


def probe_accuracy(evaluators: Evaluators, examples: Examples) -> dict[str, float]:
    """Per-attribute accuracy over the attributes each scene has, and all of them right."""
    preds, _ = evaluators.probe_outputs(examples.images)
    metric = alignment.attribute_accuracy()
    mask = alignment.defined_attributes(examples.attributes)
    return metric.compute(metric.update(metric.init(), preds, examples.attributes, mask))


# What a caption states, where a data set words the same content with several templates:
# R-precision's mismatched captions must state something else (for `digits`, another digit,
# not the same digit in other words). Other data sets: captions of other text.
CAPTION_CONTENT: dict[str, tuple[str, ...]] = {"digits": ("digit",)}


def caption_ids(name: str, examples: Examples) -> np.ndarray:
    """int [N]: equal ids for captions that state the same thing (`CAPTION_CONTENT`)."""
    keys = CAPTION_CONTENT.get(name)
    if not keys:
        return alignment.text_ids_of(examples.captions)
    content = zip(*(np.asarray(examples.attributes[k]).tolist() for k in keys), strict=True)
    return alignment.text_ids_of([repr(c) for c in content])


def contrastive_scores(
    evaluators: Evaluators,
    examples: Examples,
    *,
    seed: int,
    text_ids: np.ndarray | None = None,
) -> dict:
    """R-precision (99 mismatched, 10 folds; fewer on a small split) and CLIP-style score
    on real pairs."""
    img = evaluators.embed_images(examples.images)
    txt = evaluators.embed_texts(examples.captions)
    ids = alignment.text_ids_of(examples.captions) if text_ids is None else text_ids
    rp = alignment.r_precision(
        img,
        txt,
        seed=seed,
        text_ids=ids,
        num_mismatched=min(99, alignment.max_mismatched(ids)),
        folds=min(10, len(examples)),
    )
    return {
        "r_precision": rp["mean"],
        "r_precision_std": rp["std"],
        "num_mismatched": rp["num_mismatched"],
        "clip_score": alignment.clip_score(img, txt),
    }


# -- training once, storing, loading -------------------------------------------------------
def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def evaluators_dir(builder) -> str:
    return os.path.join(builder.data_dir, DIRNAME)


def has_probe(name: str) -> bool:
    return name in PROBE_DATA_SETS


def held_out_split(builder) -> str:
    """Where the evaluators' own accuracy is measured: `test`, else `validation`."""
    return "test" if "test" in builder.info.splits else "validation"


def train_evaluators(name: str, data_dir: str, variant: str, *, seed: int = 0) -> dict:
    """Trains and stores the evaluators of a data set; returns evaluators.json.

    Prints the real held-out R-precision (and the probe's accuracy per attribute).
    """
    if not has_probe(name):
        return _train_contrastive_only(name, data_dir, variant, seed=seed)
    builder = sources.prepare(name, data_dir, variant)
    plan = PLANS.get(variant, PLANS["default"])
    tokenizer_file = f"spm_vocab{TOKENIZER_VOCAB}.model"
    tokenizer = prepare_tokenizer(builder, TOKENIZER_VOCAB)
    train = concat(
        load_examples(builder, "train"), held_out_scenes(builder, plan.held_out_scenes, seed)
    )
    test = load_examples(builder, "test")
    compositional = load_examples(builder, "compositional")

    start = time.perf_counter()
    probe_params, probe_loss = train_probe(train, seed=seed, plan=plan)
    jax.block_until_ready(probe_params)
    probe_seconds = time.perf_counter() - start
    start = time.perf_counter()
    enc_params, enc_loss = train_contrastive(train, tokenizer, seed=seed, plan=plan)
    jax.block_until_ready(enc_params)
    enc_seconds = time.perf_counter() - start

    info = {
        "format": FORMAT_VERSION,
        "data": {"name": name, "variant": variant, "train_examples": len(train)},
        "seed": seed,
        "plan": dataclasses.asdict(plan),
        "probe": {
            "config": _jsonable(PROBE_CONFIG),
            "heads": HEADS,
            "final_loss": probe_loss,
            "train_seconds": round(probe_seconds, 1),
        },
        "contrastive": {
            "config": _jsonable(CONTRASTIVE_CONFIG),
            "tokenizer": tokenizer_file,
            "vocab_size": tokenizer.vocab_size,
            "final_loss": enc_loss,
            "train_seconds": round(enc_seconds, 1),
        },
    }
    evaluators = Evaluators(
        jax.device_get(probe_params), jax.device_get(enc_params), tokenizer, info, ""
    )
    info["probe"]["test_accuracy"] = probe_accuracy(evaluators, test)
    info["contrastive"]["test"] = contrastive_scores(evaluators, test, seed=seed)
    info["probe"]["compositional_accuracy"] = probe_accuracy(evaluators, compositional)
    info["contrastive"]["compositional"] = contrastive_scores(evaluators, compositional, seed=seed)

    store_evaluators(evaluators_dir(builder), evaluators)
    _print_summary(info)
    weak = [
        f"{split} {k} {v:.4f}"
        for split in ("test", "compositional")
        for k, v in info["probe"][f"{split}_accuracy"].items()
        if k in alignment.PROBE_ATTRIBUTES and v < PROBE_TARGET
    ]
    if weak and variant != "small":  # `small` is for tests and does not reach the target
        print(f"warning: probe below {PROBE_TARGET:.0%} on real images: {', '.join(weak)}")
    return info


def _train_contrastive_only(name: str, data_dir: str, variant: str, *, seed: int) -> dict:
    """Any data set: the contrastive encoder on (the first MAX_TRAIN_EXAMPLES of) its
    training split, at most MAX_IMAGE_SIZE px, measured on its held-out split."""
    builder = sources.prepare(name, data_dir, variant)
    plan = PLANS["any"]
    tokenizer = prepare_tokenizer(builder, TOKENIZER_VOCAB)
    data_size = int(builder.info.features["image"].shape[0])
    size = min(data_size, MAX_IMAGE_SIZE)
    count = min(len(builder.as_data_source("train")), MAX_TRAIN_EXAMPLES)
    train = load_examples(builder, "train", count, image_size=size)
    held_out = held_out_split(builder)
    start = time.perf_counter()
    enc_params, enc_loss = train_contrastive(train, tokenizer, seed=seed, plan=plan)
    jax.block_until_ready(enc_params)
    info = {
        "format": FORMAT_VERSION,
        "data": {"name": name, "variant": variant, "train_examples": len(train)},
        "image_size": size,
        "seed": seed,
        "plan": dataclasses.asdict(plan),
        "probe": None,
        "contrastive": {
            "config": _jsonable(CONTRASTIVE_CONFIG),
            "tokenizer": f"spm_vocab{TOKENIZER_VOCAB}.model",
            "vocab_size": tokenizer.vocab_size,
            "final_loss": enc_loss,
            "train_seconds": round(time.perf_counter() - start, 1),
            "held_out_split": held_out,
        },
    }
    evaluators = Evaluators(None, jax.device_get(enc_params), tokenizer, info, "")
    held_out_count = min(len(builder.as_data_source(held_out)), MAX_HELD_OUT_EXAMPLES)
    examples = load_examples(builder, held_out, held_out_count, image_size=size)
    info["contrastive"]["test"] = contrastive_scores(
        evaluators, examples, seed=seed, text_ids=caption_ids(name, examples)
    )
    store_evaluators(evaluators_dir(builder), evaluators)
    scores = info["contrastive"]["test"]
    print(
        f"contrastive encoder ({info['contrastive']['train_seconds']} s, {len(train)} "
        f"training images at {size} px): real {held_out} R-precision "
        f"{scores['r_precision']:.4f} +- {scores['r_precision_std']:.4f} "
        f"({scores['num_mismatched']} mismatched), CLIP-style score {scores['clip_score']:.2f}",
        flush=True,
    )
    return info


def store_evaluators(path: str, evaluators: Evaluators) -> None:
    """Writes the evaluators to `path` atomically: a temporary folder beside it, renamed.

    Sets `evaluators.info["digests"]` (sha256 of each params file, 16 hex digits).
    """
    parent, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    try:
        stored = {"probe": evaluators.probe_params, "contrastive": evaluators.contrastive_params}
        stored = {k: v for k, v in stored.items() if v is not None}
        for key, params in stored.items():
            save_file(_flat(params), os.path.join(tmp, f"{key}.safetensors"))
        evaluators.tokenizer.save(os.path.join(tmp, "tokenizer.model"))
        evaluators.info["digests"] = {
            key: _file_digest(os.path.join(tmp, f"{key}.safetensors")) for key in stored
        }
        with open(os.path.join(tmp, "evaluators.json"), "w") as f:
            json.dump(evaluators.info, f, indent=2)
        old = None
        if os.path.exists(path):  # Retraining: move the old ones aside, then swap.
            old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=parent)
            os.replace(path, os.path.join(old, name))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _print_summary(info: dict) -> None:
    for split in ("test", "compositional"):
        acc = info["probe"][f"{split}_accuracy"]
        print(
            f"attribute probe ({info['probe']['train_seconds']} s): real {split} accuracy "
            + ", ".join(f"{k} {acc[k]:.4f}" for k in (*alignment.PROBE_ATTRIBUTES, "caption")),
            flush=True,
        )
    for split in ("test", "compositional"):
        scores = info["contrastive"][split]
        print(
            f"contrastive encoder ({info['contrastive']['train_seconds']} s): real {split} "
            f"R-precision {scores['r_precision']:.4f} +- {scores['r_precision_std']:.4f} "
            f"({scores['num_mismatched']} mismatched), CLIP-style score "
            f"{scores['clip_score']:.2f}",
            flush=True,
        )


def _unflat(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def load_evaluators(
    name: str, data_dir: str, variant: str, *, train_if_missing: bool = True
) -> Evaluators:
    """The stored evaluators of a data set; trained first (seed 0) if missing and allowed."""
    builder = sources.load_builder(name, data_dir, variant)
    path = evaluators_dir(builder)
    info_path = os.path.join(path, "evaluators.json")
    if not os.path.isfile(info_path):
        if not train_if_missing:
            raise DataError(
                f"no evaluators in {path}; run `t2i data evaluators {name} --data-dir "
                f"{data_dir} --variant {variant}`"
            )
        print(f"note: training the {name} ({variant}) evaluators once, stored in {path}")
        train_evaluators(name, data_dir, variant, seed=0)
    with open(info_path) as f:
        try:
            info = json.load(f)
        except ValueError as e:
            raise DataError(f"{info_path} is not valid JSON ({e}); retrain the evaluators") from e
    if info.get("format") not in (2, FORMAT_VERSION):  # 2: t2i_shapes, as 3 at its size
        raise DataError(f"{info_path}: unknown format {info.get('format')}; retrain them")
    try:
        probe = None
        if info.get("probe") is not None:
            probe = _unflat(load_file(os.path.join(path, "probe.safetensors")))
        enc = _unflat(load_file(os.path.join(path, "contrastive.safetensors")))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read evaluators in {path}: {e}") from e
    tokenizer = Tokenizer.load(os.path.join(path, "tokenizer.model"))
    return Evaluators(probe, enc, tokenizer, info, path)
