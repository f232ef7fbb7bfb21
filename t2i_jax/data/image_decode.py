"""Decoding one source image or caption for `t2i data import` (Pillow and numpy only, so the
import's worker processes start fast).

`decode_image` returns uint8 [S, S, 3] or the reason it was skipped: EXIF orientation is
applied; grayscale, palette, alpha (composited on white), CMYK and 16-bit images become 8-bit
RGB; the shorter side is resized to S with Pillow's antialiased bicubic filter, then the
image is cropped to S x S (centre, or an offset drawn from the image's key).
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Skip reasons, as `import_report.json` counts them.
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNREADABLE = "unreadable"
TOO_SMALL = "too_small"
TOO_LARGE = "decompression_bomb"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
NO_CAPTION = "no_caption"
NO_IMAGE = "no_image"
UNSAFE_PATH = "unsafe_path"
CROPS = ("center", "random")


def key_seed(seed: int, key: str) -> int:
    """A 64-bit seed from the import's seed and an image's key (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little")


def decode_caption(raw: str | bytes | None) -> tuple[str | None, str | None]:
    """(caption with runs of whitespace collapsed, None) or (None, skip reason)."""
    if raw is None:
        return None, NO_CAPTION
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, CAPTION_NOT_UTF8
    try:
        raw.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 in a metadata file
    except UnicodeEncodeError:
        return None, CAPTION_NOT_UTF8
    text = " ".join(raw.split())
    return (text, None) if text else (None, EMPTY_CAPTION)


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16- and 32-bit greyscale scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "I":  # 16-bit PNGs in some Pillow versions; else 8-bit levels
            top = 65535.0 if values.max(initial=0) > 255 else 255.0
        else:  # "F": floats, scaled by their maximum
            top = max(1.0, float(values.max(initial=1.0)))
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int, crop: str, seed: int) -> np.ndarray:
    """Shorter side to `size` (antialiased bicubic), then a size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    if crop == "center":
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        rng = np.random.default_rng(seed)
        left, top = int(rng.integers(new_w - size + 1)), int(rng.integers(new_h - size + 1))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W, 1], [H, W]) -> [size, size, 3]: `resize_and_crop` with a
    centre crop; an RGB image already size x size is returned as is."""
    image = np.asarray(image, np.uint8)
    if image.shape == (size, size, 3):
        return image
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return resize_and_crop(Image.fromarray(image).convert("RGB"), size, "center", seed=0)


def decode_image(
    data: bytes, *, size: int, crop: str, seed: int, min_size: int
) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [size, size, 3], None) or (None, skip reason) for the bytes of one file."""
    with warnings.catch_warnings():
        # Between 1x and 2x Pillow's pixel limit Pillow only warns; both are bombs here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                if min(image.size) < min_size:
                    return None, TOO_SMALL
                return resize_and_crop(_to_rgb8(image), size, crop, seed), None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return None, TOO_LARGE
        except UnidentifiedImageError:
            return None, NOT_AN_IMAGE
        except OSError as e:
            return None, TRUNCATED if "truncated" in str(e).lower() else UNREADABLE
        except (SyntaxError, ValueError, EOFError, IndexError, TypeError):
            return None, UNREADABLE  # what Pillow's plugins raise on malformed files
