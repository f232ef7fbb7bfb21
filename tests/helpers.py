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


def start_cli(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    """Starts the real `t2i` entry point without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "t2i_jax.cli", *args],
        cwd=REPO,
        env={**cli_env(), **(env_extra or {})},
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
    from t2i_jax.text.encoders import build_text
    from t2i_jax.text.setup import TextContext
    from t2i_jax.train import loop

    config = config_lib.load_config(f"{os.path.join(REPO, experiment)}:test")
    config.data.dir = str(data_dir)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    builder = sources.prepare(config.data.name, config.data.dir, config.data.variant)
    text = build_text(config, TextContext(str(workdir), builder, config.seed))
    method = registry.build_method(config, text)
    mesh = sharding.make_mesh(jax.devices()[:1])
    fns = loop.compile_functions(method, config, mesh, method.load_frozen())
    return config, builder, method, fns


def train_steps(fns, batch, steps: int):
    """(state, [metrics of each step as floats]) after `steps` steps of the compiled train
    functions on one batch, from init with key 0 and step keys 100, 101, ..."""
    import jax

    state = fns.init(jax.random.key(0))
    logs = []
    for i in range(steps):
        state, metrics = fns.train_step(
            state, jax.device_put(batch, fns.batch_sharding), jax.random.key(100 + i)
        )
        logs.append({k: float(v) for k, v in metrics.items()})
    return state, logs


def untrained_vae_run(data_dir, workdir) -> str:
    """What latent diffusion reads of the VAE run `ldm.autoencoder` names: its config.json
    (the latent shape) and a checkpoint (the frozen weights). The `test` variant's text-free
    VAE at its initial state (random, non-zero weights throughout, EMA equal to them): only
    `init` is compiled, no step trained, validated or sampled."""
    import jax

    from t2i_jax import config as config_lib
    from t2i_jax.checkpoint import Checkpointer

    overrides = {"vae.conditional": False, "vae.prior": "standard"}
    config, _, _, fns = build_method("experiments/vae_shapes.py", data_dir, workdir, **overrides)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    checkpointer.save(0, fns.init(jax.random.key(0)), None)
    checkpointer.close()
    return str(workdir)


def full_vae_config_run(workdir) -> str:
    """The VAE run `experiments/ldm_shapes.py:full` builds on, as far as building or
    compiling the LDM reads it (`preflight.stand_in_autoencoder` of `vae_shapes.py:full`)."""
    from t2i_jax import config as config_lib
    from t2i_jax.train import preflight

    vae = config_lib.load_config(os.path.join(REPO, "experiments", "vae_shapes.py:full"))
    return preflight.stand_in_autoencoder(vae, str(workdir))


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


def grid_size(prompts: int, per_prompt: int, image_size: int, caption_lines: int = 1):
    """(width, height) of a `save_grid` PNG: a column per prompt of `per_prompt` tiles scaled
    4x, 4 pixels of padding around each, and 12 pixels a caption line (+4) under them."""
    cell = 4 * image_size + 4
    return prompts * cell + 4, per_prompt * cell + 4 + 12 * caption_lines + 4


def grid_images(path, prompts: int, per_prompt: int, image_size: int) -> np.ndarray:
    """uint8 [prompts, per_prompt, size, size, 3]: the images of a `save_grid` PNG (tiles are
    scaled 4x by nearest neighbour, so every 4th pixel of a tile is the image's)."""
    from PIL import Image

    grid = np.asarray(Image.open(path).convert("RGB"))
    cell = 4 * image_size + 4
    corners = [[(4 + n * cell, 4 + p * cell) for n in range(per_prompt)] for p in range(prompts)]
    return np.asarray(
        [[grid[y : y + cell - 4 : 4, x : x + cell - 4 : 4] for y, x in col] for col in corners]
    )


def check_eval_r_precision(workdir, split: str = "validation") -> float:
    """The generated R-precision of a run's eval/metrics.json is that of the images its
    eval/samples_<split>.png shows (all of them: num <= 8, the grid's columns), re-embedded
    and re-ranked here with the settings metrics.json records. Returns it."""
    from t2i_jax import config as config_lib
    from t2i_jax.data import sources
    from t2i_jax.data.examples import load_examples
    from t2i_jax.eval.evaluators import load_evaluators
    from t2i_jax.metrics import alignment

    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    config = config_lib.from_json((workdir / "config.json").read_text())
    data, num = config.data, metrics["num"]
    assert num <= 8
    examples = load_examples(sources.load_builder(data.name, data.dir, data.variant), split, num)
    shown = grid_images(workdir / "eval" / f"samples_{split}.png", num, 2, data.image_size)
    np.testing.assert_array_equal(shown[:, 1], examples.images)  # bottom row: the real ones
    evaluators = load_evaluators(data.name, data.dir, data.variant, train_if_missing=False)
    written = metrics["splits"][split]
    recomputed = alignment.r_precision(
        evaluators.embed_images(shown[:, 0]),
        evaluators.embed_texts(examples.captions),
        seed=metrics["seed"],
        text_ids=alignment.text_ids_of(examples.captions),
        num_mismatched=written["num_mismatched"],
        folds=written["folds"],
    )
    value = written["generated"]["r_precision"]
    assert 0.0 <= value <= 1.0
    assert (value, written["generated"]["r_precision_std"]) == (
        recomputed["mean"],
        recomputed["std"],
    )
    return value


def sample_checked(args: list[str], out, *, prompts: int, per_prompt: int, image_size: int,
                   seed: int = 0, repeat: bool = True) -> None:  # fmt: skip
    """`t2i sample *args --seed seed --out out`, then checks what it wrote: a grid of the
    layout's exact size; with `repeat`, also that the same command in a new process writes
    the same bytes and another seed gives other images (two more processes: families
    whose tests check both in-process pass repeat=False)."""
    from PIL import Image

    again = out.with_name(f"{out.stem}_again.png")
    other = out.with_name(f"{out.stem}_seed{seed + 1}.png")
    runs = ((out, seed), (again, seed), (other, seed + 1)) if repeat else ((out, seed),)
    for path, s in runs:
        result = run_cli("sample", *args, "--seed", str(s), "--out", str(path))
        assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == grid_size(prompts, per_prompt, image_size)
    if not repeat:
        return
    assert again.read_bytes() == out.read_bytes()
    first, second = (grid_images(p, prompts, per_prompt, image_size) for p in (out, other))
    for a, b in zip(first.reshape(-1, *first.shape[2:]), second.reshape(-1, *first.shape[2:]),
                    strict=True):  # fmt: skip
        assert not np.array_equal(a, b)  # every image


INCEPTION_SEED = 0  # of the random Inception weights the Inception-metric tests use


def write_random_inception(path: str, seed: int = INCEPTION_SEED) -> str:
    """`load_fid_inception(random_seed=seed)`'s variables as a pytorch-fid state dict file
    (`.safetensors`, pytorch-fid's tensor names): the FID network without downloading it."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from t2i_jax.nets import inception as inception_net

    flat = traverse_util.flatten_dict(inception_net.random_variables(seed))
    state = {}
    for (collection, *names), value in flat.items():
        name, kind = inception_net._torch_name(collection, tuple(names))
        if kind == "conv":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "dense":
            value = value.T
        state[name] = np.ascontiguousarray(value)
    save_file(state, path)
    return path
