"""Effective receptive field (analyze/erf.py): the method on a model whose ERF is known exactly."""
import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

from analyze import common, erf


def _positive_conv_stack(layers):
    """3x3 convs (stride 1, padding 1) with positive weights: the receptive field of the central
    output is exactly the (2 * layers + 1)-pixel square, and every gradient inside it is positive."""
    convs = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(layers)])
    with torch.no_grad():
        for conv in convs:
            conv.weight.uniform_(0.1, 1.0)
            conv.bias.fill_(1.0)  # keeps the central feature positive, so its ReLU passes the gradient
    return convs


def test_erf_of_a_conv_stack_is_its_receptive_field():
    size, layers = 21, 3
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    heatmap, used = erf.erf_map(_positive_conv_stack(layers), images, torch.device("cpu"))
    assert used == 2 and heatmap.shape == (size, size)
    center, reach = size // 2, layers
    inside = np.zeros_like(heatmap, dtype=bool)
    inside[center - reach:center + reach + 1, center - reach:center + reach + 1] = True
    assert (heatmap[inside] > 0).all() and (heatmap[~inside] == 0).all()
    squares = erf.central_squares(erf.log_scaled(heatmap))
    assert [square["side"] for square in squares][-1] == 2 * reach + 1
    assert all(a["side"] <= b["side"] for a, b in zip(squares, squares[1:]))


def test_central_squares_on_a_handmade_map():
    data = np.zeros((9, 9))
    data[4, 4] = 30.0                      # side 1 holds 30 %
    data[3:6, 3:6] += np.where(data[3:6, 3:6] == 0, 2.5, 0)      # the ring of side 3 adds 20 %
    ring5 = np.zeros((9, 9), dtype=bool)
    ring5[2:7, 2:7] = True
    ring5[3:6, 3:6] = False
    data[ring5] = 50.0 / ring5.sum()       # the ring of side 5 adds the last 50 %
    squares = erf.central_squares(data)
    assert [(s["threshold"], s["side"]) for s in squares] == [(0.2, 1), (0.3, 1), (0.5, 3), (0.99, 5)]
    assert squares[-1]["area_ratio"] == pytest.approx(25 / 81)


def test_erf_command_writes_heatmaps_and_a_table(tmp_path):
    erf.main(["--model", "resnet18", "--random-images", "--num-images", "1", "--img-size", "32",
              "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "erf.png").stat().st_size > 1000
    heatmap = np.load(tmp_path / "erf_resnet18_random_init.npy")
    assert heatmap.shape == (32, 32) and heatmap.max() > 0
    with open(tmp_path / "erf.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    sides = [int(row[f"side_{p}"]) for p in (20, 30, 50, 99)]
    ratios = [float(row[f"area_ratio_{p}"]) for p in (20, 30, 50, 99)]
    assert sides == sorted(sides) and all(side % 2 == 1 and side <= 33 for side in sides)
    assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] <= 1
    assert row["images"] == "1"


def test_last_stage_features_of_a_channel_last_vmamba_are_channel_first():
    models = pytest.importorskip("classification.models")
    torch.manual_seed(0)
    model = models.vanilla_vmamba_tiny(depths=(1, 1, 1, 1)).eval()  # channel-last ("ln") layout
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = common.last_stage_features(model, images)
        expected = model.forward_features(images).permute(0, 3, 1, 2)
    assert features.shape == (1, 768, 2, 2)
    torch.testing.assert_close(features, expected)
