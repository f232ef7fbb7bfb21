"""Training the built-in evaluators of `t2i_shapes`: an attribute probe, a contrastive encoder.

Both train with AdamW on a cosine schedule (`Plan`), on shuffled epochs drawn from the seed,
with Gaussian pixel noise as augmentation; each step is one jitted call. The architectures
are `PROBE_CONFIG` and `CONTRASTIVE_CONFIG`; `eval/evaluators.py` stores the results.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t2i_jax import rng
from t2i_jax.data.examples import Examples
from t2i_jax.nets.contrastive import ContrastiveEncoder, info_nce
from t2i_jax.nets.probe import HEADS, AttributeProbe
from t2i_jax.text.tokenizer import Tokenizer


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
    # Every other data set: the contrastive encoder alone, on its own training split.
    "any": Plan(probe_steps=0, contrastive_steps=600, held_out_scenes=0),
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


def to_float(images: jax.Array) -> jax.Array:
    """uint8 pixels -> [-1, 1], the batch contract's scaling (training and applying alike)."""
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
    x = _augment(key, to_float(images[idx]))
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
    x = _augment(key, to_float(images[idx]))
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
    return nn.unbox(model.init(key, *inputs)["params"])


def train_probe(
    train: Examples, *, seed: int, plan: Plan, steps: int | None = None
) -> tuple[dict, float]:
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
) -> tuple[dict, float]:
    """ContrastiveEncoder params trained with the symmetric InfoNCE loss; (params, loss)."""
    steps = plan.contrastive_steps if steps is None else steps
    model = ContrastiveEncoder(vocab_size=tokenizer.vocab_size, **CONTRASTIVE_CONFIG)
    tokens, mask = tokenizer.encode(train.captions, CONTRASTIVE_CONFIG["max_len"])
    images = jnp.zeros((1,) + train.images.shape[1:])
    params = _init(model, rng.stream_key(seed, "contrastive/init"), images, tokens[:1], mask[:1])
    order = _order(seed, "contrastive/order", len(train), plan, steps)
    stream = rng.stream_key(seed, "contrastive/augment")
    return _run_steps(model, params, steps, plan, order, stream, train.images, tokens, mask)
