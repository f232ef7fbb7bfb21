"""Position ablation: how the demo diffusion UNet learns where to put an object.

Convolutions are translation-equivariant and attention without a position embedding is
permutation-equivariant, so the UNet can tell where a pixel is only from its convolutions'
zero padding. Each run adds one way of telling it (nets/unet.py), nothing else changed:

  none          the demo as it was: the unshifted cosine schedule (and, in every run, the
                transformer text encoder and no position embedding, as the demo had then)
  sincos        fixed 2-D sin-cos embedding added to the tokens of every attention layer
  shift_4       the noise schedule's SNR / 16: a 32x32 image at the SNR the 8x8 latents of
                latent diffusion (which follows positions) see (schedules.shift_snr); the
                one that worked (position 0.10 -> 0.94), the demo's default since
  coords        the pixel's row and column as two more input channels (CoordConv)
  learned       a learned embedding per attention layer
  cross_8_only  cross-attention at 8x8 only (the demo also has it at 16x16)

  t2i ablate --sweep experiments/sweeps/positions.py --workdir runs/positions --eval
  t2i ablate --sweep experiments/sweeps/positions.py --workdir runs/positions --eval \
      --seeds 0,1,2

Guidance, the fourth knob, needs no training: `t2i eval --guidance G --out-dir ...` on a run.
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "diffusion_shapes.py")

# The demo as this sweep found it: the transformer text encoder, no position embedding
# (the demo's choices since: experiments/sweeps/demo_targets.py), and every run but
# shift_4 on the unshifted schedule, the demo's before this sweep chose 4.
BEFORE = {"text.encoder": "transformer", "model.position_embedding": "none"}
UNSHIFTED = {**BEFORE, "diffusion.schedule_shift": 1.0}
RUNS = {
    "none": {**UNSHIFTED},
    "sincos": {**UNSHIFTED, "model.position_embedding": "sincos"},
    "shift_4": {**BEFORE, "diffusion.schedule_shift": 4.0},
    "coords": {**UNSHIFTED, "model.coord_channels": True},
    "learned": {**UNSHIFTED, "model.position_embedding": "learned"},
    "cross_8_only": {**UNSHIFTED, "model.cross_attention_resolutions": (8,)},
}


def get_sweep(arg: str | None = None) -> dict:
    return {"base": f"{os.path.normpath(BASE)}:{arg or 'demo'}", "runs": RUNS}
