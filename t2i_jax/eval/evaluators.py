"""The built-in alignment evaluators of `t2i_shapes`: an attribute probe and a contrastive encoder.

`train_evaluators(name, data_dir, variant, seed=...)` trains both on the real training split
plus scenes with the held-out (shape, colour) pairs (jit-compiled steps, every draw from the
seed), measures them on the real `test` and `compositional` splits and stores them under
`<builder.data_dir>/evaluators/`:

  evaluators.json          architecture configs, training plan, seed, tokenizer file, digests,
                           real-test probe accuracy per attribute, real-test R-precision
  probe.safetensors        AttributeProbe params (flattened with "/")
  contrastive.safetensors  ContrastiveEncoder params
  tokenizer.model          the data set's SentencePiece model the text tower was trained with

The evaluators must recognise the held-out pairs that the generators never see, or the
`compositional` scores would measure the evaluators' blind spot. So they also train on
`Plan.held_out_scenes` scenes made by `shapes.make_example(.., "compositional", i)` under a
seed of their own: the same kind of scenes as the `compositional` split, never its records.

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
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from t2i_jax import rng
from t2i_jax.data import shapes, sources
from t2i_jax.errors import DataError
from t2i_jax.metrics import alignment
from t2i_jax.nets.contrastive import ContrastiveEncoder, info_nce
from t2i_jax.nets.probe import HEADS, AttributeProbe
from t2i_jax.text.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: trained with held-out scenes too
DIRNAME = "evaluators"
SUPPORTED = ("t2i_shapes",)  # The probe's heads are this data set's attributes.
TOKENIZER_VOCAB = 128  # The data set's tokenizer file the runs use by default.
EVAL_BATCH = 250
PROBE_TARGET = 0.99  # per attribute, on real test images, for a probe worth trusting


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long to train each evaluator (steps of `batch_size` examples, AdamW, cosine)."""

    probe_steps: int
    contrastive_steps: int
    held_out_scenes: int
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50


# Measured on a 2-core CPU: `default` trains both in a few minutes; `small` (512 training
# images) is for tests and reaches lower accuracy.
PLANS: dict[str, Plan] = {
    "default": Plan(probe_steps=800, contrastive_steps=600, held_out_scenes=4000),
    "small": Plan(
        probe_steps=150, contrastive_steps=150, held_out_scenes=128, batch_size=64, lr=3e-3
    ),
}
# 128 features: `t2i eval`'s default 256 images per split give a full-rank covariance.
PROBE_CONFIG = {"channels": (32, 64, 128), "features": 128}
CONTRASTIVE_CONFIG = {
    "max_len": 32,
    "embed_dim": 128,
    "channels": (32, 64, 128),
    "image_features": 256,
    "text_width": 64,
    "text_depth": 2,
    "text_heads": 4,
}


# -- data ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Examples:
    """The first examples of a split, as arrays: images uint8 [N, H, W, 3], attributes [N]."""

    images: np.ndarray
    captions: list[str]
    attributes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)


def load_examples(builder, split: str, num: int | None = None) -> Examples:
    """Records 0..num-1 of `split` (all when num is None); fails if the split is shorter."""
    source = builder.as_data_source(split)
    num = len(source) if num is None else num
    if num > len(source):
        raise DataError(f"{builder.name} {split} has {len(source)} examples, {num} asked")
    records = source.__getitems__(list(range(num)))
    where = f"{builder.name} {split}"
    return Examples(
        images=np.stack([np.asarray(r["image"], np.uint8) for r in records]),
        captions=[
            sources.decode_caption(r["caption"], f"{where}[{i}]") for i, r in enumerate(records)
        ],
        attributes={
            k: np.asarray([r["attributes"][k] for r in records], np.int32)
            for k in records[0]["attributes"]
        },
    )


def held_out_scenes(builder, num: int, seed: int) -> Examples:
    """`num` scenes with held-out pairs, drawn under the evaluators' seed, not the data's."""
    scene_seed = rng.stream_seed(seed, "evaluators/held_out_scenes")
    if scene_seed == builder.builder_config.seed:
        raise DataError("evaluator scene seed collides with the data set's seed")
    examples = [shapes.make_example(scene_seed, "compositional", i) for i in range(num)]
    return Examples(
        images=np.stack([e["image"] for e in examples]),
        captions=[e["caption"] for e in examples],
        attributes={
            k: np.asarray([e["attributes"][k] for e in examples], np.int32)
            for k in examples[0]["attributes"]
        },
    )


def concat(a: Examples, b: Examples) -> Examples:
    return Examples(
        images=np.concatenate([a.images, b.images]),
        captions=a.captions + b.captions,
        attributes={k: np.concatenate([a.attributes[k], b.attributes[k]]) for k in a.attributes},
    )


def _to_float(images: jax.Array) -> jax.Array:
    """uint8 pixels -> [-1, 1], the batch contract's scaling."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def _labels(attributes: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(attributes[k], np.int32) for k in HEADS], axis=1)


def _order(seed: int, name: str, num_records: int, plan: Plan, steps: int) -> np.ndarray:
    """int32 [steps, batch]: shuffled epochs from the seed, cut into batches."""
    gen = np.random.default_rng(rng.stream_seed(seed, name))
    need = steps * plan.batch_size
    epochs = -(-need // num_records)
    order = np.concatenate([gen.permutation(num_records) for _ in range(epochs)])
    return order[:need].reshape(steps, plan.batch_size).astype(np.int32)


def _optimizer(plan: Plan, steps: int) -> optax.GradientTransformation:
    warmup = min(plan.warmup_steps, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, plan.lr, warmup, max(steps, warmup + 1), end_value=0.05 * plan.lr
    )
    return optax.adamw(schedule, weight_decay=1e-4)


def _augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """Gaussian pixel noise of a random strength per image (std up to 0.1 on [-1, 1]).

    Generated images are never as clean as the renderer's; noise keeps the evaluators from
    relying on exact pixel values.
    """
    k1, k2 = jax.random.split(key)
    sigma = jax.random.uniform(k1, (x.shape[0], 1, 1, 1), maxval=0.1)
    return x + sigma * jax.random.normal(k2, x.shape)


def _probe_loss(model: AttributeProbe, params, idx, key, images, labels) -> jax.Array:
    """Cross-entropy summed over the heads, each averaged over the scenes that have it."""
    x = _augment(key, _to_float(images[idx]))
    y = labels[idx]
    out = model.apply({"params": params}, x)
    total = 0.0
    for j, name in enumerate(HEADS):
        valid = y[:, j] >= 0  # -1: no such attribute in this scene
        ce = optax.softmax_cross_entropy_with_integer_labels(
            out.logits[name], jnp.maximum(y[:, j], 0)
        )
        total += jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return total


def _contrastive_loss(
    model: ContrastiveEncoder, params, idx, key, images, tokens, mask
) -> jax.Array:
    x = _augment(key, _to_float(images[idx]))
    img, txt, scale = model.apply({"params": params}, x, tokens[idx], mask[idx])
    return info_nce(img, txt, scale)


# Module-level and keyed by static arguments (Flax modules hash by their fields), so repeated
# trainings with the same model, plan and length reuse one compilation.
@functools.partial(
    jax.jit, static_argnames=("model", "plan", "steps"), donate_argnames=("params", "opt_state")
)
def _train_step(model, plan: Plan, steps: int, params, opt_state, idx, step, stream, data):
    loss_fn = _probe_loss if isinstance(model, AttributeProbe) else _contrastive_loss
    key = rng.step_key(stream, step)
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(model, params, idx, key, *data)
    updates, opt_state = _optimizer(plan, steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _run_steps(model, params, steps: int, plan: Plan, order: np.ndarray, stream, *data):
    """Runs `steps` AdamW steps of the model's loss, one jitted call each.

    The data arrays live on the device as jit arguments (not constants baked into the
    program); each step gathers its batch `data[idx]` there. (A `lax.scan` over steps was
    ~10x slower on CPU: XLA runs the convolutions inside a loop body far less efficiently.)
    Returns (params, final loss).
    """
    opt_state = _optimizer(plan, steps).init(params)
    arrays = tuple(jnp.asarray(a) for a in data)
    loss = jnp.nan
    for step in range(steps):
        params, opt_state, loss = _train_step(
            model, plan, steps, params, opt_state, order[step], step, stream, arrays
        )
    return params, float(loss)


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, key, *inputs):
    return model.init(key, *inputs)["params"]


def train_probe(train: Examples, *, seed: int, plan: Plan, steps: int | None = None):
    """AttributeProbe params trained on `train`; returns (params, final loss)."""
    steps = plan.probe_steps if steps is None else steps
    model = AttributeProbe(**PROBE_CONFIG)
    images = jnp.zeros((1,) + train.images.shape[1:])
    params = _init(model, rng.stream_key(seed, "probe/init"), images)
    order = _order(seed, "probe/order", len(train), plan, steps)
    stream = rng.stream_key(seed, "probe/augment")
    return _run_steps(
        model, params, steps, plan, order, stream, train.images, _labels(train.attributes)
    )


def train_contrastive(
    train: Examples, tokenizer: Tokenizer, *, seed: int, plan: Plan, steps: int | None = None
):
    """ContrastiveEncoder params trained with the symmetric InfoNCE loss; (params, loss)."""
    steps = plan.contrastive_steps if steps is None else steps
    model = ContrastiveEncoder(vocab_size=tokenizer.vocab_size, **CONTRASTIVE_CONFIG)
    tokens, mask = tokenizer.encode(train.captions, CONTRASTIVE_CONFIG["max_len"])
    images = jnp.zeros((1,) + train.images.shape[1:])
    params = _init(model, rng.stream_key(seed, "contrastive/init"), images, tokens[:1], mask[:1])
    order = _order(seed, "contrastive/order", len(train), plan, steps)
    stream = rng.stream_key(seed, "contrastive/augment")
    return _run_steps(model, params, steps, plan, order, stream, train.images, tokens, mask)


# -- the stored evaluators -----------------------------------------------------------------
def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _module_config(config: dict) -> dict:
    """JSON lists back to the tuples a Flax module field holds (hashable, as jit needs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _batched(fn, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Applies a jitted fn over fixed-size batches (the last one padded): one compilation."""
    n = inputs[0].shape[0]
    outs = []
    for start in range(0, n, EVAL_BATCH):
        part = [a[start : start + EVAL_BATCH] for a in inputs]
        size = part[0].shape[0]
        if size < EVAL_BATCH:
            part = [np.concatenate([a, np.repeat(a[-1:], EVAL_BATCH - size, axis=0)]) for a in part]
        outs.append(jax.tree.map(lambda o, size=size: np.asarray(o)[:size], fn(*part)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_probe(model: AttributeProbe, params, images):
    out = model.apply({"params": params}, _to_float(images))
    return {k: jnp.argmax(v, axis=-1) for k, v in out.logits.items()}, out.features


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_images(model: ContrastiveEncoder, params, images):
    return model.apply({"params": params}, _to_float(images), method="encode_image")


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_texts(model: ContrastiveEncoder, params, tokens, mask):
    return model.apply({"params": params}, tokens, mask, method="encode_text")


@dataclasses.dataclass
class Evaluators:
    """A trained probe and contrastive encoder with the functions that apply them."""

    probe_params: dict
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

    def probe_outputs(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """uint8 images [N, H, W, 3] -> (predicted attribute values [N] by name, features)."""
        fn = functools.partial(_apply_probe, self.probe, self.probe_params)
        return _batched(fn, [np.asarray(images, np.uint8)])

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] -> unit embeddings [N, E]."""
        fn = functools.partial(_embed_images, self.encoder, self.contrastive_params)
        return _batched(fn, [np.asarray(images, np.uint8)])

    def embed_texts(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> unit embeddings [N, E]."""
        tokens, mask = self.tokenizer.encode(list(captions), self.encoder.max_len)
        fn = functools.partial(_embed_texts, self.encoder, self.contrastive_params)
        return _batched(fn, [tokens, mask])

    @property
    def digests(self) -> dict[str, str]:
        return dict(self.info["digests"])


def probe_accuracy(evaluators: Evaluators, examples: Examples) -> dict[str, float]:
    """Per-attribute accuracy over the attributes each scene has, and all of them right."""
    preds, _ = evaluators.probe_outputs(examples.images)
    metric = alignment.attribute_accuracy()
    mask = alignment.defined_attributes(examples.attributes)
    return metric.compute(metric.update(metric.init(), preds, examples.attributes, mask))


def contrastive_scores(evaluators: Evaluators, examples: Examples, *, seed: int) -> dict:
    """R-precision (99 mismatched, 10 folds) and CLIP-style score on real pairs."""
    img = evaluators.embed_images(examples.images)
    txt = evaluators.embed_texts(examples.captions)
    ids = alignment.text_ids_of(examples.captions)
    rp = alignment.r_precision(
        img, txt, seed=seed, text_ids=ids, num_mismatched=min(99, alignment.max_mismatched(ids))
    )
    return {
        "r_precision": rp["mean"],
        "r_precision_std": rp["std"],
        "num_mismatched": rp["num_mismatched"],
        "clip_score": alignment.clip_score(img, txt),
    }


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def evaluators_dir(builder) -> str:
    return os.path.join(builder.data_dir, DIRNAME)


def _check_name(name: str) -> None:
    if name not in SUPPORTED:
        raise DataError(f"no built-in evaluators for data set {name}; supported: {SUPPORTED}")


def train_evaluators(name: str, data_dir: str, variant: str, *, seed: int = 0) -> dict:
    """Trains and stores the probe and the contrastive encoder; returns evaluators.json.

    Prints the real-test probe accuracy per attribute and the real-test R-precision.
    """
    _check_name(name)
    builder = sources.prepare(name, data_dir, variant)
    plan = PLANS.get(variant, PLANS["default"])
    tokenizer_file = f"spm_vocab{TOKENIZER_VOCAB}.model"
    tokenizer = sources.prepare_tokenizer(builder, TOKENIZER_VOCAB)
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


def store_evaluators(path: str, evaluators: Evaluators) -> None:
    """Writes the evaluators to `path` atomically: a temporary folder beside it, renamed.

    Sets `evaluators.info["digests"]` (sha256 of each params file, 16 hex digits).
    """
    parent, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    try:
        for key, params in (
            ("probe", evaluators.probe_params),
            ("contrastive", evaluators.contrastive_params),
        ):
            save_file(_flat(params), os.path.join(tmp, f"{key}.safetensors"))
        evaluators.tokenizer.save(os.path.join(tmp, "tokenizer.model"))
        evaluators.info["digests"] = {
            key: _file_digest(os.path.join(tmp, f"{key}.safetensors"))
            for key in ("probe", "contrastive")
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
    _check_name(name)
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
    if info.get("format") != FORMAT_VERSION:
        raise DataError(f"{info_path}: unknown format {info.get('format')}; retrain them")
    try:
        probe = _unflat(load_file(os.path.join(path, "probe.safetensors")))
        enc = _unflat(load_file(os.path.join(path, "contrastive.safetensors")))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read evaluators in {path}: {e}") from e
    tokenizer = Tokenizer.load(os.path.join(path, "tokenizer.model"))
    return Evaluators(probe, enc, tokenizer, info, path)
