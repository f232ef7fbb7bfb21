"""What the pixel demo's alignment is waiting for (its targets: README, "What the demo shows").

Each run changes one thing of the demo as it was before `bert_sincos` (`bert`: schedule
shift 4, the frozen all-MiniLM-L6-v2 text encoder, no position embedding); `bert_sincos`
made the sin-cos embedding the demo's default, so `demo` equals it now:

  demo          the demo as it is
  transformer   the demo before this sweep: a 2-layer transformer learned from scratch with
                the UNet (the positions sweep's `shift_4`)
  bert          `text.encoder=bert`, the run that made the frozen, pretrained
                all-MiniLM-L6-v2 the demo's encoder (features cached: a step encodes only
                the empty caption)
  shift_2       SNR / 4 instead of / 16: more of training at the high SNR that draws
                shapes and cleans the background, less at the low SNR that places objects
  min_snr_5     Min-SNR-5 loss weighting (Hang et al.: faster convergence)
  bert_cross32  cross-attention at 32x32 too: each pixel of the full-resolution level reads
                the caption, for two-object scenes whose objects take one colour (bert:
                one-object colour 1.0, two-object 0.65)
  bert_attn16   self-attention at 16x16 too: the two objects see each other at the
                resolution where they are drawn
  no_pooled     the pooled caption vector left out of the UNet's ResBlock embedding: it
                reaches every pixel alike, so it names the caption's colours without
                binding them to objects; the caption then arrives through cross-attention
                only, read per pixel
  bert_sincos   a fixed 2-D sin-cos embedding added to the image tokens of every attention
                layer (cross-attention's queries): for "X above Y" a query must know it
                is in the upper object to read X's words rather than Y's (on the
                unshifted demo it did not help position);
                two-object colour 0.65 -> 0.91: the demo's default since
  bert_coords   the pixel's row and column as two more input channels (CoordConv): place
                known to every layer, not only to attention
  bert_heads1   one attention head instead of four: 32 and 64 dimensions a head at 16x16
                and 8x8 instead of 8 and 16, to tell one object's words from the other's

  t2i ablate --sweep experiments/sweeps/demo_targets.py --workdir runs/demo_targets --eval
  t2i ablate --sweep experiments/sweeps/demo_targets.py --workdir runs/demo_targets --eval \
      --runs bert,shift_2
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "diffusion_shapes.py")

# The demo before `bert_sincos` made the sin-cos embedding its default: the runs measured
# against it keep its layout, so that they stay what was run.
BERT = {"text.encoder": "bert", "model.position_embedding": "none"}
RUNS = {
    "demo": {},
    "transformer": {**BERT, "text.encoder": "transformer"},
    "shift_2": {"diffusion.schedule_shift": 2.0},
    "bert": {**BERT},
    "min_snr_5": {"diffusion.min_snr_gamma": 5.0},
    "bert_cross32": {**BERT, "model.cross_attention_resolutions": (32, 16, 8)},
    "bert_attn16": {**BERT, "model.attention_resolutions": (16, 8)},
    "no_pooled": {**BERT, "model.pooled_text": False},
    "bert_sincos": {**BERT, "model.position_embedding": "sincos"},
    "bert_coords": {**BERT, "model.coord_channels": True},
    "bert_heads1": {**BERT, "model.num_heads": 1},
}


def get_sweep(arg: str | None = None) -> dict:
    return {"base": f"{os.path.normpath(BASE)}:{arg or 'demo'}", "runs": RUNS}
