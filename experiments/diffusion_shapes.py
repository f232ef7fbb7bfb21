"""Text-conditional diffusion on the built-in `t2i_shapes` scenes.

Variants (`--config experiments/diffusion_shapes.py:VARIANT`):
  demo  a 2-core CPU in minutes (the `make demo` run)
  full  one 80 GB accelerator: 64x64 scenes, a wider four-level UNet, bfloat16
  test  a few seconds per step, for the test suite

  t2i train --config experiments/diffusion_shapes.py:demo --workdir runs/demo
  t2i sample --workdir runs/demo --prompt "a large red circle in the center" --num 4 \
      --seed 0 --out red_circle.png
"""

import ml_collections

from t2i_jax import presets
from t2i_jax.methods import samplers

PROMPTS = presets.SHAPES_PROMPTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = presets.check_variant(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "diffusion"
    c.data = presets.shapes_data(variant, image_size=64 if variant == "full" else 32)
    c.text = presets.text(variant)

    c.model = ml_collections.ConfigDict()  # UNet fields (t2i_jax/nets/unet.py).
    c.model.base_channels = 64
    c.model.channel_mults = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (8,)
    c.model.cross_attention_resolutions = (16, 8)
    c.model.num_heads = 4
    c.model.dropout = 0.0
    c.model.position_embedding = "none"  # none | sincos | learned, at attention layers
    c.model.coord_channels = False  # row and column as two more input channels
    c.model.pooled_text = True  # pooled caption into every ResBlock (False: cross-attn only)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.timesteps = 1000
    c.diffusion.schedule = "cosine"  # cosine | linear
    c.diffusion.schedule_shift = 1.0  # every step's SNR / shift^2 (schedules.shift_snr)
    c.diffusion.prediction = "v"  # v | eps (v stays well-conditioned at high noise)
    c.diffusion.p_uncond = 0.1  # caption dropout for classifier-free guidance
    c.diffusion.sampler = "ddim"  # ddim | ddpm | euler | heun | dpmpp_2m (methods/samplers.py)
    c.diffusion.sample_steps = 50
    c.diffusion.eta = 0.0
    # Euler and Heun start at Karras et al.'s sigma 80, not at the schedule's last step's
    # (8e4 at shift 4), where most of a few-step budget would go (methods/samplers.py).
    c.diffusion.sigma_max = samplers.EDM_SIGMA_MAX
    c.diffusion.guidance = 3.0
    c.diffusion.clip_denoised = True
    # Training options, all off (0 / False) by default (methods/diffusion.py, schedules.py):
    c.diffusion.min_snr_gamma = 0.0  # Min-SNR-gamma loss weighting (Hang et al.: 5)
    c.diffusion.offset_noise = 0.0  # per-image, per-channel noise offset (e.g. 0.1)
    c.diffusion.input_perturbation = 0.0  # input-only extra noise (Ning et al.: 0.1)
    c.diffusion.zero_terminal_snr = False  # rescale the schedule to SNR 0 at T (needs v)

    c.optim = presets.adamw(3e-4, warmup_steps=200)
    c.train = presets.train(variant)
    c.mesh = presets.mesh()
    c.sample = presets.samples(variant)

    if variant == "demo":
        # Sized for 2 CPU cores (~0.25 s a step): most FLOPs are at 32x32, so that level
        # is narrow and the width grows at 16x16 and 8x8.
        c.model.base_channels = 16
        c.model.channel_mults = (1, 2, 4)
        c.model.num_res_blocks = 1
        c.train.update(
            steps=2500,  # ~11 min of training on 2 cores; make demo < 20 min
            batch_size=32,
            log_every=25,
            checkpoint_every=500,
            sample_every=1000,
            # Alignment against minutes in the report (eval/training_probe.py): 256
            # validation captions, 10 DDIM steps, every 500 steps (~10 s each).
            eval_every=500,
            probe_num=256,
        )
        c.optim.update(lr=1e-3, warmup_steps=100, ema=0.995)
        # SNR / 16: the 32x32 image at the SNR that latent diffusion's 8x8 latents see.
        # With the unshifted cosine schedule the coarse layout survives the noise, the
        # sample's place follows its starting noise and positions came out at chance
        # (0.10); shifted, 0.94 (experiments/sweeps/positions.py, README).
        c.diffusion.schedule_shift = 4.0
        # The frozen, pretrained all-MiniLM-L6-v2 (features cached; a step encodes only the
        # empty caption of caption dropout) instead of a transformer learned from scratch:
        # whole caption 0.45 -> 0.64,
        # R-precision 0.76 -> 0.86 (experiments/sweeps/demo_targets.py, README).
        c.text.encoder = "bert"
        # A fixed 2-D sin-cos embedding added to the image tokens of every attention layer
        # (cross-attention's queries): for "X above Y" a pixel must know it is in the
        # upper object to read X's words, not Y's.
        # Two-object colour 0.65 -> 0.91, whole caption 0.64 -> 0.82
        # (experiments/sweeps/demo_targets.py `bert_sincos`, README).
        c.model.position_embedding = "sincos"
        # Two data-parallel CPU devices, 16 images each: 0.33-0.35 s a step against 0.41-0.57
        # on one device (benchmarks/RESULTS.md); GPU and TPU runs ignore the key.
        c.mesh.cpu_devices = 2
    elif variant == "full":
        # 64 -> 32 -> 16 -> 8; self-attention at 16 and 8, cross-attention at 32 too.
        c.model.base_channels = 128
        c.model.channel_mults = (1, 2, 3, 4)
        c.model.attention_resolutions = (16, 8)
        c.model.cross_attention_resolutions = (32, 16, 8)
        c.model.num_heads = 8
        c.train.compute_dtype = "bfloat16"
        # Unshifted, as trained so far; by the demo's argument 64x64 would want 8 (untested).
    elif variant == "test":
        c.model.base_channels = 16
        c.model.channel_mults = (1, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (16,)
        c.model.cross_attention_resolutions = (16,)
        c.model.num_heads = 2
        c.optim.update(presets.TEST_OPTIM)
        c.diffusion.sample_steps = 4
    return c
