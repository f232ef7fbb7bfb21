"""BERT's encoder in Flax, with Hugging Face's architecture and parameter layout.

BERT's post-LayerNorm encoder: word + position + token-type(0) embeddings and a LayerNorm,
then per layer x = LN(x + Attn(x)), x = LN(x + MLP(x)). Padded keys get zero attention
weight, so padded positions change no output at valid positions. `BertConfig` holds the
fields of a Hugging Face `config.json` it uses; `bert_weights.load_bert` reads a folder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax import partitioning as part
from t2i_jax import remat as rematerialise
from t2i_jax.errors import CheckpointError
from t2i_jax.text.features import TextFeatures

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT `config.json` that the encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> BertConfig:
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{source}: position_embedding_type={d['position_embedding_type']!r} is not "
                "supported (only 'absolute')"
            )
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise CheckpointError(f"{source}: missing keys {missing}")
        # Cast each value to its field's type (required fields are all ints).
        cast = {
            f.name: int if f.default is dataclasses.MISSING else type(f.default) for f in fields
        }
        try:
            config = cls(**{name: cast[name](d[name]) for name in cast if name in d})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad value: {e}") from e
        if config.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(
                f"{source}: hidden_act={config.hidden_act!r} is not supported "
                f"(one of {sorted(_ACTIVATIONS)})"
            )
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config


class _BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + W2 act(W1 x))."""

    config: BertConfig
    dropout: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        heads = cfg.num_attention_heads
        head_dim = width // heads
        det = not (train and self.dropout)
        dense = lambda n, name: part.Dense(n, dtype=self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name
        )

        def split(h: jax.Array) -> jax.Array:
            return h.reshape(batch, length, heads, head_dim)

        # Not layers.MultiHeadAttention: HF's [D, D] kernels named at this level and scaling
        # after the float32 matmul (HF's order) would change the param tree and the outputs.
        q, k, v = (split(dense(width, n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        # Padded keys get exactly zero weight. A query row is never fully masked for real
        # captions ([CLS] is always valid); an all-padding row attends uniformly, harmlessly.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=det)(probs)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
        h = dense(width, "attention_output")(ctx)
        h = nn.Dropout(cfg.hidden_dropout_prob, deterministic=det)(h)
        x = norm("attention_norm")(x + h)

        h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
        h = dense(width, "output")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob, deterministic=det)(h)
        return norm("output_norm")(x + h)


class BertEncoder(nn.Module):
    """BERT encoder giving TextFeatures, the interface of every text encoder here.

    `seq` is the last hidden state, zero at padded positions; `pooled` its mean over
    valid positions (sentence-transformers' mean pooling, before normalisation).

    Fields:
      config: the architecture (from `config.json`).
      dropout: apply the config's dropout rates when train=True (fine-tuning; uses the
        'dropout' rng). False (the default) keeps a frozen encoder deterministic.
      dtype: compute dtype (params stay float32; softmax in float32); outputs float32.
      remat: none | blocks | full (t2i_jax/remat.py).
    """

    config: BertConfig
    dropout: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # none | blocks | full (t2i_jax/remat.py)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> TextFeatures:
        """tokens int32 [B, L], mask bool [B, L] -> TextFeatures(seq [B, L, D], pooled [B, D])."""
        cfg = self.config
        length = tokens.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        mask = mask.astype(bool)
        embed = lambda n, name: part.Embed(n, cfg.hidden_size, name=name)
        x = embed(cfg.vocab_size, "word_embeddings")(tokens)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros((1, 1), jnp.int32))
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, use_fast_variance=False, name="embeddings_norm"
        )(x).astype(self.dtype)
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not (train and self.dropout))(x)
        layer = rematerialise.block(_BertLayer, self.remat)
        for i in range(cfg.num_hidden_layers):
            x = layer(cfg, self.dropout, self.dtype, name=f"layer_{i}")(x, mask, train=train)

        valid = mask[..., None]
        seq = jnp.where(valid, x.astype(jnp.float32), 0.0)
        count = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        return TextFeatures(seq=seq, pooled=jnp.sum(seq, axis=1) / count, mask=mask)
