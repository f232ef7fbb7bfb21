"""Reading a Hugging Face BERT folder: `config.json`, `model.safetensors` and the vocabulary.

The vocabulary is `vocab.txt` or `tokenizer.json`, as Hugging Face and sentence-transformers
save them. `load_bert` gives the Flax module, its params, the WordPiece tokenizer and the config;
`convert_state_dict` maps Hugging Face tensor names onto the Flax param tree, checking
every shape against the config.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t2i_jax.errors import CheckpointError
from t2i_jax.text.bert import BertConfig, BertEncoder
from t2i_jax.text.wordpiece import WordPieceTokenizer

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
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens, tokens > 0)["params"])
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
