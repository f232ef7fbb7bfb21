"""Run logs: `metrics.jsonl` (one JSON object a line) and TensorBoard events (no TF)."""

from __future__ import annotations

import json
import math
import os

from tensorboardX import SummaryWriter

from t2i_jax.errors import UserError


class MetricWriter:
    """Writes scalars for process 0; metrics.jsonl holds deterministic values only."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = SummaryWriter(os.path.join(workdir, "tb")) if enabled else None

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`, so a resumed run's log equals an uninterrupted one's."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, float], *, tb_only: dict | None = None) -> None:
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise UserError(f"{name} is {value} at step {step}: training diverged")
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in {**scalars, **(tb_only or {})}.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
