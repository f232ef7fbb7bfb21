"""`t2i reconstruct`: originals next to a run's reconstructions, with PSNR, SSIM and LPIPS.

Works for any method with `reconstruct(params, batch) -> images in [-1, 1]` (the VAE
family). Examples are the first `num` of the split in file order; the metrics are those of
`t2i metrics` on the 8-bit images that the PNG shows (data range 255; SSIM with the
Gaussian 11-tap window of tf.image.ssim; LPIPS v0.1 when the backbone's file is given, as
it is not shipped), per pair and their mean.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i_jax import sharding
from t2i_jax.data import sources
from t2i_jax.data.examples import load_examples
from t2i_jax.errors import UserError
from t2i_jax.grid import to_uint8
from t2i_jax.metrics import lpips, pixel
from t2i_jax.runs.loading import load_run

BATCH = 64


def reconstruct_split(
    workdir: str, *, split: str, num: int, lpips_model: lpips.LPIPS | None = None
) -> dict:
    """{"originals", "reconstructions": uint8 [N, H, W, 3], "captions", "psnr", "ssim"
    [, "lpips"]: [N]}."""
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    run = load_run(workdir)
    config, method, state, tokenizer = run.config, run.method, run.state, run.tokenizer
    if not method.offers("reconstruct"):
        raise UserError(f"a {config.method} run has no encoder: nothing to reconstruct")
    data = config.data
    builder = sources.prepare_for_run(data)
    if split not in builder.info.splits:
        raise UserError(f"unknown split '{split}'; choose from {sorted(builder.info.splits)}")
    examples = load_examples(builder, split, num)
    recon_fn = jax.jit(method.reconstruct)
    lpips_fn = jax.jit(lpips.lpips_distance)
    outputs, lpips_values = [], []
    for start in range(0, num, BATCH):
        images = examples.images[start : start + BATCH]
        tokens, mask = tokenizer.encode(
            examples.captions[start : start + BATCH], config.text.max_len
        )
        batch = {
            "image": jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
            "tokens": tokens,
            "mask": mask,
        }
        decoded = to_uint8(sharding.to_host(recon_fn(state.ema_params, batch, run.frozen)))
        outputs.append(decoded)
        if lpips_model is not None:  # on the 8-bit images, as the grid shows them
            x, y = lpips.to_model_range(images), lpips.to_model_range(decoded)
            lpips_values.append(np.asarray(lpips_fn(lpips_model, x, y)))
    recon = np.concatenate(outputs)
    a, b = jnp.asarray(examples.images, jnp.float32), jnp.asarray(recon, jnp.float32)
    result = {
        "originals": examples.images,
        "reconstructions": recon,
        "captions": examples.captions,
        "psnr": np.asarray(pixel.psnr(a, b, data_range=255.0)),
        "ssim": np.asarray(pixel.ssim(a, b, data_range=255.0)),
    }
    if lpips_model is not None:
        result["lpips"] = np.concatenate(lpips_values)
    return result


def pairs_grid(result: dict, *, per_row: int = 4, scale: int = 4, pad: int = 6) -> Image.Image:
    """Original | reconstruction pairs, `per_row` pairs a row, PSNR and SSIM under each."""
    originals, recon = result["originals"], result["reconstructions"]
    n, h, w, _ = originals.shape
    cell_w, cell_h = w * scale, h * scale
    pair_w, text_h = 2 * cell_w + 2, 38 if "lpips" in result else 26
    rows = -(-n // per_row)
    canvas = Image.new(
        "RGB",
        (pad + per_row * (pair_w + pad), pad + rows * (cell_h + text_h + pad)),
        (255, 255, 255),
    )
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i in range(n):
        x = pad + (i % per_row) * (pair_w + pad)
        y = pad + (i // per_row) * (cell_h + text_h + pad)
        for j, image in enumerate((originals[i], recon[i])):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (x + j * (cell_w + 2), y))
        label = f"PSNR {result['psnr'][i]:.2f} dB\nSSIM {result['ssim'][i]:.3f}"
        if "lpips" in result:
            label += f"\nLPIPS {result['lpips'][i]:.4f}"
        draw.multiline_text((x, y + cell_h + 2), label, fill=(0, 0, 0), font=font, spacing=1)
    return canvas


def _finite_or_str(value: float) -> float | str:
    """JSON has no inf (PSNR of a pixel-exact reconstruction): written as "inf"."""
    return value if math.isfinite(value) else str(value)


def write_reconstructions(
    workdir: str,
    *,
    split: str,
    num: int,
    out: str,
    lpips_backbone: str | None = None,
    lpips_net: str = "alex",
) -> dict:
    """Writes the grid to `out` and the per-pair numbers to `out` with .json; returns them.

    `lpips_backbone`: torchvision's state-dict file of the `lpips_net` backbone; without it
    no LPIPS is computed.
    """
    # The backbone is read first: a wrong path fails before any work.
    model = lpips.load_lpips(lpips_net, lpips_backbone) if lpips_backbone else None
    result = reconstruct_split(workdir, split=split, num=num, lpips_model=model)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    pairs_grid(result).save(tmp)
    os.replace(tmp, out)
    summary = {
        "workdir": workdir,
        "split": split,
        "num": num,
        "psnr_mean": _finite_or_str(float(np.mean(result["psnr"], dtype=np.float64))),
        "ssim_mean": float(np.mean(result["ssim"], dtype=np.float64)),
        "psnr": [_finite_or_str(float(v)) for v in result["psnr"]],
        "ssim": [float(v) for v in result["ssim"]],
        "captions": result["captions"],
    }
    if "lpips" in result:
        summary[f"lpips_{lpips_net}_mean"] = float(np.mean(result["lpips"], dtype=np.float64))
        summary[f"lpips_{lpips_net}"] = [float(v) for v in result["lpips"]]
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary
