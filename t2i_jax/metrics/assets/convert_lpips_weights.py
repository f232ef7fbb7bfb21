"""Convert the `lpips` package's v0.1 linear layers (.pth) to the safetensors files shipped here.

Run once, with lpips installed: `python -m t2i_jax.metrics.assets.convert_lpips_weights`.
The .pth files are read with the restricted unpickler (no torch needed); names, shapes and
float32 values are kept unchanged (`lin{k}.model.1.weight`, [1, C, 1, 1]).
"""

from __future__ import annotations

import importlib.util
import os

from safetensors.numpy import save_file

from t2i_jax.nets.torch_weights import load_state_dict

NETS = ("alex", "vgg", "squeeze")


def convert(out_dir: str) -> list[str]:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise SystemExit("the lpips package is not installed")
    source = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1")
    written = []
    for net in NETS:
        state = load_state_dict(os.path.join(source, f"{net}.pth"))
        target = os.path.join(out_dir, f"{net}.safetensors")
        save_file(state, target, metadata={"source": f"lpips 0.1.4 weights/v0.1/{net}.pth"})
        written.append(target)
    return written


if __name__ == "__main__":
    for path in convert(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lpips")):
        print(path)
