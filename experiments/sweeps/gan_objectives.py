"""GAN objective ablation: the demo GAN once per objective, nothing else changed.

  t2i ablate --sweep experiments/sweeps/gan_objectives.py --workdir runs/gan_objectives --eval
  t2i ablate --sweep experiments/sweeps/gan_objectives.py:full --workdir runs/gan_obj_full

The minimax generator loss log(1 - D(G(z))) saturates when D is confident; the
non-saturating -log D(G(z)) and hinge losses are the practical variants.
"""

import os

from t2i_jax.eval.ablate import one_key_sweep

OBJECTIVES = ("minimax", "non_saturating", "hinge")
BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gan_shapes.py")


def get_sweep(arg: str | None = None) -> dict:
    return one_key_sweep(BASE, arg or "demo", "gan.objective", OBJECTIVES)
