"""FLOP counting: the scan rule of mamba issue #110 (VMamba's) is applied per SS2D, VMamba-T matches the
paper's GFLOPs, and the analyze/flops.py CLI prints params and GFLOPs as JSON on its last line."""
import json
import math
import pathlib
import runpy
import sys

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

import classification.models as models
from classification.models import VSSM
from classification.models.flops import count_flops, count_params, flop_handlers

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_scan_counted_by_the_mamba_rule():
    dims, depths, N, ratio = 8, (1, 1, 2, 1), 2, 2.0
    model = VSSM(dims=dims, depths=depths, ssm_d_state=N, ssm_ratio=ratio, forward_type="v05_noz",
                 norm_layer="ln2d", downsample_version="v3", patchembed_version="v2", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 48)
    total = count_flops(model, x)
    without_scan = {op: h for op, h in flop_handlers().items() if op != "selective_scan::fwd"}
    with torch.no_grad():
        rest = FlopCountAnalysis(model, (x,)).set_op_handle(**without_scan)
        rest.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        rest = rest.total()
    expected_scan = 0
    H, W = 16, 12
    for i, depth in enumerate(depths):
        KD = 4 * int(ratio * dims * 2 ** i)
        L = math.ceil(H / 2 ** i) * math.ceil(W / 2 ** i)
        expected_scan += depth * (9 * L * KD * N + L * KD)
    assert total - rest == expected_scan
    assert model.training is False


def test_vmamba_tiny_gflops_match_paper():
    model = models.vmamba_tiny_s1l8()
    gflops = count_flops(model, torch.randn(1, 3, 224, 224)) / 1e9
    assert gflops == pytest.approx(4.906, rel=0.005)
    assert count_params(model) == 30_249_064


def test_cli_json_last_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["flops.py", "--model", "vmamba_tiny_s1l8", "--size", "64", "96", "--json"])
    runpy.run_path(str(REPO / "analyze" / "flops.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["model"] == "vmamba_tiny_s1l8" and result["params"] == 30_249_064
    assert result["size"] == [64, 96] and 0 < result["gflops"] < 4.906 * 64 * 96 / 224 ** 2 * 1.2


@pytest.mark.slow
def test_cli_counts_the_whole_detector_from_its_config(capsys, monkeypatch):
    """Mask R-CNN VMamba-T at the authors' (3, 1280, 800): 271G FLOPs, 50M params (their table)."""
    config = str(REPO / "detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py")
    monkeypatch.setattr(sys, "argv", ["flops.py", "--config", config, "--json"])
    runpy.run_path(str(REPO / "analyze" / "flops.py"), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["size"] == [1280, 800]
    assert result["gflops"] == pytest.approx(271, rel=0.005)
    assert result["params"] == pytest.approx(50e6, rel=0.01)


@pytest.mark.cuda
def test_counts_the_same_on_cuda_as_on_cpu():
    """A jit trace on CUDA must not hand traced sizes to the Triton cross-scan (it traces torch ops)."""
    model = VSSM(dims=8, depths=(1, 1, 1, 1), ssm_d_state=1, ssm_ratio=1.0, forward_type="v05_noz",
                 norm_layer="ln2d", downsample_version="v3", patchembed_version="v2", num_classes=3).eval()
    x = torch.randn(2, 3, 40, 56)
    on_cpu = count_flops(model, x)
    assert count_flops(model.cuda(), x.cuda()) == on_cpu
