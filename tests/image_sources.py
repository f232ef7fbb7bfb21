"""Captioned image sources written by the tests: a folder in the imagefolder convention,
webdataset tar shards and a COCO captions file, each with known good and bad entries.

Each maker returns the expected outcome: the keys that import and the count of each skip
reason, built beside the files rather than read back from the importer.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200)]
WORDS = ["red", "green", "blue", "yellow", "purple"]


def picture(index: int, size: tuple[int, int]) -> Image.Image:
    """A two-colour picture: the left half one colour, the right half another."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = COLOURS[index % 5]
    array[:, w // 2 :] = COLOURS[(index + 2) % 5]
    return Image.fromarray(array)


def caption(index: int) -> str:
    return f"{WORDS[index % 5]} beside {WORDS[(index + 2) % 5]}, picture {index}"


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def upright_test_image() -> Image.Image:
    """48x48: top half red, bottom half blue (what an EXIF-rotated file must show)."""
    array = np.zeros((48, 48, 3), np.uint8)
    array[:24] = (230, 20, 20)
    array[24:] = (20, 20, 230)
    return Image.fromarray(array)


def rotated_jpeg() -> bytes:
    """upright_test_image stored rotated, with EXIF orientation 6 (rotate 90 CW to show)."""
    stored = upright_test_image().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(stored, "JPEG", quality=95, exif=exif)


def sixteen_bit_png() -> bytes:
    """A 40x40 16-bit greyscale PNG at level 32896 (= 128 * 257: 8-bit 128)."""
    array = np.full((40, 40), 128 * 257, np.uint16)
    return encoded(Image.fromarray(array), "PNG")  # mode I;16


def make_folder(root: str) -> dict:
    """A folder of 30 good images and 7 bad ones, captions three ways:
    `metadata.jsonl` at the top, `metadata.csv` in `more/`, sidecar `.txt` in `loose/`."""
    os.makedirs(os.path.join(root, "more", "deeper"))
    os.makedirs(os.path.join(root, "loose"))
    good: dict[str, str] = {}
    skipped: collections.Counter = collections.Counter()
    jsonl = []
    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif")]
    modes = ["RGB", "L", "P", "RGBA", "RGB"]
    for i in range(20):  # top level, metadata.jsonl
        fmt, ext = formats[i % 5]
        size = (40 + 7 * i, 32 + 5 * (i % 4))
        image = picture(i, size).convert(modes[i % 5]) if fmt != "JPEG" else picture(i, size)
        name = f"img{i:02d}.{ext}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(encoded(image, fmt))
        jsonl.append({"file_name": name, "text": caption(i)})
        good[name] = caption(i)
    special = {
        "rotated.jpg": (rotated_jpeg(), "an upright picture, red above blue"),
        "cmyk.jpg": (encoded(picture(1, (50, 40)).convert("CMYK"), "JPEG"), "cmyk picture"),
        "grey16.png": (sixteen_bit_png(), "a mid grey square"),
    }
    for name, (data, text) in special.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        jsonl.append({"file_name": name, "text": text})
        good[name] = text
    full = encoded(picture(3, (64, 64)), "JPEG", quality=95)
    bad = {
        "truncated.jpg": (full[: len(full) // 2], "a cut jpeg", "truncated"),
        "notes.jpg": (b"these are not pixels\n" * 10, "a text file", "not_an_image"),
        "tiny.png": (encoded(picture(0, (1, 1)), "PNG"), "one pixel", "too_small"),
        "no_words.png": (encoded(picture(4, (40, 40)), "PNG"), "  \t ", "empty_caption"),
    }
    for name, (data, text, reason) in bad.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        jsonl.append({"file_name": name, "text": text})
        skipped[reason] += 1
    jsonl.append({"file_name": "missing.png", "text": "listed, never written"})
    skipped["missing_file"] += 1
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for row in jsonl:
            f.write(json.dumps(row) + "\n")
    # more/: metadata.csv with a "caption" column, one image a folder deeper.
    rows = ["file_name,caption"]
    for i in range(20, 25):
        name = f"deeper/d{i}.png" if i % 2 else f"m{i}.png"
        picture(i, (48, 48)).save(os.path.join(root, "more", name))
        rows.append(f'{name},"{caption(i)}"')
        good[f"more/{name}"] = caption(i)
    with open(os.path.join(root, "more", "metadata.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    # loose/: sidecar captions; one not UTF-8, one image with none.
    for i in range(25, 27):
        picture(i, (36, 60)).save(os.path.join(root, "loose", f"s{i}.png"))
        with open(os.path.join(root, "loose", f"s{i}.txt"), "w") as f:
            f.write(caption(i))
        good[f"loose/s{i}.png"] = caption(i)
    picture(27, (40, 40)).save(os.path.join(root, "loose", "latin1.png"))
    with open(os.path.join(root, "loose", "latin1.txt"), "wb") as f:
        f.write("un caf\xe9 cr\xe8me".encode("latin-1"))
    skipped["caption_not_utf8"] += 1
    picture(28, (40, 40)).save(os.path.join(root, "loose", "uncaptioned.png"))
    skipped["no_caption"] += 1
    return {"good": good, "skipped": dict(skipped)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_shards(root: str, num_shards: int = 3, per_shard: int = 8) -> dict:
    """img2dataset-style shards 00000.tar...: KEY.jpg, KEY.txt, KEY.json per sample; shard 0
    also holds `../escape.txt` (unsafe) and a sample whose image is not one."""
    os.makedirs(root)
    good: dict[str, str] = {}
    skipped: collections.Counter = collections.Counter()
    for s in range(num_shards):
        shard = f"{s:05d}.tar"
        with tarfile.open(os.path.join(root, shard), "w") as tar:
            if s == 0:
                _add(tar, "../escape.txt", b"should never be written")
                skipped["unsafe_path"] += 1
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:05d}{j:04d}"
                _add(tar, f"{key}.jpg", encoded(picture(i, (48 + j, 40)), "JPEG", quality=95))
                if j == 3:  # caption only in the json, as img2dataset also writes it
                    _add(tar, f"{key}.json", json.dumps({"caption": caption(i)}).encode())
                else:
                    _add(tar, f"{key}.txt", caption(i).encode())
                    _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                good[f"{shard}/{key}"] = caption(i)
            if s == 1:
                _add(tar, "broken.jpg", b"\xff\xd8 not really a jpeg")
                _add(tar, "broken.txt", b"a broken image")
                skipped["not_an_image"] += 1
    return {"good": good, "skipped": dict(skipped)}


def make_coco(root: str, num_images: int = 10) -> dict:
    """COCO's layout: annotations/captions_val2017.json and val2017/*.jpg; image i has
    3 + i % 3 captions, and image 4's second caption is empty (dropped, image kept)."""
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "val2017"))
    images, annotations, captions = [], [], {}
    ann_id = 1000
    for i in range(num_images):
        name = f"{i + 1:012d}.jpg"
        picture(i, (64, 48)).save(os.path.join(root, "val2017", name), quality=95)
        image_id = 500 - i  # ids not in file order: records follow image id
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
        kept = []
        for c in range(3 + i % 3):
            text = "" if (i, c) == (4, 1) else f"{caption(i)}, caption {c}"
            annotations.append({"id": ann_id, "image_id": image_id, "caption": text})
            ann_id += 1
            if text:
                kept.append(text)
        captions[name] = kept
    path = os.path.join(root, "annotations", "captions_val2017.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return {"annotation_file": path, "captions": captions}
