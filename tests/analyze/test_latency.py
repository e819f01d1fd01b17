"""Batch-1 latency tool (analyze/latency.py) and its table in analyze/tp.py on the CPU."""
import csv

import torch

from analyze import latency, tp
from analyze.common import p90


def test_latency_command_writes_one_row_per_model(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        latency.main(["--model", "resnet18", "resnet34", "--device", "cpu", "--img-size", "32", "--threads", "1",
                      "--warmup", "1", "--iters", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "latency.csv") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == latency.COLUMNS
    assert [row["model"].split()[0] for row in rows] == ["resnet18", "resnet34"]
    for row in rows:
        assert row["img_size"] == "32" and row["threads"] == "1"
        assert 0 < float(row["median_ms"]) <= float(row["p90_ms"])
    assert "median_ms" in capsys.readouterr().out


def test_p90_is_the_nearest_rank():
    assert p90([5.0, 1.0, 3.0]) == 5.0
    assert p90(list(range(1, 11))) == 9
    assert p90([2.0]) == 2.0


def test_tp_on_the_cpu_prints_the_latency_table(tmp_path, capsys):
    tp.main(["--model", "resnet18", "--device", "cpu", "--batch-size", "2", "--warmup", "0", "--iters", "2",
             "--sizes", "32", "--modes", "infer_fp32", "--no-flops", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "batch-1 latency, fp32:" in out
    table = out.split("batch-1 latency, fp32:")[1]
    assert "median_ms" in table and "p90_ms" in table and "resnet18" in table
