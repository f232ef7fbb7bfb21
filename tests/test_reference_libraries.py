"""The reference implementations that parity tests compare against import and work."""

import importlib

import numpy as np
import pytest


def test_torch_and_torchvision_are_the_pinned_pair():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.14.1"
    assert torchvision.__version__.split("+")[0] == "0.29.1"
    # A mismatched pair fails here with "operator torchvision::nms does not exist".
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50, 50, 60, 60]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    np.testing.assert_array_equal(keep.numpy(), [0, 2])


@pytest.mark.parametrize(
    "module",
    [
        "pytorch_fid.inception",
        "lpips",
        "torchmetrics",
        "pytorch_msssim",
        "sentence_transformers",
        "skimage.metrics",
        "sklearn.feature_extraction.text",
    ],
)
def test_reference_module_imports(module):
    assert importlib.import_module(module) is not None
