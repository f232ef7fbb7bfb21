"""What the pixel demo's alignment is waiting for (its targets: README, "Diffusion demo").

Each run changes one thing of the demo (`diffusion_shapes.py:demo`, schedule shift 4):

  demo          the demo as it is (the positions sweep's `shift_4`)
  shift_2       SNR / 4 instead of / 16: more of training at the high SNR that draws
                shapes and cleans the background, less at the low SNR that places objects
  bert          the frozen, pretrained all-MiniLM-L6-v2 (features cached: no cost a step)
                instead of a transformer learned from scratch with the UNet
  min_snr_5     Min-SNR-5 loss weighting (Hang et al.: faster convergence)

  t2i ablate --sweep experiments/sweeps/demo_targets.py --workdir runs/demo_targets --eval
  t2i ablate --sweep experiments/sweeps/demo_targets.py --workdir runs/demo_targets --eval \
      --runs bert,shift_2
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "diffusion_shapes.py")

RUNS = {
    "demo": {},
    "shift_2": {"diffusion.schedule_shift": 2.0},
    "bert": {"text.encoder": "bert"},
    "min_snr_5": {"diffusion.min_snr_gamma": 5.0},
}


def get_sweep(arg: str | None = None) -> dict:
    return {"base": f"{os.path.normpath(BASE)}:{arg or 'demo'}", "runs": RUNS}
