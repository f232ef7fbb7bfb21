"""Config sections shared by the experiment files (data, text, optimizer, training, samples).

Experiments on the same data differ in their method's section; the rest comes from here so
that "the same data, text encoder and schedule" is true by construction when families are
compared. Each function returns a fresh ConfigDict for one variant.
"""

from __future__ import annotations

import ml_collections

# Fixed prompts of the sample grids written during training (t2i_shapes captions).
SHAPES_PROMPTS = (
    "a large red circle in the center",
    "a small blue square in the top left",
    "a large green triangle at the bottom",
    "a small yellow square on the right",
    "a large purple circle in the top right",
    "a large cyan square on the left",
    "a small red triangle to the left of a small blue circle",
    "a small green circle above a small yellow triangle",
)

VARIANTS = ("demo", "full", "test")


def check_variant(variant: str | None) -> str:
    variant = variant or "demo"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; choose {', '.join(VARIANTS)}")
    return variant


def shapes_variant(base: str, image_size: int) -> str:
    """The `t2i_shapes` TFDS config of `base` ("default": 20k train, "small": 512) rendered
    at `image_size` px: the plain name at 32 px, `{base}_{size}px` otherwise."""
    return base if image_size == 32 else f"{base}_{image_size}px"


def shapes_data(variant: str, image_size: int = 32) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "t2i_shapes"
    # TFDS config: the same scenes and captions at every image size.
    d.variant = shapes_variant("small" if variant == "test" else "default", image_size)
    d.dir = "data"  # Built here on first use (`t2i data prepare t2i_shapes`).
    d.image_size = image_size
    # grain worker processes; 0 reads in the training process. Known issue: with N > 0 each
    # worker batches its own records (record i goes to worker i % N), so batches differ
    # from those of workers=0 (tests/train/test_input_pipeline.py, xfail).
    d.workers = 0
    d.random_flip = False  # True mirrors half the images: wrong for "on the left" captions
    return d


def digits_data() -> ml_collections.ConfigDict:
    """The built-in `digits` set: 1,439 real handwritten training digits at 32x32."""
    d = ml_collections.ConfigDict()
    d.name = "digits"
    d.variant = "default"
    d.dir = "data"
    d.image_size = 32
    d.workers = 0
    d.random_flip = False  # mirrored digits are not digits
    return d


def imported_data(name: str, image_size: int) -> ml_collections.ConfigDict:
    """A data set made by `t2i data import SRC --name NAME --image-size N` under `data`."""
    d = ml_collections.ConfigDict()
    d.name = name
    d.variant = "default"
    d.dir = "data"
    d.image_size = image_size
    d.workers = 0
    # Mirror half the training images per step; off by default because it makes every
    # caption that names left or right wrong for the mirrored half.
    d.random_flip = False
    return d


def text(variant: str) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    # transformer | causal | bow | tfidf | embedding | bert (t2i_jax/text/encoders.py)
    t.encoder = "transformer"
    t.vocab_size = 128  # SentencePiece; capped by what the captions support.
    t.max_len = 16 if variant == "test" else 24
    t.width = {"demo": 64, "full": 128, "test": 32}[variant]  # all but bert (its own)
    t.depth = 1 if variant == "test" else 2
    t.num_heads = 2 if variant == "test" else 4
    t.dropout = 0.0
    t.sublinear_tf = False  # tfidf: tf = 1 + ln(count)
    t.word_vectors = ""  # embedding: GloVe / word2vec text file to start from
    t.pretrained = ""  # bert: Hugging Face folder ("": all-MiniLM-L6-v2 package)
    t.finetune = False  # bert: train it too (else frozen by the optimizer mask)
    t.cache_features = True  # frozen encoders: read features cached per data set
    return t


def adamw(lr: float, *, warmup_steps: int, b1: float = 0.9, b2: float = 0.99, ema: float = 0.999):
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.schedule = "cosine"  # cosine | constant
    o.warmup_steps = warmup_steps
    o.b1 = b1
    o.b2 = b2
    o.weight_decay = 0.0
    o.grad_clip = 1.0
    o.ema = ema
    o.freeze = ""  # regex over param paths ("text_encoder/.*") kept fixed
    return o


# The `test` variants' optimizer: a short warm-up, then a constant rate. A cosine decay
# bakes train.steps into the compiled step; without one, test runs of any length (2 steps,
# 6, a resumed 3 + 3) compile one train step per family and share it through XLA's cache.
TEST_OPTIM = {"warmup_steps": 2, "schedule": "constant"}


def mesh() -> ml_collections.ConfigDict:
    """The device mesh (t2i_jax/sharding.py): `data` x `fsdp` x `tensor` devices, one -1
    taking what the others leave. fsdp > 1 shards parameters and optimizer state."""
    m = ml_collections.ConfigDict()
    m.data = -1
    m.fsdp = 1
    m.tensor = 1  # reserved: tensor parallelism is not implemented
    m.min_shard_size = 2**14  # smaller tensors stay replicated
    # On the CPU backend, how many devices `t2i train` splits the host into (0: JAX's one):
    # XLA runs small convolutions on few threads each, so two data-parallel devices keep two
    # cores busier than one device does (benchmarks/RESULTS.md). Other backends ignore it.
    m.cpu_devices = 0
    return m


def train(variant: str, **overrides) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 100_000
    t.batch_size = 128
    t.log_every = 50
    t.checkpoint_every = 2000
    t.sample_every = 5000
    t.keep_checkpoints = 3
    # Checkpoints written in the background while training goes on (checkpoint.py).
    t.async_checkpoints = True
    # Mixed precision (t2i_jax/precision.py): matmuls and convolutions in compute_dtype;
    # norms, softmax, losses, the optimizer and the EMA in float32.
    t.compute_dtype = "float32"  # float32 | bfloat16
    t.param_dtype = "float32"  # float32 | bfloat16 (bfloat16 loses updates < 2^-8 of a weight)
    t.remat = "none"  # none | blocks | full (t2i_jax/remat.py)
    t.grad_accum_steps = 1  # microbatches per step, same result (methods/microbatches.py)
    # A step whose loss or gradients are NaN/Inf is skipped (train/nonfinite.py); after
    # this many in a row the run rolls back to its last checkpoint once, then stops (exit 3).
    t.skip_nonfinite = True
    t.max_consecutive_skips = 10
    t.eval_every = 0  # validation metrics every N steps, for methods with any (0: off)
    t.eval_batches = 8  # validation batches per evaluation (file order)
    # The evaluators' alignment measures of this many validation captions' samples, every
    # eval_every steps (eval/training_probe.py; 0: off), with this many sampler steps.
    t.probe_num = 0
    t.probe_sample_steps = 10
    t.update(overrides)  # The experiment's own defaults; `test` is the same for all.
    if variant == "test":
        t.update(
            steps=6,
            batch_size=8,
            log_every=2,
            checkpoint_every=3,
            sample_every=1000,
            eval_batches=2,
        )
    return t


def demo_train(**overrides) -> dict:
    """`train` values of a 2-core CPU demo (3,000 steps of 32), for `c.train.update`."""
    return {
        "steps": 3000,
        "batch_size": 32,
        "log_every": 20,
        "checkpoint_every": 500,
        "sample_every": 1000,
        "eval_every": 500,
        "eval_batches": 8,
        **overrides,
    }


def samples(variant: str) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.prompts = SHAPES_PROMPTS[:2] if variant == "test" else SHAPES_PROMPTS
    s.per_prompt = 1 if variant == "test" else 4
    return s
