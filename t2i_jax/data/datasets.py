"""The data set table: `data.name` -> its TFDS builder class (array_record, no TensorFlow).

A new data set is one builder module and one line here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from t2i_jax.config import choose
from t2i_jax.errors import ConfigError


def _t2i_shapes():
    from t2i_jax.data.shapes_builder import T2iShapes

    return T2iShapes


def _digits():
    from t2i_jax.data.digits_builder import Digits

    return Digits


# Loaders import on use, so `t2i --help` does not import every builder.
DATASETS: dict[str, Callable[[], Any]] = {
    "t2i_shapes": _t2i_shapes,
    "digits": _digits,
}


# Public TFDS data sets the user prepares with TFDS (`data/public.py`).
PUBLIC_DATASETS = ("imagenet2012", "coco_captions")


def imported_path(name: str, data_dir: str) -> str:
    """Where `t2i data import --name NAME --data-dir DIR` puts a data set."""
    return os.path.join(os.path.expanduser(data_dir), name)


def is_imported(name: str, data_dir: str) -> bool:
    return (
        name not in DATASETS
        and name not in PUBLIC_DATASETS
        and os.path.isfile(os.path.join(imported_path(name, data_dir), "dataset_info.json"))
    )


def check_name(name: str, data_dir: str) -> None:
    """A built-in data set, or one imported under `data_dir`; else one clear line."""
    if name not in DATASETS and name not in PUBLIC_DATASETS and not is_imported(name, data_dir):
        raise ConfigError(
            f"unknown data.name {name!r}: not built in ({', '.join(DATASETS)}), not a public "
            f"TFDS set ({', '.join(PUBLIC_DATASETS)}) and not "
            f"imported at {imported_path(name, data_dir)} (t2i data import SRC --name {name} "
            f"--data-dir {data_dir})"
        )


def builder_class(name: str) -> Any:
    return choose(DATASETS, name, "data.name")()
