"""Text-encoder ablation: the demo diffusion once per text encoder, nothing else changed.

Every run shares the data, the seed, the UNet and the training schedule; only
`text.encoder` differs (bert is all-MiniLM-L6-v2, frozen, its features cached).

  t2i ablate --sweep experiments/sweeps/text_encoders.py --workdir runs/text_encoders --eval
  t2i ablate --sweep experiments/sweeps/text_encoders.py:full --workdir runs/te_full --eval
  # a quicker look on a CPU: --config.train.steps=500

Writes `<workdir>/<encoder>/` (one run each) and `<workdir>/results.md` / `results.json`.
"""

import os

from t2i_jax.eval.ablate import one_key_sweep

ENCODERS = ("transformer", "causal", "bow", "tfidf", "embedding", "bert")
BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "diffusion_shapes.py")


def get_sweep(arg: str | None = None) -> dict:
    return one_key_sweep(BASE, arg or "demo", "text.encoder", ENCODERS)
