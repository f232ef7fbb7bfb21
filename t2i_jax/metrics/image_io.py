"""Reading the images a metric command compares: a folder of images or a single file.

Like pytorch-fid: a folder's files with a lower-case image extension, sorted by name, each
converted to RGB. Unreadable files and mixed sizes are the user's error, named with the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from t2i_jax.errors import DataError

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_images(path: str) -> list[str]:
    """The image files of a folder (sorted), or [path] for a single image file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"no such image file or folder: {path}")
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        # Case-sensitive, as pytorch-fid's glob: the same folder gives the same file list.
        if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return files


# 16-bit and float images: converting them to 8-bit RGB would clip them silently.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3]; 8-bit images only (palette, grey and alpha become RGB)."""
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_MODES:
                raise DataError(
                    f"{path} is a {image.mode} (16-bit or float) image; metrics read 8-bit images"
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError:
        raise DataError(
            f"cannot read image {path}: its header claims more than Pillow's limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_images(paths: Sequence[str]) -> np.ndarray:
    """uint8 [N, H, W, 3]; every image must have the first one's size."""
    images = [read_image(p) for p in paths]
    for path, image in zip(paths, images, strict=True):
        if image.shape != images[0].shape:
            raise DataError(
                f"images differ in size: {paths[0]} is {images[0].shape[1]}x"
                f"{images[0].shape[0]}, {path} is {image.shape[1]}x{image.shape[0]}"
            )
    return np.stack(images)


def image_batches(paths: Sequence[str], batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of at most batch_size images, in order."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, len(paths), batch_size):
        yield read_images(paths[start : start + batch_size])


def paired_images(path_a: str, path_b: str) -> tuple[list[str], list[str]]:
    """Two equally long lists of files to compare pairwise (folders matched by sorted order)."""
    a, b = list_images(path_a), list_images(path_b)
    if len(a) != len(b):
        raise DataError(f"{path_a} has {len(a)} images but {path_b} has {len(b)}")
    return a, b
