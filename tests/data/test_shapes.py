"""Tests for the `t2i_shapes` scenes and TFDS builder (the `small` config, built twice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from t2i_jax.data import shapes
from t2i_jax.data.shapes_builder import T2iShapes, load_builder, prepare

CELL = shapes.IMAGE_SIZE / 3  # Width of a grid cell in pixels.


def _read_all(builder: T2iShapes) -> dict[str, list[dict]]:
    """Every example of every split, caption decoded, attributes as Python ints."""
    out = {}
    for split in shapes.SPLITS:
        source = builder.as_data_source(split)
        examples = []
        for i in range(len(source)):
            ex = source[i]
            caption = ex["caption"]
            examples.append(
                {
                    "image": np.asarray(ex["image"]),
                    "caption": caption.decode() if isinstance(caption, bytes) else caption,
                    "attributes": {k: int(v) for k, v in ex["attributes"].items()},
                }
            )
        out[split] = examples
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The `small` config prepared into two separate directories: (builder, data, data)."""
    a = prepare(tmp_path_factory.mktemp("shapes_a"), "small")
    b = prepare(tmp_path_factory.mktemp("shapes_b"), "small")
    return a, _read_all(a), _read_all(b)


@pytest.fixture(scope="module")
def data_dir(built):
    return str(built[0].data_dir).split("/t2i_shapes/")[0]


@pytest.fixture(scope="module")
def data(built):
    return built[1]


def _all(data, splits=shapes.SPLITS):
    return [ex for split in splits for ex in data[split]]


def _objects(attrs: dict[str, int]) -> list[tuple[int, int, int, int]]:
    objs = [(attrs["shape"], attrs["color"], attrs["size"], attrs["position"])]
    if attrs["num_objects"] == 2:
        objs.append((attrs["shape2"], attrs["color2"], attrs["size2"], attrs["position2"]))
    return objs


def _phrase(shape: int, color: int, size: int, _position: int = -1) -> str:
    return f"a {shapes.SIZES[size]} {shapes.COLOR_NAMES[color]} {shapes.SHAPES[shape]}"


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centroid (x, y) in pixel units, pixel centres at i + 0.5."""
    ys, xs = np.indices(weights.shape)
    total = weights.sum()
    return float((weights * (xs + 0.5)).sum() / total), float((weights * (ys + 0.5)).sum() / total)


def _cell(x: float, y: float) -> int:
    return 3 * int(y // CELL) + int(x // CELL)


def _nearest_color(pixels: np.ndarray) -> int:
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return int(np.argmin(((shapes.COLOR_RGB.astype(np.float64) - mean) ** 2).sum(axis=1)))


def _components(image: np.ndarray) -> list[np.ndarray]:
    """Intensity maps (max channel) of each connected object in the image."""
    intensity = image.max(axis=-1).astype(np.float64)
    labels, n = ndimage.label(intensity > 0)
    return [np.where(labels == k, intensity, 0.0) for k in range(1, n + 1)]


# --- builder ---------------------------------------------------------------------------------


def test_split_sizes_match_config(built):
    builder, data, _ = built
    sizes = builder.builder_config.split_sizes()
    assert sizes == {"train": 512, "validation": 64, "test": 64, "compositional": 64}
    for split, n in sizes.items():
        assert builder.info.splits[split].num_examples == n
        assert len(data[split]) == n


def test_two_builds_are_identical(built):
    _, a, b = built
    for split in shapes.SPLITS:
        assert len(a[split]) == len(b[split])
        for ea, eb in zip(a[split], b[split], strict=True):
            assert ea["image"].dtype == np.uint8 and ea["image"].shape == (32, 32, 3)
            assert ea["image"].tobytes() == eb["image"].tobytes()
            assert ea["caption"] == eb["caption"]
            assert ea["attributes"] == eb["attributes"]


def test_records_are_make_example_in_order(built):
    builder, data, _ = built
    seed = builder.builder_config.seed
    for split in shapes.SPLITS:
        for i in (0, 1, len(data[split]) - 1):
            ref = shapes.make_example(seed, split, i)
            assert np.array_equal(data[split][i]["image"], ref["image"])
            assert data[split][i]["caption"] == ref["caption"]
            assert data[split][i]["attributes"] == {k: int(v) for k, v in ref["attributes"].items()}


def test_caption_comes_back_as_bytes_and_prepare_reuses(built, data_dir):
    builder = built[0]
    assert isinstance(builder.as_data_source("train")[0]["caption"], bytes)
    assert load_builder(data_dir, "small").is_prepared()
    assert not load_builder(data_dir, "default").is_prepared()
    records = sorted(Path(builder.data_dir).glob("*.array_record*"))
    stamps = [f.stat().st_mtime_ns for f in records]
    prepare(data_dir, "small")  # Already there: nothing is regenerated.
    assert [f.stat().st_mtime_ns for f in records] == stamps


# --- make_example ----------------------------------------------------------------------------


def test_make_example_is_deterministic_and_varies():
    a, b = shapes.make_example(3, "test", 7), shapes.make_example(3, "test", 7)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]
    images = {shapes.make_example(3, "test", i)["image"].tobytes() for i in range(50)}
    assert len(images) >= 45  # A few one-object scenes may repeat by chance, not most.
    assert shapes.make_example(0, "train", 0)["image"].tobytes() != a["image"].tobytes()
    other = {shapes.make_example(s, "train", 0)["caption"] for s in range(10)}
    assert len(other) > 5  # The seed matters.
    with pytest.raises(ValueError, match="unknown split"):
        shapes.make_example(0, "dev", 0)


def test_attributes_have_fixed_keys_and_valid_ranges(data):
    for ex in _all(data):
        attrs = ex["attributes"]
        assert tuple(sorted(attrs)) == tuple(sorted(shapes.ATTRIBUTE_KEYS))
        two = attrs["num_objects"] == 2
        assert attrs["num_objects"] in (1, 2)
        assert 0 <= attrs["position"] < 9
        templates = shapes.TWO_OBJECT_TEMPLATES if two else shapes.ONE_OBJECT_TEMPLATES
        assert 0 <= attrs["template"] < len(templates)
        for key in ("shape2", "color2", "size2", "position2", "relation"):
            assert (attrs[key] >= 0) == two, (key, attrs)
        if two:  # The two objects are nameable apart.
            assert (attrs["shape"], attrs["color"]) != (attrs["shape2"], attrs["color2"])


# --- compositional hold-out ------------------------------------------------------------------


def test_held_out_pairs_only_in_compositional(data):
    held = {(shapes.SHAPES.index(s), shapes.COLOR_NAMES.index(c)) for s, c in shapes.HELD_OUT}
    for ex in _all(data, ("train", "validation", "test")):
        for shape, color, _, _ in _objects(ex["attributes"]):
            assert (shape, color) not in held, ex["caption"]
    for ex in data["compositional"]:
        pairs = {(shape, color) for shape, color, _, _ in _objects(ex["attributes"])}
        assert pairs & held, ex["caption"]
    # And captions agree: no held-out phrase in the training captions.
    for ex in data["train"]:
        for shape, color in shapes.HELD_OUT:
            assert f"{color} {shape}" not in ex["caption"]


# --- captions --------------------------------------------------------------------------------


def test_captions_are_clean_ascii(data):
    for ex in _all(data):
        c = ex["caption"]
        assert c.isascii() and c == c.lower() and c == " ".join(c.split()), repr(c)
        assert c[-1].isalpha(), repr(c)


def test_caption_names_object_attributes(data):
    for ex in _all(data):
        attrs, c = ex["attributes"], ex["caption"]
        for shape, color, size, _ in _objects(attrs):
            assert shapes.SHAPES[shape] in c and shapes.COLOR_NAMES[color] in c, c
            assert shapes.SIZES[size] in c and _phrase(shape, color, size) in c, c
        if attrs["num_objects"] == 1:
            # "top" is inside "top left": the longest position name found is the one meant.
            found = max((p for p in shapes.POSITIONS if p in c), key=len)
            assert found == shapes.POSITIONS[attrs["position"]], c


def test_two_object_caption_states_the_relation(data):
    """Reads the relation back from the caption, whichever way round it is phrased."""
    for ex in _all(data):
        attrs, c = ex["attributes"], ex["caption"]
        if attrs["num_objects"] != 2:
            continue
        p1, p2 = (_phrase(*obj) for obj in _objects(attrs))
        first_is_1 = c.index(p1) < c.index(p2)
        if shapes.RELATIONS[attrs["relation"]] == "left of":
            assert "above" not in c and "below" not in c, c
        else:
            assert "left" not in c and "right" not in c, c
        # "B with A to its left / above it", "B to the right of / below A".
        if any(w in c for w in ("to its left", "above it", "to the right of", "below")):
            assert not first_is_1, c
        else:  # "A to the left of / above B".
            assert ("to the left of" in c or "above" in c) and first_is_1, c


def test_templates_are_varied(data):
    for n, templates in ((1, shapes.ONE_OBJECT_TEMPLATES), (2, shapes.TWO_OBJECT_TEMPLATES)):
        used = {
            ex["attributes"]["template"]
            for ex in data["train"]
            if ex["attributes"]["num_objects"] == n
        }
        assert len(used) >= 3 and len(templates) >= 3
    counts = np.bincount([ex["attributes"]["num_objects"] for ex in data["train"]])
    assert 0.35 < counts[1] / counts.sum() < 0.65  # About half of each.


# --- rendered content ------------------------------------------------------------------------


def test_object_pixels_match_attributes(data):
    """Colour, position (centroid's grid cell) and, for pairs, the relation, from pixels alone."""
    for ex in _all(data):
        attrs, image = ex["attributes"], ex["image"]
        objs = _objects(attrs)
        comps = _components(image)
        assert len(comps) == len(objs), ex["caption"]  # Separate and unclipped.
        centroids = [_centroid(w) for w in comps]
        if len(objs) == 2:  # Order components along the relation's axis.
            axis = 0 if shapes.RELATIONS[attrs["relation"]] == "left of" else 1
            order = np.argsort([cen[axis] for cen in centroids])
            comps, centroids = [comps[k] for k in order], [centroids[k] for k in order]
            assert centroids[0][axis] < centroids[1][axis]
        for (_, color, _, position), weights, (x, y) in zip(objs, comps, centroids, strict=True):
            bright = weights >= 0.9 * weights.max()  # Fully covered pixels, not AA edges.
            assert _nearest_color(image[bright]) == color, ex["caption"]
            assert _cell(x, y) == position, ex["caption"]


def test_large_objects_cover_more_than_small(data):
    areas: dict[tuple[int, int], list[float]] = {}
    for ex in _all(data):
        attrs = ex["attributes"]
        if attrs["num_objects"] == 1:
            rgb = shapes.COLOR_RGB[attrs["color"]].astype(np.float64)
            coverage = (ex["image"].astype(np.float64) @ rgb / (rgb @ rgb)).sum()
            areas.setdefault((attrs["shape"], attrs["size"]), []).append(coverage)
    for shape in range(len(shapes.SHAPES)):
        assert max(areas[shape, 0]) < min(areas[shape, 1])


def test_triangles_point_up_and_shapes_differ():
    def rows_and_area(shape: int) -> tuple[np.ndarray, float]:
        intensity = shapes.render([(shape, 0, 1, 4)]).max(axis=-1).astype(np.float64) / 255
        return intensity.sum(axis=1), intensity.sum()

    tri_rows, tri_area = rows_and_area(shapes.SHAPES.index("triangle"))
    lit = np.flatnonzero(tri_rows > 0.5)
    assert tri_rows[lit[0]] < tri_rows[lit[-1]]  # Narrow at the top, wide at the bottom.
    _, circle_area = rows_and_area(shapes.SHAPES.index("circle"))
    _, square_area = rows_and_area(shapes.SHAPES.index("square"))
    assert tri_area < circle_area < square_area  # 98 < 154 < 196 px^2 at half-extent 7.


def test_shapes_fit_in_every_cell_unclipped():
    """Area equals the analytic area at all 9 positions: nothing is clipped at the border."""
    for shape, name in enumerate(shapes.SHAPES):
        for size, r in enumerate(shapes.HALF_EXTENT):
            expected = {"circle": np.pi * r * r, "square": 4 * r * r, "triangle": 2 * r * r}[name]
            for position in range(len(shapes.POSITIONS)):
                image = shapes.render([(shape, 0, size, position)])
                area = image.max(axis=-1).astype(np.float64).sum() / 255
                assert area == pytest.approx(expected, rel=0.03), (name, size, position)


@pytest.mark.parametrize("size", [64, 256])
def test_larger_renders_are_the_same_scene_scaled(size):
    """At `size` px the scene, caption and attributes are the 32 px ones; each object's
    area scales by (size / 32)^2 and its centroid by size / 32 (within anti-aliasing)."""
    scale = size / shapes.IMAGE_SIZE
    small = shapes.make_example(0, "train", 3)
    large = shapes.make_example(0, "train", 3, image_size=size)
    assert large["image"].shape == (size, size, 3) and large["image"].dtype == np.uint8
    assert large["caption"] == small["caption"]
    assert large["attributes"] == small["attributes"]
    for shape in range(len(shapes.SHAPES)):
        for size_index in range(len(shapes.SIZES)):
            a = shapes._coverage(shape, size_index, 4)
            b = shapes._coverage(shape, size_index, 4, size)
            np.testing.assert_allclose(b.sum() / scale**2, a.sum(), rtol=0.01)
            ca = np.array(ndimage.center_of_mass(a)) + 0.5  # pixel centres
            cb = np.array(ndimage.center_of_mass(b)) + 0.5
            np.testing.assert_allclose(cb / scale, ca, atol=0.05)


def test_image_size_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        shapes.make_example(0, "train", 0, image_size=50)


def test_sized_configs_are_named_as_the_presets_name_them(tmp_path):
    from t2i_jax import presets
    from t2i_jax.data import sources
    from t2i_jax.errors import DataError

    names = {c.name: c.image_size for c in T2iShapes.BUILDER_CONFIGS}
    for base in ("default", "small"):
        for size in (32, 64, 128, 256):
            assert names[presets.shapes_variant(base, size)] == size
    data = presets.shapes_data("test", image_size=64)
    assert data.variant == "small_64px"
    data.dir = str(tmp_path)
    builder = sources.prepare_for_run(data)
    assert builder.as_data_source("validation")[0]["image"].shape == (64, 64, 3)
    data.image_size = 32
    with pytest.raises(DataError, match=r"has 64x64 images, the config has data.image_size=32"):
        sources.prepare_for_run(data)
