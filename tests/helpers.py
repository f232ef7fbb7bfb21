"""Paths and small utilities shared by the tests."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "diffusion_shapes.py")


def train_args(workdir, data_dir, *extra: str) -> list[str]:
    """`t2i train` arguments for the experiment's `test` variant on the test data."""
    return [
        "train",
        "--config",
        f"{EXPERIMENT}:test",
        "--workdir",
        str(workdir),
        f"--config.data.dir={data_dir}",
        "--no-progress",
        *extra,
    ]


# XLA without LLVM's optimisations: the suite compiles faster (see conftest.py).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cli_env() -> dict:
    """The environment of a user's shell: one CPU device, not the tests' eight."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "XLA_FLAGS": TEST_XLA_FLAGS}


def start_cli(*args: str) -> subprocess.Popen:
    """Starts the real `t2i` entry point without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(
    *args: str, env_extra: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs the real `t2i` entry point in a fresh process (one CPU device)."""
    env = {**cli_env(), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def tiny_bert_folder(path: str, prefix: str = "", **config_overrides) -> dict[str, np.ndarray]:
    """A 1-layer, 16-wide BERT with random weights and the real vocabulary."""
    from safetensors.numpy import save_file

    from t2i_jax.text.bert_package import default_model_path

    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(default_model_path(), "vocab.txt"), path)
    config = {
        "vocab_size": 30522,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
    }
    config.update(config_overrides)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    d, i = config["hidden_size"], config["intermediate_size"]
    shapes_ = {
        "embeddings.word_embeddings.weight": (30522, d),
        "embeddings.position_embeddings.weight": (64, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
        "pooler.dense.weight": (d, d),  # unused by the encoder
    }
    layer = "encoder.layer.0."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
        shapes_ |= {layer + name + ".weight": (d, d), layer + name + ".bias": (d,)}
    shapes_ |= {
        layer + "attention.output.dense.weight": (d, d),
        layer + "attention.output.dense.bias": (d,),
        layer + "attention.output.LayerNorm.weight": (d,),
        layer + "attention.output.LayerNorm.bias": (d,),
        layer + "intermediate.dense.weight": (i, d),
        layer + "intermediate.dense.bias": (i,),
        layer + "output.dense.weight": (d, i),
        layer + "output.dense.bias": (d,),
        layer + "output.LayerNorm.weight": (d,),
        layer + "output.LayerNorm.bias": (d,),
    }
    tensors = {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in shapes_.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return tensors


def build_method(experiment: str, data_dir, workdir, **overrides):
    """(config, builder, method, compiled functions on one device) of an experiment's
    `test` variant on the test data, with `overrides` {"key": value}."""
    import jax

    from t2i_jax import config as config_lib
    from t2i_jax import sharding
    from t2i_jax.data import sources
    from t2i_jax.methods import registry
    from t2i_jax.text.setup import TextContext
    from t2i_jax.train import loop

    config = config_lib.load_config(f"{os.path.join(REPO, experiment)}:test")
    config.data.dir = str(data_dir)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
    text = registry.build_text(config, TextContext(str(workdir), builder, config.seed))
    method = registry.build_method(config, text)
    fns = loop.compile_functions(method, config, sharding.make_mesh(jax.devices()[:1]))
    return config, builder, method, fns


def real_batch(config, builder, method, split: str = "train") -> dict:
    """The first train.batch_size records of `split` as a batch (images in [-1, 1])."""
    import jax.numpy as jnp

    from t2i_jax.data import sources

    source = builder.as_data_source(split)
    records = [source[i] for i in range(config.train.batch_size)]
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
    captions = [sources.decode_caption(r["caption"], split) for r in records]
    tokens, mask = method.text_setup.tokenizer.encode(captions, config.text.max_len)
    return {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
