"""`t2i data import`: a folder, webdataset shards and a COCO file made here, imported with
their bad entries skipped and counted by reason, reproducibly, and trained on by every family."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import image_sources
import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from t2i_jax import cli, rng
from t2i_jax.data import image_decode, importer, sources
from t2i_jax.errors import ConfigError
from t2i_jax.eval.evaluator_training import PLANS
from t2i_jax.eval.evaluators import load_evaluators
from t2i_jax.metrics import fid, inception_score
from t2i_jax.text.tokenizer import Tokenizer
from t2i_jax.train import input_pipeline

SIZE = 32


def import_cli(src, name, fmt, data_dir, *extra) -> int:
    return cli.main(
        ["data", "import", str(src), "--name", name, "--format", fmt, "--data-dir",
         str(data_dir), "--image-size", str(SIZE), "--no-progress", *extra]
    )  # fmt: skip


def records(data_dir, name: str, split: str) -> dict[str, dict]:
    source = sources.load_builder(name, str(data_dir), "default").as_data_source(split)
    return {r["key"].decode(): r for r in (source[i] for i in range(len(source)))}


def file_hashes(folder) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def folder_import(tmp_path_factory):
    """The test folder imported once (2 workers): (expected, data_dir, report)."""
    root = tmp_path_factory.mktemp("import")
    expected = image_sources.make_folder(str(root / "photos"))
    data_dir = root / "data"
    assert import_cli(root / "photos", "photos", "folder", data_dir, "--workers", "2",
                      "--validation-fraction", "0.2") == 0  # fmt: skip
    report = json.loads((data_dir / "photos" / "import_report.json").read_text())
    return expected, root, data_dir, report


def test_folder_import_counts_every_skip_by_reason(folder_import, capsys):
    expected, _, data_dir, report = folder_import
    assert report["skipped"] == expected["skipped"]
    imported = {**records(data_dir, "photos", "train"), **records(data_dir, "photos", "validation")}
    assert set(imported) == set(expected["good"])
    assert {k: r["caption"].decode() for k, r in imported.items()} == expected["good"]
    assert report["listed"] == len(expected["good"]) + sum(expected["skipped"].values())
    # The split is by key over everything listed (skipped files included), not by outcome.
    listed = set(expected["good"]) | {k for keys in report["skipped_keys"].values() for k in keys}
    assert len(listed) == report["listed"]
    validation = importer.validation_keys(sorted(listed), 0.2, seed=0) & set(expected["good"])
    assert set(records(data_dir, "photos", "validation")) == validation
    assert report["splits"] == {"train": 30 - len(validation), "validation": len(validation)}
    for r in imported.values():
        assert r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8


def test_folder_import_decodes_every_mode_upright(folder_import):
    _, root, data_dir, _ = folder_import
    imported = {**records(data_dir, "photos", "train"), **records(data_dir, "photos", "validation")}
    # EXIF orientation 6 applied: red on top, blue below, as the picture was drawn.
    upright = imported["rotated.jpg"]["image"].astype(int)
    assert upright[: SIZE // 2 - 2, :, 0].min() > 180 and upright[: SIZE // 2 - 2, :, 2].max() < 80
    assert upright[SIZE // 2 + 2 :, :, 2].min() > 180 and upright[SIZE // 2 + 2 :, :, 0].max() < 80
    # 16-bit grey 128 * 257 -> 8-bit 128 (scaled, not clipped to 255).
    assert np.all(imported["grey16.png"]["image"] == 128)
    # CMYK -> RGB: the colours the picture was drawn with, within JPEG's error.
    cmyk = imported["cmyk.jpg"]["image"].astype(int)
    assert np.abs(cmyk[4:-4, 2:10] - image_sources.COLOURS[1]).max() < 30
    assert np.abs(cmyk[4:-4, -10:-2] - image_sources.COLOURS[3]).max() < 30
    # A lossless RGB file: Pillow's own shorter-side bicubic resize and centre crop.
    with Image.open(root / "photos" / "more" / "m22.png") as im:
        w, h = im.size
        scale = SIZE / min(w, h)
        ref = im.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        left, top = (ref.size[0] - SIZE) // 2, (ref.size[1] - SIZE) // 2
        ref = np.asarray(ref.crop((left, top, left + SIZE, top + SIZE)))
    np.testing.assert_array_equal(imported["more/m22.png"]["image"], ref)
    # The tokenizer was trained on the imported training captions.
    tokenizer = Tokenizer.load(str(data_dir / "photos" / "spm_vocab128.model"))
    tokens = tokenizer.encode(["purple beside red, picture 9"], 16)[0]
    assert tokenizer.decode(tokens) == ["purple beside red, picture 9"]


def test_import_is_deterministic_and_survives_a_kill(folder_import, tmp_path):
    """Zero workers give the files two workers gave; an import killed midway leaves no data
    set a run would open, and running it again gives those same files."""
    _, root, data_dir, _ = folder_import
    assert import_cli(root / "photos", "photos", "folder", tmp_path / "a", "--workers", "0",
                      "--validation-fraction", "0.2") == 0  # fmt: skip
    first = file_hashes(data_dir / "photos")
    assert file_hashes(tmp_path / "a" / "photos") == first
    kill = textwrap.dedent(f"""
        import os, signal
        from t2i_jax import cli
        from t2i_jax.data import record_writer
        write = record_writer.SplitWriter.write
        calls = []
        def dying_write(self, example):
            calls.append(1)
            if len(calls) == 12:
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, example)
        record_writer.SplitWriter.write = dying_write
        if __name__ == "__main__":
            cli.main(["data", "import", {str(root / "photos")!r}, "--name", "photos",
                      "--format", "folder", "--data-dir", {str(tmp_path / "b")!r},
                      "--image-size", "{SIZE}", "--validation-fraction", "0.2",
                      "--workers", "0", "--no-progress"])
    """)
    script = tmp_path / "kill.py"
    script.write_text(kill)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not os.path.exists(tmp_path / "b" / "photos")
    assert os.path.isdir(tmp_path / "b" / ".photos.import")  # what the kill left
    with pytest.raises(ConfigError, match="not imported"):
        sources.load_builder("photos", str(tmp_path / "b"), "default")
    assert import_cli(root / "photos", "photos", "folder", tmp_path / "b",
                      "--validation-fraction", "0.2") == 0  # fmt: skip
    assert file_hashes(tmp_path / "b" / "photos") == first
    assert sorted(os.listdir(tmp_path / "b")) == ["photos"]


def test_webdataset_shards_stream_and_never_write_outside(tmp_path):
    expected = image_sources.make_shards(str(tmp_path / "shards" / "inner"))
    data_dir = tmp_path / "shards" / "inner" / "data"
    before = file_hashes(tmp_path)
    assert import_cli(tmp_path / "shards" / "inner", "web", "webdataset", data_dir,
                      "--workers", "2", "--validation-fraction", "0.1") == 0  # fmt: skip
    report = json.loads((data_dir / "web" / "import_report.json").read_text())
    assert report["skipped"] == expected["skipped"]
    imported = {**records(data_dir, "web", "train"), **records(data_dir, "web", "validation")}
    assert {k: r["caption"].decode() for k, r in imported.items()} == expected["good"]
    # Every new file is inside the data set's folder: nothing was extracted anywhere.
    after = file_hashes(tmp_path)
    new = set(after) - set(before)
    assert new and all(p.startswith(os.path.join("shards", "inner", "data", "web")) for p in new)
    assert not any("escape" in p for p in after)


def test_coco_keeps_every_caption_and_draws_one_per_step_from_the_seed(tmp_path, capsys):
    expected = image_sources.make_coco(str(tmp_path / "coco"))
    data_dir = tmp_path / "data"
    assert import_cli(expected["annotation_file"], "coco", "coco", data_dir,
                      "--validation-fraction", "0.2") == 0  # fmt: skip
    imported = {**records(data_dir, "coco", "train"), **records(data_dir, "coco", "validation")}
    captions = {k: [c.decode() for c in r["captions"]] for k, r in imported.items()}
    assert captions == expected["captions"]
    report = json.loads((data_dir / "coco" / "import_report.json").read_text())
    assert report["captions_skipped"] == {"empty_caption": 1} and report["skipped"] == {}

    builder = sources.load_builder("coco", str(data_dir), "default")
    assert sources.has_several_captions(builder)
    tokenizer = Tokenizer.load(str(data_dir / "coco" / "spm_vocab128.model"))
    source = builder.as_data_source("train")

    def drawn(seed: int, epochs: int = 40) -> list[str]:
        loader = input_pipeline.make_loader(
            source, tokenizer, global_batch_size=4, max_len=24, seed=seed, num_epochs=epochs,
            shard_index=0, shard_count=1, several_captions=True,
        )  # fmt: skip
        return [c for batch in loader for c in tokenizer.decode(batch["tokens"])]

    a = drawn(rng.stream_seed(0, "data"))
    assert a == drawn(rng.stream_seed(0, "data"))  # reproducible from the seed
    assert a != drawn(rng.stream_seed(1, "data"))
    train_captions = {c for r in (source[i] for i in range(len(source))) for c in r["captions"]}
    # Over 40 epochs every caption of every image is drawn, not only the first.
    assert {c.encode() for c in a} == train_captions


def test_bad_input_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    image_sources.make_folder(str(src))
    for args, message in (
        (["--name", "digits"], "built-in"),
        (["--name", "Bad-Name"], "lowercase"),
        (["--name", "ok", "--image-size", "4"], "--image-size"),
    ):
        code = cli.main(["data", "import", str(src), "--format", "folder", "--data-dir",
                         str(tmp_path / "d"), "--no-progress", *args])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    with open(src / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    assert import_cli(src, "ok", "folder", tmp_path / "d") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metadata.jsonl:" in err[0], err
    assert not os.path.exists(tmp_path / "d" / "ok")
    # An existing data set is never replaced without --overwrite.
    (tmp_path / "d" / "taken").mkdir(parents=True)
    assert import_cli(src, "taken", "folder", tmp_path / "d") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_decompression_bombs_are_skipped(monkeypatch):
    data = image_sources.encoded(image_sources.picture(0, (64, 64)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # warns: still a bomb
    image, reason = image_decode.decode_image(data, size=SIZE, crop="center", seed=0, min_size=1)
    assert image is None and reason == image_decode.TOO_LARGE
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    image, reason = image_decode.decode_image(data, size=SIZE, crop="center", seed=0, min_size=1)
    assert reason is None and image.shape == (SIZE, SIZE, 3)


def test_random_crops_are_drawn_from_the_seed_and_key():
    data = image_sources.encoded(image_sources.picture(2, (96, 32)), "PNG")

    def crop(key: str, seed: int = 0) -> np.ndarray:
        image, _ = image_decode.decode_image(
            data, size=SIZE, crop="random", seed=image_decode.key_seed(seed, key), min_size=1
        )
        return image

    np.testing.assert_array_equal(crop("a.png"), crop("a.png"))
    crops = {crop(f"{i}.png").tobytes() for i in range(12)}
    assert len(crops) > 3  # 65 offsets along the long side


def test_validation_split_is_a_seeded_order_of_keys():
    keys = [f"k{i}" for i in range(100)]
    val = importer.validation_keys(keys, 0.1, seed=0)
    assert len(val) == 10 and val == importer.validation_keys(keys[::-1], 0.1, seed=0)
    assert val != importer.validation_keys(keys, 0.1, seed=1)
    assert len(importer.validation_keys(keys[:3], 0.05, seed=0)) == 1


def train_on_imported(data_dir, workdir, config: str, *extra: str) -> int:
    return cli.main(
        ["train", "--config", f"{REPO}/experiments/images.py:{config}", "--workdir",
         str(workdir), "--config.data.name=photos", f"--config.data.dir={data_dir}",
         "--config.train.steps=2", "--config.train.checkpoint_every=2", "--no-progress",
         *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def imported_vae_run(folder_import, tmp_path_factory) -> str:
    """`images.py:ldm_vae-test` trained 2 steps on the imported folder: the LDM's VAE."""
    workdir = tmp_path_factory.mktemp("imported_ldm_vae")
    assert train_on_imported(folder_import[2], workdir, "ldm_vae-test") == 0
    return str(workdir)


@pytest.fixture(scope="module")
def imported_diffusion_run(folder_import, tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("imported_diffusion")
    assert train_on_imported(folder_import[2], workdir, "diffusion-test") == 0
    return str(workdir)


# The batch contract is the same for every family, so diffusion (a learned text encoder)
# and the GAN (bag-of-words) cover the imported data's path in `make test`; the others train
# on t2i_shapes in their own tests and run here with `-m slow`.
@pytest.mark.parametrize(
    "family",
    [
        "diffusion",
        "gan",
        *(pytest.param(f, marks=pytest.mark.slow) for f in ("vae", "vqvae", "ldm")),
    ],
)
def test_every_family_trains_on_imported_images(family, folder_import, tmp_path, request):
    data_dir = folder_import[2]
    if family == "diffusion":  # trained once, for the evaluation test too
        tmp_path = pathlib.Path(request.getfixturevalue("imported_diffusion_run"))
    else:
        extra = []
        if family == "ldm":
            extra = [f"--config.ldm.autoencoder={request.getfixturevalue('imported_vae_run')}"]
        assert train_on_imported(data_dir, tmp_path, f"{family}-test", *extra) == 0
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert logged and logged[-1]["step"] == 2
    assert all(np.isfinite(v) for m in logged for k, v in m.items() if "loss" in k), logged
    # With no prompts in the config the grid shows the first validation captions.
    builder = sources.load_builder("photos", str(data_dir), "default")
    validation = sources.first_captions(builder, 8)
    assert len(validation) == folder_import[3]["splits"]["validation"]
    with open(tmp_path / "report.md") as f:
        assert validation[0] in f.read()


EVAL_NUM = 3  # validation has 7 images: 3 to score, 3 others for the real-vs-real floor


def test_eval_on_imported_images(imported_diffusion_run, folder_import, inception_weights,
                                 monkeypatch, capsys):  # fmt: skip
    """`t2i eval` on a data set without attributes: the contrastive encoder trained for it,
    FID/KID/IS/precision-recall with the given Inception weights, no probe, one split."""
    # The contrastive plan's steps cut short: this tests the path, not the encoder's skill.
    monkeypatch.setitem(PLANS, "any", dataclasses.replace(PLANS["any"], contrastive_steps=8))
    workdir = imported_diffusion_run
    assert cli.main(["eval", "--workdir", workdir, "--num", str(EVAL_NUM), "--batch-size",
                     "4", "--inception-weights", inception_weights]) == 0  # fmt: skip
    assert "contrastive encoder" in capsys.readouterr().out
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["splits"]) == {"validation"}  # no compositional split here
    assert metrics["inception"] == os.path.basename(inception_weights)
    assert "probe" not in metrics["evaluators"]
    split = metrics["splits"]["validation"]
    assert split["count"] == EVAL_NUM and split["num_mismatched"] == EVAL_NUM - 1
    for kind in ("generated", "real"):
        measured = split[kind]
        assert "attribute_accuracy" not in measured and "probe_fd" not in measured
        for key in ("contrastive_fd", "r_precision", "clip_score", "fid", "kid",
                    "inception_score", "precision", "recall"):  # fmt: skip
            assert np.isfinite(measured[key]), (kind, key, measured)
    # The real column's Inception Score, recomputed here from the same images and weights.
    builder = sources.load_builder("photos", str(folder_import[2]), "default")
    source = builder.as_data_source("validation")
    real = np.stack([source[i]["image"] for i in range(EVAL_NUM)])
    _, logits = fid.load_fid_inception(inception_weights)(real)
    expected, _ = inception_score.inception_score(np.asarray(logits), seed=0, splits=EVAL_NUM)
    np.testing.assert_allclose(split["real"]["inception_score"], expected, rtol=1e-5)
    evaluators = load_evaluators("photos", str(folder_import[2]), "default")
    assert not evaluators.has_probe and evaluators.image_size == SIZE
    with open(os.path.join(workdir, "report.md")) as f:
        section = f.read().split("## Evaluation")[1]
    assert "FID (lower is better)" in section and "contrastive_fd" in section
    assert "attribute accuracy" not in section and "samples_validation.png" in section


def test_random_flip_mirrors_about_half_the_images_from_the_seed(folder_import):
    data_dir = folder_import[2]
    source = sources.load_builder("photos", str(data_dir), "default").as_data_source("train")
    tokenizer = Tokenizer.load(str(data_dir / "photos" / "spm_vocab128.model"))
    originals = [source[i]["image"].astype(np.float32) / 127.5 - 1.0 for i in range(len(source))]

    def flips(seed: int) -> list[bool]:
        loader = input_pipeline.make_loader(
            source, tokenizer, global_batch_size=4, max_len=24, seed=seed, num_epochs=4,
            shard_index=0, shard_count=1, random_flip=True,
        )  # fmt: skip
        out = []
        for image in (im for batch in loader for im in batch["image"]):
            as_is = any(np.array_equal(image, o) for o in originals)
            mirrored = any(np.array_equal(image, o[:, ::-1]) for o in originals)
            assert as_is or mirrored
            if as_is != mirrored:  # not a symmetric image ("a mid grey square")
                out.append(mirrored)
        return out

    a = flips(rng.stream_seed(0, "data"))
    assert a == flips(rng.stream_seed(0, "data"))
    assert a != flips(rng.stream_seed(1, "data"))
    assert len(a) > 60 and 0.3 < np.mean(a) < 0.7, np.mean(a)  # ~77 draws of a fair coin
