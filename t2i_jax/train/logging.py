"""Run logs: `metrics.jsonl` (one JSON object a line) and TensorBoard events (no TF)."""

from __future__ import annotations

import json
import math
import os

from t2i_jax.errors import UserError, writing
from t2i_jax.train.tensorboard import EventWriter

PERF = "perf"  # the row key of a log row's timings (train/throughput.py)


class MetricWriter:
    """Writes scalars for process 0. A row's deterministic values are top-level keys; its
    timings (images/s, TFLOP/s, MFU), which differ between two runs of the same config,
    sit under "perf", which `read_metrics` leaves out unless asked."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            with writing(os.path.join(workdir, "tb")):
                self._tb = EventWriter(os.path.join(workdir, "tb"))

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`, so a resumed run's log equals an uninterrupted one's."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with writing(self.path):  # the log is rewritten: reading it is part of that
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, float], *, perf: dict | None = None) -> None:
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise UserError(f"{name} is {value} at step {step}: training diverged")
        if not self.enabled:
            return
        perf = {k: v for k, v in (perf or {}).items() if math.isfinite(v)}  # NaN: unknown peak
        row = {"step": step, **scalars, **({PERF: perf} if perf else {})}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = {**scalars, **{f"{PERF}/{k}": v for k, v in perf.items()}}
        with writing(self._tb.path):
            self._tb.scalars(step, tb)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def last_perf(records: list[dict], name: str) -> float | None:
    """The last logged timing `name` of rows read with `perf=True` (e.g. a run's minutes
    so far), or None."""
    values = [r[PERF][name] for r in records if name in r.get(PERF, {})]
    return values[-1] if values else None


def read_metrics(workdir: str, *, perf: bool = False) -> list[dict]:
    """The log's rows; with `perf`, their timings too."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not perf:
        for row in rows:
            row.pop(PERF, None)
    return rows
