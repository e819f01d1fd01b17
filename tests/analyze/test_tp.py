"""Throughput tool (analyze/tp.py) and the shared model plumbing (analyze/common.py), on the CPU."""
import csv
import json

import pytest
import torch
import torch.nn as nn

from analyze import common, tp


def test_tp_command_writes_the_table_and_the_scaleup_plot(tmp_path):
    tp.main(["--model", "resnet18", "--device", "cpu", "--batch-size", "2", "--warmup", "0", "--iters", "1",
             "--sizes", "32", "48", "--no-flops", "--out", str(tmp_path)])
    with open(tmp_path / "tp.csv") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == tp.csv_columns(tp.MODES)
    assert [int(row["img_size"]) for row in rows] == [32, 48]
    for row in rows:
        assert float(row["params_m"]) == pytest.approx(11.69, abs=0.01)
        for mode in tp.MODES:
            assert float(row[f"{mode}_img_s"]) > 0 and row[f"{mode}_batch"] == "2"
    saved = json.loads((tmp_path / "tp.json").read_text())
    assert saved["rows"][0]["gflops"] is None and saved["environment"]["batch_size"] == 2
    assert (tmp_path / "scaleup.png").stat().st_size > 1000


def test_batch_one_reports_latency(tmp_path, capsys):
    tp.main(["--model", "resnet18", "--device", "cpu", "--batch-size", "1", "--warmup", "0", "--iters", "3",
             "--sizes", "32", "--modes", "infer_fp32", "--no-flops", "--out", str(tmp_path)])
    with open(tmp_path / "tp.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["compile"] == "none" and row["infer_fp32_batch"] == "1"
    assert 0 < float(row["infer_fp32_median_ms"]) <= float(row["infer_fp32_p90_ms"])
    # img/s is the inverse of the mean step time, which lies between the fastest step and three times the median
    assert 1e3 / (3 * float(row["infer_fp32_median_ms"])) < float(row["infer_fp32_img_s"])
    out = capsys.readouterr().out
    assert "infer_fp32_median_ms" in out and "batch-1 latency, fp32:" not in out  # the table already has it


@pytest.mark.slow
def test_compile_flag_times_the_compiled_model(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tp.main(["--model", "test_vmamba", "--device", "cpu", "--batch-size", "1", "--warmup", "1", "--iters", "2",
             "--sizes", "32", "--modes", "infer_fp32", "train_amp", "--no-flops", "--compile", "default",
             "--out", str(tmp_path)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
    (row,) = json.loads((tmp_path / "tp.json").read_text())["rows"]
    assert row["compile"] == "default" and row["infer_fp32_median_ms"] > 0 and row["train_amp_median_ms"] > 0
    with pytest.raises(SystemExit):
        tp.parse_args(["--model", "resnet18", "--compile", "fast"])


class _RunsOutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than `limit`."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.linear = nn.Linear(3, 5)
        self.batches = []

    def forward(self, images):
        self.batches.append(images.shape[0])
        if images.shape[0] > self.limit:
            raise torch.OutOfMemoryError("pretend")
        return self.linear(images.mean((2, 3)))


@pytest.mark.parametrize("mode", tp.MODES)
def test_batch_is_halved_until_it_fits(mode):
    model = _RunsOutOfMemoryAbove(limit=3)
    result = tp.time_mode(model, mode, batch=16, img_size=4, device=torch.device("cpu"), warmup=1, iters=2,
                          amp_dtype=torch.bfloat16)
    assert result["batch"] == 2 and result["img_s"] > 0
    assert model.batches == [16, 8, 4, 2, 2, 2]


def test_bad_model_name_and_checkpoint_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(tp.main, ["--model", "convnext_tinny", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown model 'convnext_tinny'" in capsys.readouterr().err
    with pytest.raises(common.AnalyzeError, match="checkpoint not found"):
        common.model_specs(["resnet18", "resnet34"], ["none", str(tmp_path / "missing.pth")])
    with pytest.raises(common.AnalyzeError, match="2 models but 1 checkpoints"):
        common.model_specs(["resnet18", "resnet34"], ["x.pth"])
    checkpoint = tmp_path / "weights.pth"
    checkpoint.touch()
    assert common.model_specs(["resnet18", "resnet34"], ["none", str(checkpoint)]) == [
        common.ModelSpec("resnet18"), common.ModelSpec("resnet34", str(checkpoint))]


def test_flops_are_gflops_per_image():
    pytest.importorskip("fvcore")
    # fvcore counts ResNet-18 at 1.82 GFLOPs (multiply-adds) at 224 px
    assert tp.FlopCounter().gflops(common.build_model("resnet18"), 224, torch.device("cpu")) == pytest.approx(
        1.82, rel=0.01)
