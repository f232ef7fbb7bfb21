"""PNG grids of samples: one column per prompt, its caption written under the column."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i_jax.errors import writing


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels (the inverse of the pipeline's scaling)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def caption_grid(
    images: np.ndarray, captions: Sequence[str], *, scale: int = 4, pad: int = 4
) -> Image.Image:
    """images: uint8 [P, N, H, W, 3] (N samples of each of P prompts)."""
    prompts, per_prompt, h, w, _ = images.shape
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, cell_w // 6)
    wrapped = [textwrap.wrap(c, chars_per_line) or [""] for c in captions]
    text_h = 12 * max(len(lines) for lines in wrapped) + pad
    width = prompts * (cell_w + pad) + pad
    height = per_prompt * (cell_h + pad) + pad + text_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for p in range(prompts):
        x = pad + p * (cell_w + pad)
        for n in range(per_prompt):
            tile = Image.fromarray(images[p, n]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (x, pad + n * (cell_h + pad)))
        y = pad + per_prompt * (cell_h + pad)
        for line in wrapped[p]:
            draw.text((x, y), line, fill=(0, 0, 0), font=font)
            y += 12
    return canvas


def save_grid(path: str, images: np.ndarray, captions: Sequence[str]) -> None:
    grid = caption_grid(images, captions)
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.png"
        grid.save(tmp)
        os.replace(tmp, path)
