"""What `t2i data import` reads: the images and captions of a folder, of webdataset tar
shards, or of a COCO captions file, listed in a fixed order.

- folder: the Hugging Face imagefolder convention (`metadata.jsonl` / `metadata.csv` with
  `file_name` and a caption column, in the folder or any subfolder, paths relative to the
  metadata file), and sidecar captions (`IMAGE.txt` or `IMAGE.jpg.txt` beside the image) for
  images no metadata names.
- webdataset: img2dataset's shards: `KEY.jpg|jpeg|png|webp|...` beside `KEY.txt` (or the
  `caption` of `KEY.json`), members of one sample consecutive. Shards are streamed member by
  member; nothing is ever extracted, and a member named with `..` or an absolute path is
  skipped unread.
- coco: `captions_*.json` (images + annotations) and its image folder; every caption of an
  image is kept, in annotation-id order.

Listing reads no image; the workers (`importer.py`) decode them.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator

from t2i_jax.data import image_decode
from t2i_jax.errors import DataError, UserError

FORMATS = ("folder", "webdataset", "coco")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")  # tried in this order when --caption-column is not given
SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


@dataclasses.dataclass(frozen=True)
class FileItem:
    """One image file and its raw captions (str, bytes or None when there is none)."""

    key: str  # the path relative to the source, "/"-separated
    path: str
    captions: tuple[str | bytes | None, ...]


# -- folder ------------------------------------------------------------------------------------
def _metadata_rows(path: str, caption_column: str | None) -> Iterator[tuple[str, str]]:
    """(file_name, caption) of each row; bytes that are not UTF-8 survive as lone surrogates
    (so that caption is counted as not UTF-8 rather than failing the whole file)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    if path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        columns = list(rows[0]) if rows else []
        numbered = enumerate(rows, start=2)
    else:
        rows, columns, numbered = [], [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{line_no}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: not a JSON object")
            numbered.append((line_no, row))
            columns = columns or list(row)
    column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if column is None:
        raise DataError(
            f"{path} has no caption column (columns: {', '.join(columns) or 'none'}); "
            "pass --caption-column"
        )
    for line_no, row in numbered:
        if "file_name" not in row:
            raise DataError(f"{path}:{line_no}: no file_name")
        if column not in row:
            raise DataError(f"{path}:{line_no}: no column {column!r}")
        caption = row[column]
        yield str(row["file_name"]), (None if caption is None else str(caption))


def _sidecar_caption(path: str) -> bytes | None:
    for candidate in (os.path.splitext(path)[0] + ".txt", path + ".txt"):
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return f.read()
    return None


def list_folder(src: str, caption_column: str | None) -> list[FileItem]:
    """Every image of the folder (and each row of its metadata files), sorted by key."""
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder")
    src = os.path.abspath(src)
    from_metadata: dict[str, FileItem] = {}
    images: list[str] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name in METADATA_FILES:
                for file_name, caption in _metadata_rows(path, caption_column):
                    image_path = os.path.normpath(os.path.join(root, file_name))
                    key = os.path.relpath(image_path, src).replace(os.sep, "/")
                    if key.startswith("../"):
                        raise DataError(f"{path}: {file_name} is outside {src}")
                    from_metadata[key] = FileItem(key, image_path, (caption,))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(path)
    items = dict(from_metadata)
    for path in images:
        key = os.path.relpath(path, src).replace(os.sep, "/")
        if key not in items:
            items[key] = FileItem(key, path, (_sidecar_caption(path),))
    if not items:
        raise DataError(f"no images found in {src} ({', '.join(IMAGE_EXTENSIONS)})")
    return [items[k] for k in sorted(items)]


# -- coco --------------------------------------------------------------------------------------
def default_coco_images(annotation_file: str) -> str:
    """`.../annotations/captions_train2017.json` -> `.../train2017` (COCO's own layout)."""
    match = re.match(r"captions_(\w+)\.json$", os.path.basename(annotation_file))
    parent = os.path.dirname(os.path.abspath(annotation_file))
    if match:
        for folder in (os.path.dirname(parent), parent):
            candidate = os.path.join(folder, match.group(1))
            if os.path.isdir(candidate):
                return candidate
    return parent


def list_coco(annotation_file: str, image_dir: str | None) -> list[FileItem]:
    """Each image of the annotation file with all its captions, in image-id order."""
    if not os.path.isfile(annotation_file):
        raise UserError(f"{annotation_file} does not exist (a COCO captions_*.json file)")
    try:
        with open(annotation_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8", "surrogateescape"))
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: int(a["id"]))
        captions: dict[int, list] = {i: [] for i in images}
        for a in annotations:
            if int(a["image_id"]) not in captions:
                raise DataError(
                    f"{annotation_file}: annotation {a['id']} names image {a['image_id']}, "
                    "which is not in `images`"
                )
            captions[int(a["image_id"])].append(a.get("caption"))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{annotation_file} is not a COCO captions file ({e!r})") from None
    image_dir = image_dir or default_coco_images(annotation_file)
    return [
        FileItem(images[i], os.path.join(image_dir, images[i]), tuple(captions[i]) or (None,))
        for i in sorted(images)
    ]


# -- webdataset --------------------------------------------------------------------------------
def list_shards(src: str) -> list[str]:
    """A .tar file, a folder of them (sorted, recursively), or a glob pattern."""
    if os.path.isfile(src):
        return [os.path.abspath(src)]
    if os.path.isdir(src):
        found = {
            p
            for pattern in SHARD_PATTERNS
            for p in glob.glob(os.path.join(src, "**", pattern), recursive=True)
        }
    else:
        found = set(glob.glob(src))
    if not found:
        raise UserError(f"no tar shards at {src} ({', '.join(SHARD_PATTERNS)})")
    return sorted(os.path.abspath(p) for p in found)


def is_unsafe(name: str) -> bool:
    """A member name that would leave the folder it names (absolute, drive or `..`)."""
    normal = name.replace("\\", "/")
    return (
        normal.startswith("/") or re.match(r"^[A-Za-z]:", normal) is not None
    ) or ".." in normal.split("/")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


@dataclasses.dataclass
class Sample:
    """The members of one webdataset sample, by extension, read as bytes."""

    key: str
    files: dict[str, bytes]
    unsafe: bool = False


def iter_shard(path: str, read: bool = True) -> Iterator[Sample]:
    """The samples of a shard, streamed (`r|*`): consecutive members with one key form a
    sample. Unsafe names make an `unsafe` sample whose bytes are never read; members that
    are not regular files (links, folders) are ignored."""
    current: Sample | None = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                unsafe = is_unsafe(member.name) or not member.isfile()
                key, ext = split_member_name(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key, {})
                if unsafe:
                    current.unsafe = True
                    continue
                if read:
                    current.files[ext] = tar.extractfile(member).read()
                else:
                    current.files[ext] = b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read tar shard {path}: {e}") from None
    if current is not None:
        yield current


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def sample_image(sample: Sample) -> bytes | None:
    return next((sample.files[e] for e in IMAGE_EXTS if e in sample.files), None)


def sample_caption(sample: Sample) -> str | bytes | None:
    """`KEY.txt`, else the `caption` of `KEY.json` (img2dataset writes both)."""
    if "txt" in sample.files:
        return sample.files["txt"]
    if "json" in sample.files:
        try:
            meta = json.loads(sample.files["json"].decode("utf-8", "surrogateescape"))
        except ValueError:
            return None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"]
    return None


def shard_keys(path: str) -> list[str]:
    """The keys of a shard's safe samples that have an image (the listing pass)."""
    return [
        s.key
        for s in iter_shard(path, read=False)
        if not s.unsafe and any(e in s.files for e in IMAGE_EXTS)
    ]


def reason_of_sample(sample: Sample) -> str | None:
    if sample.unsafe:
        return image_decode.UNSAFE_PATH
    if sample_image(sample) is None:
        return image_decode.NO_IMAGE
    return None
