"""The Python API: a trained run as a text-to-image function.

    import t2i_jax
    pipe = t2i_jax.Pipeline.from_workdir("runs/demo")
    images = pipe(["a large red circle in the center"], num=4, seed=0, guidance=3.0)
    images[0].save("red_circle.png")

Works for every family; the keyword options are the family's declared sample options
(`pipe.sample_options`; None or absent: the run's config). Same run, prompts, num, seed
and options -> the same images, the ones `t2i sample` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from t2i_jax.errors import UserError
from t2i_jax.methods.base import SampleOption
from t2i_jax.runs.loading import Run, load_run
from t2i_jax.runs.sampling import Sampler, make_sampler, sample_images
from t2i_jax.text.prompts import check_prompts


class Pipeline:
    """Samples a loaded run's EMA parameters; compiles once per set of options."""

    def __init__(self, run: Run):
        self.run = run
        self._samplers: dict[tuple, Sampler] = {}

    @classmethod
    def from_workdir(cls, workdir: str, compute_dtype: str | None = None) -> Pipeline:
        """The run's latest checkpoint (a finished run, or one still training), computing
        in `compute_dtype` ("float32" | "bfloat16"; None: as the run trained)."""
        return cls(load_run(workdir, compute_dtype))

    @property
    def sample_options(self) -> tuple[SampleOption, ...]:
        return self.run.method.sample_options

    def defaults(self) -> dict[str, Any]:
        """Each sample option's value from the run's config."""
        return self.run.method.sample_defaults(self.run.config)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num: int = 1,
        seed: int = 0,
        output: str = "pil",
        **options,
    ) -> list[Image.Image] | np.ndarray:
        """`num` images per prompt from the key `jax.random.key(seed)`.

        output="pil": a list of PIL images, prompt by prompt (num of each in turn);
        output="numpy": uint8 [len(prompts), num, H, W, 3].
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompt given")
        check_prompts(prompts, self.run.tokenizer)
        if num < 1:
            raise UserError(f"num must be at least 1, got {num}")
        if output not in ("pil", "numpy"):
            raise UserError(f"output must be 'pil' or 'numpy', got {output!r}")
        options = {k: v for k, v in options.items() if v is not None}
        key = tuple(sorted(options.items()))
        if key not in self._samplers:
            self._samplers[key] = make_sampler(self.run.method, **options)
        images = sample_images(
            self._samplers[key],
            self.run.state.ema_params,
            self.run.frozen,
            self.run.tokenizer,
            prompts,
            per_prompt=num,
            rng=jax.random.key(seed),
            max_len=self.run.config.text.max_len,
        )
        if output == "numpy":
            return images
        return [Image.fromarray(image) for row in images for image in row]
