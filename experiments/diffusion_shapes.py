"""Text-conditional diffusion on the built-in `t2i_shapes` scenes.

Variants (`--config experiments/diffusion_shapes.py:VARIANT`):
  demo  a 2-core CPU in minutes (the `make demo` run)
  full  an accelerator: a wider UNet, more steps
  test  a few seconds per step, for the test suite

  t2i train --config experiments/diffusion_shapes.py:demo --workdir runs/demo
  t2i sample --workdir runs/demo --prompt "a large red circle in the center" --num 4 \
      --seed 0 --out red_circle.png
"""

import ml_collections

PROMPTS = (
    "a large red circle in the center",
    "a small blue square in the top left",
    "a large green triangle at the bottom",
    "a small yellow square on the right",
    "a large purple circle in the top right",
    "a large cyan square on the left",
    "a small red triangle to the left of a small blue circle",
    "a small green circle above a small yellow triangle",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in ("demo", "full", "test"):
        raise ValueError(f"unknown variant '{variant}'; choose demo, full or test")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "diffusion"

    c.data = ml_collections.ConfigDict()
    c.data.name = "t2i_shapes"
    c.data.variant = "default"  # TFDS builder config: default (20k train) or small.
    c.data.dir = "data"  # Built here on first use (`t2i data prepare t2i_shapes`).
    c.data.image_size = 32
    c.data.workers = 0  # grain worker processes; 0 reads in the training process.

    c.text = ml_collections.ConfigDict()
    # transformer | causal | bow | tfidf | embedding | bert (t2i_jax/text/assets.py)
    c.text.encoder = "transformer"
    c.text.vocab_size = 128  # SentencePiece; capped by what the captions support.
    c.text.max_len = 24
    c.text.width = 128  # transformer, causal, bow, tfidf, embedding (bert: its own)
    c.text.depth = 2
    c.text.num_heads = 4
    c.text.dropout = 0.0
    c.text.sublinear_tf = False  # tfidf: tf = 1 + ln(count)
    c.text.word_vectors = ""  # embedding: GloVe / word2vec text file to start from
    c.text.pretrained = ""  # bert: Hugging Face folder ("": all-MiniLM-L6-v2 package)
    c.text.finetune = False  # bert: train it too (else frozen by the optimizer mask)
    c.text.cache_features = True  # frozen encoders: read features cached per data set

    c.model = ml_collections.ConfigDict()  # UNet fields (t2i_jax/nets/unet.py).
    c.model.base_channels = 64
    c.model.channel_mults = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (8,)
    c.model.cross_attention_resolutions = (16, 8)
    c.model.num_heads = 4
    c.model.dropout = 0.0

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.timesteps = 1000
    c.diffusion.schedule = "cosine"  # cosine | linear
    c.diffusion.prediction = "v"  # v | eps (v stays well-conditioned at high noise)
    c.diffusion.p_uncond = 0.1  # caption dropout for classifier-free guidance
    c.diffusion.sampler = "ddim"  # ddim | ddpm
    c.diffusion.sample_steps = 50
    c.diffusion.eta = 0.0
    c.diffusion.guidance = 3.0
    c.diffusion.clip_denoised = True

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.warmup_steps = 200
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.ema = 0.999
    c.optim.freeze = ""  # regex over param paths ("text_encoder/.*") kept fixed

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000
    c.train.batch_size = 128
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.train.sample_every = 5000
    c.train.keep_checkpoints = 3

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = PROMPTS
    c.sample.per_prompt = 4

    if variant == "demo":
        # Sized for 2 CPU cores (~0.25 s a step): most FLOPs are at 32x32, so that level
        # is narrow and the width grows at 16x16 and 8x8.
        c.model.base_channels = 16
        c.model.channel_mults = (1, 2, 4)
        c.model.num_res_blocks = 1
        c.text.width = 64
        c.text.depth = 2
        c.train.steps = 2500  # ~11 min of training on 2 cores; make demo < 20 min
        c.train.batch_size = 32
        c.train.log_every = 25
        c.train.checkpoint_every = 500
        c.train.sample_every = 1000
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 100
        c.optim.ema = 0.995
        c.diffusion.sample_steps = 50
    elif variant == "test":
        c.data.variant = "small"
        c.model.base_channels = 16
        c.model.channel_mults = (1, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (16,)
        c.model.cross_attention_resolutions = (16,)
        c.model.num_heads = 2
        c.text.width = 32
        c.text.depth = 1
        c.text.num_heads = 2
        c.text.max_len = 16
        c.train.steps = 6
        c.train.batch_size = 8
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.sample_every = 1000
        c.optim.warmup_steps = 2
        c.sample.prompts = PROMPTS[:2]
        c.sample.per_prompt = 1
        c.diffusion.sample_steps = 4
    return c
