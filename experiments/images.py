"""Any family on your own captioned images, imported with `t2i data import`.

  t2i data import ~/my_photos --name my_photos --format folder --image-size 32
  t2i train --config experiments/images.py:diffusion --config.data.name=my_photos \
      --workdir runs/my_photos
  t2i eval --workdir runs/my_photos

The argument is FAMILY or FAMILY-VARIANT. FAMILY: diffusion | gan | vae | vqvae | ldm_vae |
ldm, each with the networks, text encoder, optimiser and sampler of its `*_shapes.py`
experiment; `ldm_vae` is the text-free VAE that `ldm` diffuses over (`ldm.autoencoder`,
default runs/images_ldm_vae). VARIANT:
  demo  (default) 32x32 images, a 2-core CPU in minutes: import with --image-size 32
  full  one 80 GB accelerator, bfloat16: 64x64 for diffusion, gan and vqvae; 256x256 for
        vae, ldm_vae and ldm (32x32x4 latents): import at that size
  test  32x32, tiny networks, for the test suite

The data's image size must be the variant's (the run stops with one line if not). The grid
prompts are the first validation captions; `--config.data.random_flip=True` mirrors half the
training images (wrong for captions that name left and right).
"""

import os

import ml_collections

from t2i_jax import config as config_lib
from t2i_jax import presets

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = {
    "diffusion": "diffusion_shapes.py",
    "gan": "gan_shapes.py",
    "vae": "vae_shapes.py",
    "vqvae": "vqvae_shapes.py",
    "ldm_vae": "vae_shapes.py",
    "ldm": "ldm_shapes.py",
}
DEFAULT_NAME = "images"  # --config.data.name=NAME picks the imported data set


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    family, _, variant = (arg or "diffusion").partition("-")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose {', '.join(FAMILIES)}")
    variant = presets.check_variant(variant or "demo")
    c = config_lib.load_config(f"{os.path.join(HERE, FAMILIES[family])}:{variant}")
    c.data = presets.imported_data(DEFAULT_NAME, c.data.image_size)
    # Real captions have more words than t2i_shapes' 25: SentencePiece stops at what the
    # training captions support when they have fewer pieces.
    c.text.vocab_size = 128 if variant == "test" else 1024
    c.text.max_len = max(c.text.max_len, 32) if variant != "test" else c.text.max_len
    c.sample.prompts = ()  # the first validation captions
    if family == "ldm_vae":
        c.vae.conditional = False
        c.vae.prior = "standard"
    if family == "ldm":
        suffix = "" if variant == "demo" else f"_{variant}"
        c.ldm.autoencoder = f"runs/images_ldm_vae{suffix}"
    return c
