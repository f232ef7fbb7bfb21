"""A method's view of its text encoder: init, encode, cached features, the empty caption.

Every family conditions on text the same way, so this is shared rather than written per
method: a trained encoder's params sit under "text_encoder" in a player's params; a frozen
one's are the frozen weights' "text_encoder" (never in the train state), and its features
may come from the batch (the feature cache); classifier-free guidance's dropped captions
become the tokenizer's empty caption.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t2i_jax import partitioning
from t2i_jax.errors import CheckpointError
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.setup import TextSetup

NAME = "text_encoder"  # its key in a player's params, or in the frozen weights


def with_sequence(feats: TextFeatures) -> TextFeatures:
    """Pooled-only encoders (bag-of-words, TF-IDF) give cross-attention one token."""
    if feats.seq is not None:
        return feats
    batch = feats.pooled.shape[0]
    return feats.replace(seq=feats.pooled[:, None, :], mask=jnp.ones((batch, 1), bool))


def drop_captions(
    drop: jax.Array, tokens: jax.Array, mask: jax.Array, null_tokens, null_mask
) -> tuple[jax.Array, jax.Array]:
    """Replaces the captions where `drop` [B] is True by the empty one ([1, L] each)."""
    return jnp.where(drop[:, None], null_tokens, tokens), jnp.where(drop[:, None], null_mask, mask)


def _select(drop: jax.Array, null: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), null, x)


class TextConditioner:
    """Wraps a `TextSetup` for use inside a method's pure functions."""

    def __init__(self, setup: TextSetup):
        self.setup = setup
        self.encoder = setup.encoder
        self.null_tokens, self.null_mask = (
            jnp.asarray(a) for a in setup.tokenizer.empty(setup.max_len)
        )

    @property
    def frozen(self) -> bool:
        return self.setup.frozen

    def load_frozen(self) -> dict:
        """{"text_encoder": pretrained params} for a frozen encoder, else {}."""
        if not self.frozen:
            return {}
        if self.setup.pretrained is None:
            raise CheckpointError(
                f"the frozen {self.setup.name} text encoder's weights are not in this run's "
                "frozen store (runs/frozen_store.py); start the run from its config again"
            )
        return {NAME: self.setup.pretrained}

    def init(self, rng: jax.Array, tokens: jax.Array, mask: jax.Array) -> dict:
        """{"text_encoder": params} to add to a player's trained params ({} when frozen):
        the pretrained ones when fine-tuning, else a random init."""
        if self.frozen:
            return {}
        init = lambda: self.encoder.init(rng, tokens, mask, train=False)["params"]
        if self.setup.pretrained is not None:  # with the network's logical axes (FSDP)
            pretrained = jax.tree.map(jnp.asarray, self.setup.pretrained)
            return {NAME: partitioning.with_axes_of(jax.eval_shape(init), pretrained)}
        return {NAME: init()}

    def params(self, trained: dict, frozen: dict | None):
        """The encoder's params: from the frozen weights or from a player's params."""
        return (frozen or {})[NAME] if self.frozen else trained[NAME]

    def encode(self, params, tokens, mask, *, train=False, rng=None) -> TextFeatures:
        """TextFeatures (always with a sequence) of token ids; `params` are the encoder's."""
        rngs = {"dropout": rng} if rng is not None else None
        feats = self.encoder.apply({"params": params}, tokens, mask, train=train, rngs=rngs)
        return with_sequence(feats)

    def null(self, params, batch_size: int) -> TextFeatures:
        """The empty caption's features, repeated batch_size times."""
        feats = self.encode(params, self.null_tokens, self.null_mask)
        return jax.tree.map(lambda a: jnp.repeat(a, batch_size, axis=0), feats)

    def features(self, params, batch: dict, drop=None, *, train=False, rng=None) -> TextFeatures:
        """The batch's text features; the empty caption's where `drop` [B] is True.

        A batch with "text_pooled" carries a frozen encoder's cached features, used as they
        are; otherwise the encoder runs on the batch's tokens.
        """
        if "text_pooled" in batch:
            cached = with_sequence(
                TextFeatures(
                    seq=batch.get("text_seq"), pooled=batch["text_pooled"], mask=batch["mask"]
                )
            )
            if drop is None:
                return cached
            null = self.encode(params, self.null_tokens, self.null_mask)
            return jax.tree.map(functools.partial(_select, drop), null, cached)
        tokens, mask = batch["tokens"], batch["mask"]
        if drop is not None:
            tokens, mask = drop_captions(drop, tokens, mask, self.null_tokens, self.null_mask)
        return self.encode(params, tokens, mask, train=train, rng=rng)
