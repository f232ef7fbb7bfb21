"""Latent diffusion on the built-in `t2i_shapes` scenes: the diffusion experiment's method,
text encoder, schedule and sampler over the 8x8x4 latents of a trained, frozen VAE.

First train the autoencoder (a text-free VAE), then the diffusion model on its latents:

  t2i train --config experiments/vae_shapes.py:demo --workdir runs/ldm_vae \
      --config.vae.conditional=False --config.vae.prior=standard
  t2i train --config experiments/ldm_shapes.py:demo --workdir runs/ldm
  t2i sample --workdir runs/ldm --prompt "a large red circle in the center" --out red.png

`ldm.autoencoder` names the VAE's workdir (default runs/ldm_vae); a missing or unsuitable
one stops the run before it starts. Variants as experiments/diffusion_shapes.py; `full` is
256x256 scenes over the 32x32x4 latents of `experiments/vae_shapes.py:full` (f=8):

  t2i train --config experiments/vae_shapes.py:full --workdir runs/ldm_vae_full \
      --config.vae.conditional=False --config.vae.prior=standard
  t2i train --config experiments/ldm_shapes.py:full --workdir runs/ldm_full
"""

import os

import ml_collections

from t2i_jax import config as config_lib
from t2i_jax import presets

DIFFUSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusion_shapes.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_lib.load_config(f"{DIFFUSION}:{arg or 'demo'}")
    c.method = "ldm"
    c.ldm = ml_collections.ConfigDict()
    c.ldm.autoencoder = "runs/ldm_vae"  # workdir of a vae run with vae.conditional=False
    # z = scale * E[q(z|x)], scaled to about unit variance as Rombach et al. do: the demo
    # VAE's posterior means have std 0.636 over 512 validation images (all 4 channels).
    c.ldm.latent_scale = 1.5
    c.diffusion.clip_denoised = False  # latents are not bounded like pixels
    c.diffusion.schedule_shift = 1.0  # the 8x8 latents are the pixel demo's reference SNR
    # The UNet sees 8x8 latents: two levels (8, 4), attention at both.
    c.model.channel_mults = (1, 2)
    c.model.attention_resolutions = (8, 4)
    c.model.cross_attention_resolutions = (8, 4)
    if arg == "test":
        c.model.attention_resolutions = (4,)
        c.model.cross_attention_resolutions = (8,)
    elif (arg or "demo") == "demo":
        c.model.base_channels = 64  # at 8x8 the width is cheap
        c.model.num_res_blocks = 2
    elif arg == "full":
        c.data = presets.shapes_data("full", image_size=256)
        c.ldm.autoencoder = "runs/ldm_vae_full"
        # Measure again for a new VAE: 1 / std of its posterior means (see above).
        c.ldm.latent_scale = 1.5
        # 32 -> 16 -> 8 latents, as Stable Diffusion's UNet at a quarter of its latent side.
        c.model.base_channels = 192
        c.model.channel_mults = (1, 2, 4)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (16, 8)
        c.model.cross_attention_resolutions = (32, 16, 8)
    return c
