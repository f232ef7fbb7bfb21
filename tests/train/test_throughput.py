"""The FLOPs that MFU counts and the peaks it divides by."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.train import throughput


def test_step_flops_are_xla_cost_analysis_of_the_program():
    """A matmul of [m, k] by [k, n] costs 2mkn FLOPs; a batch of them B times that."""
    m, k, n, b = 64, 32, 16, 3
    a, w = jnp.ones((b, m, k)), jnp.ones((k, n))
    lowered = jax.jit(lambda a, w: jnp.sum(jnp.tanh(a @ w))).lower(a, w)
    flops = throughput.step_flops(lowered)
    # The matmul's 2bmkn plus a FLOP or so per element of the tanh and the sum.
    assert 2 * b * m * k * n <= flops <= 2 * b * m * k * n + 4 * b * m * n


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
    ],
)
def test_accelerator_peaks_come_from_the_table(kind, peak):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert throughput.device_peak(device)[0] == peak


def test_cpu_peak_is_measured_and_unknown_devices_give_nan():
    peak, source = throughput.device_peak(jax.devices()[0])
    assert peak > 1e8 and "measured" in source  # 8 simulated devices share the CPU
    unknown, _ = throughput.device_peak(types.SimpleNamespace(platform="gpu", device_kind="X"))
    assert np.isnan(unknown)


def test_throughput_over_an_interval():
    meter = throughput.Throughput(
        batch_size=32, flops_per_step=8e12, num_devices=8, peak_per_device=1e12
    )
    for _ in range(4):
        meter.step()
    perf = meter.measure()
    assert perf["images_per_sec"] == pytest.approx(32 * perf["steps_per_sec"])
    assert perf["tflops_per_device"] == pytest.approx(perf["steps_per_sec"])  # 1 TFLOP/step/dev
    assert perf["mfu"] == pytest.approx(perf["tflops_per_device"])
