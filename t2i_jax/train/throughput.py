"""Training throughput: images/s, achieved TFLOP/s per device, and model FLOPs
utilisation (MFU) against the device's dense peak.

The FLOPs of one step are XLA's cost analysis of the compiled train step (per device, as
partitioned), so they count what the step computes: the forward and backward passes of
every player, rematerialised recomputation included. MFU = achieved / peak.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) peak FLOP/s per device, for the 16-bit matmul dtypes, by a substring
# of `jax.Device.device_kind`, most specific first. Sources: NVIDIA H100 Tensor Core GPU
# datasheet (H100 SXM BF16 989.4 TFLOPS, H100 PCIe 756 TFLOPS, without sparsity); NVIDIA
# A100 datasheet (BF16 312 TFLOPS); Google Cloud TPU system architecture pages (v4 275,
# v5e 197, v5p 459, v6e Trillium 918 TFLOPS bf16 per chip).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Achieved float32 FLOP/s of a square matmul on the first device: the CPU's peak."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def device_peak(device: jax.Device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.platform == "cpu":
        # Simulated CPU devices share the cores: the whole CPU's matmul rate, split.
        count = len([d for d in jax.local_devices() if d.platform == "cpu"])
        return measured_matmul_peak() / count, "float32 matmul measured at start-up"
    for kind, flops in PEAK_FLOPS:
        if kind.lower() in device.device_kind.lower():
            return flops, f"{kind} bf16 dense (datasheet)"
    return float("nan"), f"unknown device {device.device_kind!r}"


def step_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of one call of a lowered (not yet compiled) step, from XLA's cost analysis of
    its HLO (the whole computation, all devices), or NaN if the backend gives none."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else float("nan")


@dataclasses.dataclass
class Throughput:
    """Images/s, TFLOP/s per device and MFU over the steps since the last `measure`."""

    batch_size: int
    flops_per_step: float  # all devices together
    num_devices: int
    peak_per_device: float
    _start: float = dataclasses.field(default_factory=time.perf_counter)
    _steps: int = 0

    def step(self) -> None:
        self._steps += 1

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._start, 1e-9)
        steps, self._steps, self._start = self._steps, 0, now
        flops_per_device = self.flops_per_step * steps / seconds / self.num_devices
        return {
            "steps_per_sec": steps / seconds,
            "images_per_sec": self.batch_size * steps / seconds,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_per_device / self.peak_per_device,
        }
