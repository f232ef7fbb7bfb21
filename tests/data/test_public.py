"""Public TFDS data sets (`data/public.py`): imagenet2012 through `tfds.data_source` on TFDS's
mock data (no TensorFlow needed), trained on by a family; coco_captions' record mapping and
its missing-TensorFlow line."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import REPO

from t2i_jax import cli, rng
from t2i_jax.data import image_decode, public, sources
from t2i_jax.errors import DataError
from t2i_jax.text.tokenizer import prepare_tokenizer
from t2i_jax.train import input_pipeline

SIZE = 32
MOCK_EXAMPLES = 24


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


def test_class_names_are_torchvision_s_in_tfds_label_order():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert public.imagenet_class_names() == tuple(_IMAGENET_CATEGORIES)
    # TFDS's labels are the sorted WordNet ids; torchvision's names follow the same order.
    labels = tfds.builder("imagenet2012", data_dir="/nonexistent").info.features["label"]
    assert labels.names[:2] == ["n01440764", "n01443537"]  # tench, goldfish
    assert public.imagenet_class_names()[:2] == ("tench", "goldfish")


def test_templates_take_the_right_article():
    assert public.templated_captions("tench")[0] == "a photo of a tench"
    assert public.templated_captions("American alligator")[0] == "a photo of an American alligator"
    assert len(set(public.templated_captions("ear"))) == len(public.TEMPLATES)


def test_imagenet2012_records_from_tfds_data_source(mock_tfds, tmp_path):
    dataset = sources.prepare("imagenet2012", str(tmp_path), f"{SIZE}x{SIZE}")
    assert set(dataset.info.splits) == {"train", "validation"}
    assert dataset.info.splits["train"].num_examples == MOCK_EXAMPLES
    assert dataset.info.features["image"].shape == (SIZE, SIZE, 3)
    assert sources.has_several_captions(dataset)
    raw = tfds.data_source("imagenet2012", split="validation", data_dir=str(tmp_path))
    source = dataset.as_data_source("validation")
    for i in range(4):
        record = source[i]
        name = public.imagenet_class_names()[int(raw[i]["label"])]
        assert record["captions"] == public.templated_captions(name)
        assert record["caption"] == record["captions"][0]
        assert record["image"].shape == (SIZE, SIZE, 3) and record["image"].dtype == np.uint8
        np.testing.assert_array_equal(
            record["image"], image_decode.square_image(raw[i]["image"], SIZE)
        )
    # The tokenizer's captions: every template over every class, not the records.
    assert len(sources.training_captions(dataset)) == 1000 * len(public.TEMPLATES)
    assert os.path.isdir(os.path.join(str(tmp_path), "t2i_jax", "imagenet2012", "32x32"))


def test_square_image_resizes_the_shorter_side_and_crops_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 10:70] = 255  # white beyond the centre 40 columns by more than the filter
    out = image_decode.square_image(image, 20)
    assert out.shape == (20, 20, 3)
    assert out.min() == 255  # only the white centre is kept
    assert image_decode.square_image(image[:, :40], 20).min() == 0  # not a no-op
    grey = image_decode.square_image(np.full((10, 12, 1), 7, np.uint8), 8)
    assert grey.shape == (8, 8, 3) and (grey == 7).all()


def test_imagenet_batches_draw_a_template_per_step(mock_tfds, tmp_path):
    """The batch contract over the public source, a template drawn per record and step."""
    dataset = sources.prepare("imagenet2012", str(tmp_path), f"{SIZE}x{SIZE}")
    tokenizer = prepare_tokenizer(dataset, 256)
    source = dataset.as_data_source("train")

    def drawn(seed: int, epochs: int = 6) -> tuple[list[str], np.ndarray]:
        loader = input_pipeline.make_loader(
            source, tokenizer, global_batch_size=4, max_len=24, seed=seed, num_epochs=epochs,
            shard_index=0, shard_count=1, several_captions=True,
        )  # fmt: skip
        batches = list(loader)
        assert batches[0]["image"].shape == (4, SIZE, SIZE, 3)
        captions = [c for b in batches for c in tokenizer.decode(b["tokens"])]
        return captions, np.concatenate([b["image"] for b in batches])

    a, images = drawn(rng.stream_seed(0, "data"))
    assert a == drawn(rng.stream_seed(0, "data"))[0]  # reproducible from the seed
    assert a != drawn(rng.stream_seed(1, "data"))[0]
    assert images.min() >= -1.0 and images.max() <= 1.0
    names = {public.imagenet_class_names()[int(source.sources[0][i]["label"])]
             for i in range(len(source))}  # fmt: skip
    allowed = {c for n in names for c in public.templated_captions(n)}
    assert set(a) <= allowed and len(set(a)) > len(names)  # more than one template per image


# The same batch contract as the imported sets' (test_import.py trains every family on it)
# and the loader test above: here the user's command end to end, with `-m slow`.
@pytest.mark.slow
def test_a_family_trains_on_imagenet2012(mock_tfds, tmp_path):
    workdir = tmp_path / "run"
    assert cli.main(
        ["train", "--config", f"{REPO}/experiments/images.py:gan-test", "--workdir",
         str(workdir), "--config.data.name=imagenet2012", f"--config.data.variant={SIZE}x{SIZE}",
         f"--config.data.dir={tmp_path / 'data'}", "--config.train.steps=2",
         "--config.train.checkpoint_every=2", "--no-progress"]
    ) == 0  # fmt: skip
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert logged[-1]["step"] == 2
    # The grid's prompts: the first validation captions, a template over a class name.
    with open(workdir / "report.md") as f:
        assert "a photo of a" in f.read()


def test_wrong_variant_and_unprepared_set_are_one_line(tmp_path, mock_tfds, capsys):
    args = ["train", "--config", f"{REPO}/experiments/images.py:gan-test", "--workdir",
            str(tmp_path / "run"), "--config.data.name=imagenet2012",
            f"--config.data.dir={tmp_path}", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 2  # the default variant is 64x64, the test config 32 px
    assert "set data.variant=32x32" in capsys.readouterr().err
    with pytest.raises(DataError, match="no variant '48x48'"):
        sources.load_builder("imagenet2012", str(tmp_path), "48x48")


def test_unprepared_imagenet_names_the_tfds_command(tmp_path):
    with pytest.raises(DataError, match=f"tfds build imagenet2012 --data_dir {tmp_path}"):
        sources.prepare("imagenet2012", str(tmp_path), "32x32")


def test_coco_captions_records():
    raw = {
        "image": np.full((30, 50, 3), 9, np.uint8),
        "image/id": 7,
        "captions": {"text": np.array([b"a cat on a mat", b" ", b"a cat"]), "id": np.arange(3)},
    }
    record = public.coco_record(raw, 16)
    assert record["captions"] == ["a cat on a mat", "a cat"]  # the blank one dropped
    assert record["caption"] == "a cat on a mat" and record["image"].shape == (16, 16, 3)
    raw["captions"]["text"] = np.array([b""])
    with pytest.raises(DataError, match="coco_captions image 7 has no caption"):
        public.coco_record(raw, 16)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_coco_captions_without_tensorflow_names_the_extra(tmp_path):
    with pytest.raises(DataError, match=r"needs TensorFlow: pip install 't2i_jax\[tf\]'"):
        sources.prepare("coco_captions", str(tmp_path), "32x32")
