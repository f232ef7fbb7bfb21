"""Text-conditional VAE on the built-in `t2i_shapes` scenes (ELBO, discretised logistic).

Variants (`--config experiments/vae_shapes.py:VARIANT`):
  demo  a 2-core CPU in minutes
  full  one 80 GB accelerator: 256x256 scenes, f=8 (32x32x4 latents, latent diffusion's
        autoencoder at full size), bfloat16
  test  a few seconds per step, for the test suite

  t2i train --config experiments/vae_shapes.py:demo --workdir runs/vae
  t2i sample --workdir runs/vae --prompt "a large red circle in the center" --out red.png \
      [--temperature 0.7]
  t2i reconstruct --workdir runs/vae --split validation --num 8 --out recon.png
  t2i train --config experiments/vae_shapes.py:demo --workdir runs/vae_mse \
      --config.vae.likelihood=gaussian --config.vae.prior=standard

Validation bits/dim, the ELBO's terms and the active latent units are logged every
`train.eval_every` steps (`val_*` in metrics.jsonl) and plotted in the report.
"""

import ml_collections

from t2i_jax import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = presets.check_variant(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "vae"
    c.data = presets.shapes_data(variant, image_size=256 if variant == "full" else 32)
    c.text = presets.text(variant)

    c.vae = ml_collections.ConfigDict()
    c.vae.channels = 64
    c.vae.channel_mults = (1, 2, 2)  # 32 -> 16 -> 8: an 8x8 latent grid
    c.vae.num_res_blocks = 2
    c.vae.latent_channels = 4
    c.vae.likelihood = "logistic"  # logistic (bits/dim) | gaussian (fixed sigma, nats)
    c.vae.gaussian_sigma = 0.1
    c.vae.conditional = True  # encoder and decoder read the caption (False: for LDM)
    c.vae.prior = "learned"  # learned p(z | text) | standard N(0, I)
    c.vae.prior_hidden = 256
    c.vae.beta = 1.0
    c.vae.kl_warmup_steps = 1000  # beta ramps from 0 (avoids early posterior collapse)
    c.vae.free_bits = 0.0  # nats per latent dimension (0: off)
    c.vae.sample_temperature = 1.0

    c.optim = presets.adamw(5e-4, warmup_steps=200, ema=0.999)
    c.train = presets.train(
        variant, steps=100_000, batch_size=128, eval_every=2000, eval_batches=16
    )
    c.mesh = presets.mesh()
    c.sample = presets.samples(variant)

    if variant == "demo":
        # 2 CPU cores: most FLOPs are at 32x32, so that level is narrow (as the diffusion
        # demo's UNet).
        c.vae.channels = 16
        c.vae.channel_mults = (1, 2, 4)
        c.vae.num_res_blocks = 1
        c.optim.ema = 0.995
        c.train.update(presets.demo_train())
    elif variant == "full":
        # 256 -> 128 -> 64 -> 32, Stable Diffusion's f=8 autoencoder at half its width.
        c.vae.channels = 64
        c.vae.channel_mults = (1, 2, 4, 4)
        c.train.update(batch_size=32, compute_dtype="bfloat16")
    elif variant == "test":
        c.vae.channels = 8
        c.vae.num_res_blocks = 1
        c.vae.prior_hidden = 16
        c.vae.kl_warmup_steps = 4
        c.optim.update(presets.TEST_OPTIM)
        c.train.eval_every = 3
    return c
