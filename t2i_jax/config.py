"""Experiment configs: load `file.py[:variant]`, apply `KEY=VALUE` overrides, validate.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`
(big_vision style). Every error is a `ConfigError` with one line saying what and where.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from t2i_jax.errors import ConfigError

# Keys every experiment must define (the CLI and the trainer rely on them).
REQUIRED_KEYS = ("seed", "train.steps", "train.batch_size", "data.name", "method")


def call_file_function(spec: str, function: str, kind: str) -> Any:
    """`path/to/file.py[:arg]` -> the file's `function(arg)`; every failure a ConfigError.

    `kind` names the file in messages ("config", "sweep").
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{kind} file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_t2i_{kind}_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken file is the user's error: say where.
        raise ConfigError(f"cannot execute {kind} file {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, function):
        raise ConfigError(f"{kind} file {path} defines no {function}(arg)")
    try:
        return getattr(module, function)(arg or None)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: {function}({arg!r}) failed: {e}") from e
    except Exception as e:  # The file's own code failed: the user's error, say where.
        call = f"{function}({arg!r})" if arg else f"{function}()"
        raise ConfigError(f"{path}: {call} raised {type(e).__name__}: {e}") from e


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
    path = spec.partition(":")[0]
    config = call_file_function(spec, "get_config", "config")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"train.steps": 100, ...}: every leaf under its dotted key (lists as tuples)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _unknown_key_error(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    close = difflib.get_close_matches(key, list(flatten(config)), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Parses `text` to the type of the key's current value."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(
            f"config key '{key}' expects {type(current).__name__}, got {text!r}"
        ) from None
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(current)(value)
        if not isinstance(value, (dict, set)):  # `--k=8` for a 1-tuple.
            return type(current)((value,))
    raise ConfigError(f"config key '{key}' expects {type(current).__name__}, got {text!r}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `KEY=VALUE` strings in place; unknown keys and wrong types raise."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config override must be KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key_error(key, config)
            node = node[part]
        if leaf not in node:
            raise _unknown_key_error(key, config)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"config key '{key}' is a group; set one of its keys instead")
        with node.unlocked():
            node[leaf] = _parse_value(text, node[leaf], key)


def get_key(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config is missing the required key '{dotted}'")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every experiment needs and their basic ranges."""
    for key in REQUIRED_KEYS:
        get_key(config, key)
    if not isinstance(config.seed, int):
        raise ConfigError(f"config key 'seed' must be an int, got {config.seed!r}")
    for key in ("train.steps", "train.batch_size"):
        value = get_key(config, key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config key '{key}' must be a positive int, got {value!r}")
    for key, default, least in (
        ("max_consecutive_skips", 1, 1),
        ("probe_num", 0, 0),
        ("probe_sample_steps", 1, 1),
    ):
        value = config.train.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a positive int" if least else "an int >= 0"
            raise ConfigError(f"config key 'train.{key}' must be {kind}, got {value!r}")
    if config.train.get("probe_num", 0) and not config.train.get("eval_every", 0):
        raise ConfigError("train.probe_num needs train.eval_every > 0 (when to probe)")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def digest(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of the config's canonical JSON (keys sorted): equal configs, equal digests."""
    return hashlib.sha256(to_json(config).encode()).hexdigest()


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`; lists come back as tuples, as configs declare them."""

    def tuples(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        if isinstance(node, list):
            return tuple(tuples(v) for v in node)
        return node

    return ml_collections.ConfigDict(tuples(json.loads(text)))


def choose(table: dict[str, Any], name: str, key: str) -> Any:
    """`table[name]` of a registry table; an unknown name is a ConfigError listing the
    choices, raised before a run creates anything."""
    if name not in table:
        raise ConfigError(f"unknown {key} '{name}'; choose from {sorted(table)}")
    return table[name]
