"""A run's frozen weights, stored once per run in `<workdir>/frozen/`.

Frozen networks (a frozen pretrained text encoder, latent diffusion's autoencoder, the
VQ-VAE's perceptual network) are not trained, so they are neither in the train state nor
in any checkpoint: the first time a run starts, the method's `load_frozen()` reads them
from where the config points, and the store writes them here, one safetensors file per
network with its sha256 (`text.setup.params_digest`) in `digests.json`. Every later start,
resume, sample or evaluation reads the run's own copy and checks each file against its
digest, and a frozen text encoder's digest against the one the run recorded when it
started (`text_encoder/weights.sha256`).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from t2i_jax.errors import CheckpointError, writing
from t2i_jax.methods.base import Frozen, Method
from t2i_jax.text.setup import params_digest

DIRNAME = "frozen"
DIGESTS = "digests.json"


def _path(workdir: str) -> str:
    return os.path.join(workdir, DIRNAME)


def exists(workdir: str) -> bool:
    return os.path.isfile(os.path.join(_path(workdir), DIGESTS))


def save(workdir: str, frozen: Frozen) -> None:
    """Writes the store under a temporary name and renames it into place, so a killed
    save leaves either no store or a whole one."""
    final = _path(workdir)
    with writing(final):
        _save(final, frozen)


def _save(final: str, frozen: Frozen) -> None:
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    digests = {}
    for name, params in frozen.items():
        host = jax.tree.map(np.asarray, params)
        flat = traverse_util.flatten_dict(host, sep="/")
        save_file(
            {k: np.ascontiguousarray(v) for k, v in flat.items()}, f"{tmp}/{name}.safetensors"
        )
        digests[name] = params_digest(host)
    with open(os.path.join(tmp, DIGESTS), "w") as f:
        json.dump(digests, f, indent=2, sort_keys=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load(workdir: str) -> Frozen:
    """The stored frozen params (host arrays), each checked against its digest."""
    where = _path(workdir)
    try:
        with open(os.path.join(where, DIGESTS)) as f:
            digests = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the frozen weights' digests in {where}: {e}") from None
    frozen = {}
    for name, digest in digests.items():
        path = os.path.join(where, f"{name}.safetensors")
        try:
            params = traverse_util.unflatten_dict(load_file(path), sep="/")
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read frozen weights {path}: {e}") from None
        if params_digest(params) != digest:
            raise CheckpointError(f"frozen weights {path} do not match their digest ({DIGESTS})")
        frozen[name] = params
    return frozen


def load_or_create(workdir: str, method: Method, *, write: bool) -> Frozen:
    """The run's frozen params: its store if it has one (checked), else the method's
    `load_frozen()`, which the primary process stores when `write` (a training start);
    every process keeps the copy it read, so nothing is read back."""
    if exists(workdir):
        frozen = load(workdir)
        _check_text_encoder(workdir, method, frozen)
        return frozen
    frozen = method.load_frozen()
    if frozen and write and jax.process_index() == 0:
        save(workdir, frozen)
    return frozen


def _check_text_encoder(workdir: str, method: Method, frozen: Frozen) -> None:
    """A frozen encoder's stored weights are the ones the run recorded when it started."""
    setup = method.text_setup
    if setup.frozen and setup.weights_digest:
        stored = params_digest(frozen.get("text_encoder", {}))
        if stored != setup.weights_digest:
            raise CheckpointError(
                f"{_path(workdir)}: the stored text encoder is not the one this run started "
                f"with (digest {stored[:12]}, the run recorded {setup.weights_digest[:12]})"
            )
