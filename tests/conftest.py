"""Test-wide set-up: tests marked `cuda` are skipped where no GPU is visible.

The tests are grouped by layer: kernels/ (selective scan, SS2D core, cross-scan, LayerNorm), models/ (the
networks, checkpoints, FLOPs), training/ (the classification trainer), mm/ (mmdet / mmseg), analyze/."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
