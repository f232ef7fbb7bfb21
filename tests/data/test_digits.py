"""The `digits` data set: scikit-learn's handwritten digits, upsampled and captioned."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from t2i_jax.data import digits_builder as db
from t2i_jax.data import sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Prepared twice, into two directories: (builder, {split: records}) of the first."""
    builders = [
        sources.prepare("digits", str(tmp_path_factory.mktemp(f"digits{i}")), "default")
        for i in range(2)
    ]
    records = [
        {s: [b.as_data_source(s)[i] for i in range(len(b.as_data_source(s)))] for s in db.SPLITS}
        for b in builders
    ]
    return builders[0], records


def test_splits_partition_all_digits_80_10_10(built):
    _, (records, _) = built
    rows = {s: [int(r["attributes"]["source_index"]) for r in records[s]] for s in db.SPLITS}
    assert [len(rows[s]) for s in db.SPLITS] == [1439, 179, 179]
    assert sorted(sum(rows.values(), [])) == list(range(1797))
    for s in db.SPLITS:
        assert rows[s] == sorted(rows[s])


def test_records_are_the_source_digits_captioned(built):
    _, (records, _) = built
    source = load_digits()
    for record in records["validation"]:
        attrs = {k: int(v) for k, v in record["attributes"].items()}
        row = attrs["source_index"]
        assert attrs["digit"] == int(source.target[row])
        caption = record["caption"].decode() if isinstance(record["caption"], bytes) else None
        assert caption == db.TEMPLATES[attrs["template"]].format(name=db.NAMES[attrs["digit"]])
        image = np.asarray(record["image"])
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
        # Averaged back over 4x4 blocks, the image is the 8x8 scan (0-16 -> 0-255).
        blocks = image[..., 0].astype(np.float64).reshape(8, 4, 8, 4).mean(axis=(1, 3))
        original = source.images[row] * 255.0 / 16.0
        assert np.corrcoef(blocks.ravel(), original.ravel())[0, 1] > 0.95
        assert np.abs(blocks - original).mean() < 16  # of 255
    templates = {int(r["attributes"]["template"]) for r in records["train"]}
    assert templates == set(range(len(db.TEMPLATES)))


def test_two_builds_are_identical(built):
    _, (first, second) = built
    for s in db.SPLITS:
        for a, b in zip(first[s], second[s], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["caption"] == b["caption"]


def test_r_precision_mismatches_are_other_digits_not_other_wordings(built):
    """The same digit in another template is not a mismatched caption for R-precision."""
    from t2i_jax.data.examples import load_examples
    from t2i_jax.eval.evaluators import caption_ids
    from t2i_jax.metrics import alignment

    builder, _ = built
    examples = load_examples(builder, "validation", 60)
    ids = caption_ids("digits", examples)
    digits = np.asarray(examples.attributes["digit"])
    for i in range(len(ids)):
        np.testing.assert_array_equal(ids == ids[i], digits == digits[i])
    # By text alone several wordings of one digit would count as different captions.
    assert len(set(alignment.text_ids_of(examples.captions))) > len(set(ids.tolist()))
    # Other data sets: captions of other text, as before.
    shapes_like = caption_ids("photos", examples)
    np.testing.assert_array_equal(shapes_like, alignment.text_ids_of(examples.captions))
