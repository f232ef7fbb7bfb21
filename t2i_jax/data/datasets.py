"""The data set table: `data.name` -> its TFDS builder class (array_record, no TensorFlow).

A new data set is one builder module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from t2i_jax.config import choose


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


def builder_class(name: str) -> Any:
    return choose(DATASETS, name, "data.name")()
