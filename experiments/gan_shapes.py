"""Text-conditional GAN on the built-in `t2i_shapes` scenes (DF-GAN by default).

Variants (`--config experiments/gan_shapes.py:VARIANT`):
  demo  a 2-core CPU in minutes
  full  one 80 GB accelerator: 64x64 scenes, wider networks, bfloat16
  test  a few seconds per step, for the test suite

  t2i train --config experiments/gan_shapes.py:demo --workdir runs/gan
  t2i train --config experiments/gan_shapes.py:demo --workdir runs/gan_style \
      --config.gan.network=stylegan2 --config.gan.conditioning=projection
  t2i sample --workdir runs/gan_style --prompt "a large red circle in the center" \
      --truncation 0.7 --out red.png
  t2i train --config experiments/gan_shapes.py:demo --workdir runs/biggan \
      --config.gan.network=biggan
  t2i ablate --sweep experiments/sweeps/gan_objectives.py --workdir runs/gan_objectives
"""

import ml_collections

from t2i_jax import presets

PROMPTS = presets.SHAPES_PROMPTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = presets.check_variant(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "gan"
    c.data = presets.shapes_data(variant, image_size=64 if variant == "full" else 32)
    c.text = presets.text(variant)
    # The GAN's text encoder learns only through G's adversarial gradient, so it needs
    # features that tell captions apart from step 0 (DF-GAN uses a pretrained, frozen one).
    # A from-scratch transformer gave D too little to match on: after 3,000 demo steps the
    # grid's colours ignored the prompts; bag-of-words followed colour and position by
    # step 1,000. `--config.text.encoder=bert` is the pretrained, frozen choice.
    c.text.encoder = "bow"

    c.gan = ml_collections.ConfigDict()
    c.gan.network = "dfgan"  # dfgan | stylegan2 | biggan (t2i_jax/nets/gan_networks.py)
    c.gan.objective = "hinge"  # minimax | non_saturating | hinge
    c.gan.conditioning = "concat"  # concat (DF-GAN) | projection (Miyato & Koyama)
    c.gan.matching_aware = True  # real image + mismatched caption counts as fake
    c.gan.ma_gp_weight = 2.0  # DF-GAN's MA-GP weight k (0: off)
    c.gan.ma_gp_power = 6.0  # and its power p
    c.gan.r1_gamma = 0.0  # R1 weight gamma (0: off); StyleGAN2 uses ~0.01-10
    c.gan.r1_every = 4  # lazy R1: every k steps, scaled by k
    c.gan.n_critic = 1  # discriminator updates per generator update
    c.gan.z_dim = 64
    c.gan.channels = 32  # width at the image resolution
    c.gan.g_channel_mults = (4, 4, 2, 1)  # 4x4 ... 32x32
    c.gan.d_channel_mults = (1, 2, 4, 4)  # 32x32 ... 4x4
    c.gan.cond_hidden = 128  # dfgan: hidden width of the affine MLPs
    c.gan.w_dim = 128  # stylegan2: mapping network width
    c.gan.mapping_layers = 4
    c.gan.truncation = 1.0  # stylegan2 sampling psi (1: none)
    c.gan.attention_resolution = 16  # biggan: self-attention at this side (0: none)
    c.gan.ortho_reg = 0.0  # G's orthogonal regularisation beta (BigGAN: 1e-4; 0: off)
    c.gan.z_truncation = 0.0  # sampling: z within +-this, by resampling (BigGAN; 0: off)
    c.gan.standing_stats = 0  # biggan sampling: BN statistics from N batches (0: running)
    c.gan.augment = ""  # DiffAugment policy, e.g. "translation,color,cutout" ("": off)

    # TTUR (Heusel et al.): D learns faster than G; Adam(0, 0.9) as DF-GAN.
    c.optim = presets.adamw(1e-4, warmup_steps=0, b1=0.0, b2=0.9, ema=0.999)  # generator
    c.optim_d = presets.adamw(4e-4, warmup_steps=0, b1=0.0, b2=0.9)  # discriminator
    for o in (c.optim, c.optim_d):
        o.schedule = "constant"
        o.grad_clip = 1e9  # no clipping (GANs rely on the penalties)
    c.train = presets.train(variant, steps=200_000, batch_size=64, log_every=100)
    c.mesh = presets.mesh()
    c.sample = presets.samples(variant)

    if variant == "demo":
        c.gan.channels = 16
        c.train.update(presets.demo_train())
        c.optim.lr = 2e-4
        c.optim_d.lr = 4e-4
        c.optim.ema = 0.995
    elif variant == "full":
        c.gan.channels = 64
        c.gan.g_channel_mults = (8, 8, 4, 2, 1)  # 4x4 ... 64x64
        c.gan.d_channel_mults = (1, 2, 4, 8, 8)  # 64x64 ... 4x4
        c.gan.z_dim = 128
        c.gan.cond_hidden = 256
        c.gan.w_dim = 256
        c.gan.mapping_layers = 8
        c.train.compute_dtype = "bfloat16"
    elif variant == "test":
        c.gan.channels = 8
        c.gan.z_dim = 16
        c.gan.cond_hidden = 16
        c.gan.w_dim = 16
        c.gan.mapping_layers = 2
        c.train.log_every = 2
    return c
