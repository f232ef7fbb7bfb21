"""Text-conditional diffusion on `digits`: 1,797 real handwritten digits, captioned.

The diffusion experiment (experiments/diffusion_shapes.py: UNet, schedule, sampler,
guidance, text encoder) on the built-in `digits` set (t2i_jax/data/digits_builder.py).
Variants as that file; `demo` trains in minutes on a 2-core CPU:

  t2i train --config experiments/diffusion_digits.py:demo --workdir runs/digits
  t2i sample --workdir runs/digits --prompt "a handwritten seven" --num 8 --out seven.png
"""

import os

import ml_collections

from t2i_jax import config as config_lib
from t2i_jax import presets

DIFFUSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusion_shapes.py")
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten {name}" for name in NAMES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = presets.check_variant(arg)
    # The full variant stays at the data's 32x32 (the UNet of diffusion_shapes.py:full is
    # for 64x64): the demo's network, wider.
    c = config_lib.load_config(f"{DIFFUSION}:{'demo' if variant == 'full' else variant}")
    c.data = presets.digits_data()
    c.sample.prompts = PROMPTS if variant != "test" else PROMPTS[:2]
    # The README's digits figures are of the unshifted schedule; the shapes demo's shift
    # (a position fix) is untested on digits, which are centred.
    c.diffusion.schedule_shift = 1.0
    if variant == "demo":
        # 1,439 training digits: 2,500 steps of 32 are 56 epochs.
        c.train.update(steps=2500, sample_every=500)
    elif variant == "full":
        c.model.base_channels = 64
        c.model.num_res_blocks = 2
        c.train.update(steps=50_000, batch_size=128, checkpoint_every=2000, sample_every=5000)
        c.train.compute_dtype = "bfloat16"
    return c
