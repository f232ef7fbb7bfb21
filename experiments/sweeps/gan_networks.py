"""GAN network ablation: DF-GAN, StyleGAN2-style and BigGAN on the same data, text encoder,
objective and steps (the GAN demo's), each with DiffAugment off and on.

  t2i ablate --sweep experiments/sweeps/gan_networks.py --workdir runs/gan_networks --eval
  t2i ablate --sweep experiments/sweeps/gan_networks.py --workdir runs/gan_networks --eval \
      --runs biggan,biggan_diffaug   # a subset; the same command resumes

StyleGAN2 reads the text by projection (its README command); DF-GAN by concatenation and
BigGAN by its own projection head. DiffAugment is the paper's "translation,color,cutout".
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gan_shapes.py")

DIFFAUGMENT = {"gan.augment": "translation,color,cutout"}
NETWORKS = {
    "dfgan": {"gan.network": "dfgan"},
    "stylegan2": {"gan.network": "stylegan2", "gan.conditioning": "projection"},
    "biggan": {"gan.network": "biggan"},
}
RUNS = {}
for _name, _keys in NETWORKS.items():
    RUNS[_name] = _keys
    RUNS[f"{_name}_diffaug"] = {**_keys, **DIFFAUGMENT}


def get_sweep(arg: str | None = None) -> dict:
    return {"base": f"{os.path.normpath(BASE)}:{arg or 'demo'}", "runs": RUNS}
