"""VQ-VAE and its text-conditional code prior on the built-in `t2i_shapes` scenes.

Both stages train in one run (`methods/vqvae.py`): the autoencoder and its EMA codebook,
and the autoregressive prior on the codes of the same batches (stop-gradient), from step
`vqvae.prior_start`. Samples: prior -> codes -> decoder.

Variants (`--config experiments/vqvae_shapes.py:VARIANT`):
  demo  a 2-core CPU in minutes
  full  one 80 GB accelerator: 64x64 scenes, 16x16 codes, a wider prior, bfloat16
  test  a few seconds per step, for the test suite

  t2i train --config experiments/vqvae_shapes.py:demo --workdir runs/vqvae
  t2i sample --workdir runs/vqvae --prompt "a large red circle in the center" \
      --temperature 0.9 --top-k 32 --guidance 2 --out red.png
  t2i reconstruct --workdir runs/vqvae --split validation --num 8 --out recon.png
"""

import ml_collections

from t2i_jax import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = presets.check_variant(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "vqvae"
    c.data = presets.shapes_data(variant, image_size=64 if variant == "full" else 32)
    c.text = presets.text(variant)

    c.vqvae = ml_collections.ConfigDict()
    c.vqvae.channels = 64
    c.vqvae.channel_mults = (1, 2, 2)  # 32 -> 16 -> 8: 64 codes per image
    c.vqvae.num_res_blocks = 2
    c.vqvae.num_codes = 256
    c.vqvae.code_dim = 16
    c.vqvae.commitment = 0.25  # beta of van den Oord et al.
    c.vqvae.ema_decay = 0.99
    c.vqvae.ema_eps = 1e-5
    # A code whose EMA count of encoder outputs per step falls below this is moved onto an
    # encoder output of the batch (dead-code restart).
    c.vqvae.dead_code_threshold = 1.0
    # VQGAN's perceptual term: + weight * LPIPS-vgg(x, reconstruction). Off by default: the
    # ImageNet VGG16 file (torchvision's vgg16-397923af.pth) is not shipped (its path goes in
    # perceptual_backbone), and VGG16's forward and backward passes make a demo step 15x
    # slower on a 2-core CPU (benchmarks/RESULTS.md).
    c.vqvae.perceptual_weight = 0.0
    c.vqvae.perceptual_backbone = ""
    c.vqvae.prior_width = 256
    c.vqvae.prior_depth = 6
    c.vqvae.prior_heads = 8
    c.vqvae.prior_start = 0  # step from which the prior's loss counts
    c.vqvae.p_uncond = 0.1  # caption dropout, for classifier-free guidance
    c.vqvae.temperature = 1.0  # sampling defaults (t2i sample can override each)
    c.vqvae.top_k = 0
    c.vqvae.top_p = 1.0
    c.vqvae.guidance = 2.0

    c.optim = presets.adamw(3e-4, warmup_steps=500, ema=0.999)
    c.train = presets.train(
        variant, steps=100_000, batch_size=128, eval_every=2000, eval_batches=16
    )
    c.mesh = presets.mesh()
    c.sample = presets.samples(variant)

    if variant == "demo":
        # 2 CPU cores: most FLOPs are at 32x32, so that level is narrow (as the diffusion
        # demo's UNet).
        c.vqvae.channels = 16
        c.vqvae.channel_mults = (1, 2, 4)
        c.vqvae.num_res_blocks = 1
        c.vqvae.num_codes = 128
        c.vqvae.prior_width = 128
        c.vqvae.prior_depth = 3
        c.vqvae.prior_heads = 4
        c.optim.update(lr=1e-3, warmup_steps=100, ema=0.995)
        c.train.update(presets.demo_train())
    elif variant == "full":
        c.vqvae.channels = 128
        c.vqvae.channel_mults = (1, 2, 4)  # 64 -> 32 -> 16: 256 codes per image
        c.vqvae.num_codes = 1024
        c.vqvae.code_dim = 32
        c.vqvae.prior_width = 512
        c.vqvae.prior_depth = 8
        c.train.compute_dtype = "bfloat16"
    elif variant == "test":
        c.vqvae.channels = 8
        c.vqvae.num_res_blocks = 1
        c.vqvae.num_codes = 16
        c.vqvae.code_dim = 4
        c.vqvae.prior_width = 16
        c.vqvae.prior_depth = 1
        c.vqvae.prior_heads = 2
        c.optim.update(presets.TEST_OPTIM)
        c.train.eval_every = 3
    return c
