"""The model families side by side: each one's demo on `t2i_shapes`, same data, same
evaluation. Run it over seeds, so the table gives each measure as mean ± std:

  t2i ablate --sweep experiments/sweeps/families.py --workdir runs/families --eval \
      --seeds 0,1,2

Latent diffusion trains on the latents of the sweep's own text-free VAE (`ldm_vae`, the
same seed); that VAE is a stage, not a text-to-image model, so its alignment row reads
chance. Each demo keeps its own steps, batch and text encoder (the ones its experiment
chose for a 2-core CPU); `--config.KEY=VALUE` still applies to every run. The runs share
one process, hence its CPU devices: every demo takes the diffusion demo's two.
"""

import os

from t2i_jax import config as config_lib
from t2i_jax import sharding

EXPERIMENTS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def get_sweep(arg: str | None = None) -> dict:
    variant = arg or "demo"
    base = lambda name: f"{os.path.join(EXPERIMENTS, name)}:{variant}"  # noqa: E731
    sweep = {
        "runs": {
            "diffusion": {"base": base("diffusion_shapes.py")},
            "ldm_vae": {
                "base": base("vae_shapes.py"),
                "vae.conditional": False,
                "vae.prior": "standard",
            },
            "ldm": {"base": base("ldm_shapes.py"), "ldm.autoencoder": "{run:ldm_vae}"},
            "gan_dfgan": {"base": base("gan_shapes.py")},
            "gan_stylegan2": {
                "base": base("gan_shapes.py"),
                "gan.network": "stylegan2",
                "gan.conditioning": "projection",
            },
            "vae": {"base": base("vae_shapes.py")},
            "vqvae": {"base": base("vqvae_shapes.py")},
        }
    }
    diffusion = config_lib.load_config(sweep["runs"]["diffusion"]["base"])
    split = {"mesh.cpu_devices": sharding.mesh_config(diffusion).cpu_devices}
    sweep["runs"] = {name: {**keys, **split} for name, keys in sweep["runs"].items()}
    return sweep
