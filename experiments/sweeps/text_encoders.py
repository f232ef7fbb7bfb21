"""Text-encoder ablation: the demo diffusion once per text encoder, nothing else changed.

Every run shares the data, the seed, the UNet and the training schedule; only
`text.encoder` differs (bert is all-MiniLM-L6-v2, frozen, its features cached).

  t2i ablate --sweep experiments/sweeps/text_encoders.py --workdir runs/text_encoders --eval
  t2i ablate --sweep experiments/sweeps/text_encoders.py --workdir runs/text_encoders \
      --eval --seeds 0,1,2   # mean ± std over 3 seeds: is a gap bigger than the spread?
  t2i ablate --sweep experiments/sweeps/text_encoders.py:full --workdir runs/te_full --eval
  # a quicker look on a CPU: --config.train.steps=500

Writes `<workdir>/<encoder>/` (one run each; with seeds `<encoder>/seed_<k>/`) and
`<workdir>/results.md` / `results.json` / `results.png`. Each run trains the demo's 2,500
steps: at 150 every accuracy was near zero and the sweep told no encoder from another.
"""

import os

from t2i_jax.eval.ablate import one_key_sweep

ENCODERS = ("transformer", "causal", "bow", "tfidf", "embedding", "bert")
BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "diffusion_shapes.py")


def get_sweep(arg: str | None = None) -> dict:
    return one_key_sweep(BASE, arg or "demo", "text.encoder", ENCODERS)
