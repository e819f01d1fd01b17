"""Throughput, peak memory, parameters and FLOPs of image classifiers, and the scale-up study.

The protocol of the paper's throughput columns (arXiv 2401.10166, as the authors' classification/main.py
`throughput` measures it): inference is model.eval() under no_grad in fp32 (no autocast),
batch 128, 50 warm-up then 30 timed forwards between CUDA synchronizes; the same under autocast
gives the AMP column. Training is model.train() under autocast: forward, cross-entropy, backward,
no optimizer step. A batch that runs out of memory is halved and retried (the batch used is recorded).
At batch 1 each step is also timed on its own (waited for), giving the latency columns (median and p90 ms).
--compile runs the models through torch.compile (FLOPs are counted on the uncompiled model; the warm-up
steps absorb the compilation, so keep --warmup at a few steps at least).

    python analyze/tp.py --model vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 convnext_tiny
    python analyze/tp.py --model vmamba_tiny_s1l8 --batch-size 32 --sizes 224 288 384 512 640 768 1024
    python analyze/tp.py --model vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 --batch-size 1 --iters 100 \
        --modes infer_amp --compile reduce-overhead                                  # batch-1 latency, compiled
    python analyze/tp.py --model resnet18 --device cpu --batch-size 2 --warmup 1 --iters 2   # smoke run

Writes tp.csv and tp.json (and scaleup.png with several sizes) under --out.
"""
import argparse
import gc
import json
import math
import platform
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from analyze import latency
from analyze.common import (ModelSpec, add_common_args, count_params, format_table, model_specs,
                            p90, prepare_model, prepare_out_dir, report_outputs, resolve_device, run_cli,
                            timed_call, write_csv)

MODES = ("infer_fp32", "infer_amp", "train_amp")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
GIB = 2 ** 30


# ----------------------------------------------------------------------------- measuring
def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else math.nan


def _step_fn(model: nn.Module, mode: str, images: torch.Tensor, amp_dtype: torch.dtype):
    """One forward (inference) or forward + loss + backward (training) for the given mode."""
    autocast = torch.autocast(images.device.type, dtype=amp_dtype, enabled=mode != "infer_fp32")
    if mode == "train_amp":
        model.train()
        # Class 0 is valid for any head width; the label values do not change the cost.
        targets = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

        def step():
            with autocast:
                loss = F.cross_entropy(model(images), targets)
            loss.backward()
            # No optimizer step: dropping the gradients keeps memory steady from one step to the next.
            model.zero_grad(set_to_none=True)
        return step

    model.eval()

    def step():
        with torch.no_grad(), autocast:
            model(images)
    return step


def _time_batch(model: nn.Module, mode: str, batch: int, img_size: int, device: torch.device,
                warmup: int, iters: int, amp_dtype: torch.dtype) -> Dict[str, float]:
    _reset_peak_memory(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    step = _step_fn(model, mode, images, amp_dtype)
    for _ in range(warmup):
        step()
    _synchronize(device)
    if batch == 1:  # latency: every step waited for on its own
        step_ms = [timed_call(step, device) * 1e3 for _ in range(iters)]
        return {"img_s": 1e3 * iters / sum(step_ms), "mem_gib": _peak_memory_gib(device), "batch": batch,
                "median_ms": statistics.median(step_ms), "p90_ms": p90(step_ms)}
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return {"img_s": batch * iters / elapsed, "mem_gib": _peak_memory_gib(device), "batch": batch,
            "median_ms": math.nan, "p90_ms": math.nan}


def time_mode(model: nn.Module, mode: str, batch: int, img_size: int, device: torch.device,
              warmup: int, iters: int, amp_dtype: torch.dtype) -> Dict[str, float]:
    """img/s and peak memory of one mode; on out-of-memory the batch is halved until it fits."""
    while True:
        try:
            return _time_batch(model, mode, batch, img_size, device, warmup, iters, amp_dtype)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # Retried outside the except block: the failed attempt's tensors, which its traceback keeps
        # alive, are released first.
        model.zero_grad(set_to_none=True)
        print(f"  {mode} at batch {batch} ran out of memory; retrying with batch {batch // 2}")
        batch //= 2


class FlopCounter:
    """GFLOPs per image through classification.models.flops (fvcore with the scan rule).

    Where that cannot be imported (e.g. fvcore is not installed) the FLOPs are reported as NaN,
    with one warning, rather than losing the throughput numbers.
    """

    def __init__(self):
        try:
            from classification.models.flops import count_flops
        except Exception as error:
            warnings.warn(f"FLOPs not counted: importing classification.models.flops failed: {error!r}")
            count_flops = None
        self._count_flops = count_flops

    def gflops(self, model: nn.Module, img_size: int, device: torch.device) -> float:
        if self._count_flops is None:
            return math.nan
        return self._count_flops(model, torch.randn(1, 3, img_size, img_size, device=device)) / 1e9


def benchmark(specs: Sequence[ModelSpec], sizes: Sequence[int], batch: int, modes: Sequence[str],
              device: torch.device, warmup: int, iters: int, amp_dtype: torch.dtype,
              num_classes: int = 1000, count_flops: bool = True, compile_mode: str = "none") -> List[dict]:
    """One row per (model, size): params, GFLOPs, and img/s, peak memory, batch and (at batch 1) latency per
    mode, of the model run eagerly or through torch.compile(mode=compile_mode)."""
    flop_counter = FlopCounter() if count_flops else None
    rows = []
    jobs = [(spec, size) for spec in specs for size in sizes]
    for spec, size in tqdm(jobs, desc="models x sizes", unit="run"):
        model = prepare_model(spec, device, num_classes=num_classes, img_size=size)
        row = {"model": spec.label, "compile": compile_mode, "img_size": size,
               "params_m": count_params(model) / 1e6,
               "gflops": flop_counter.gflops(model, size, device) if flop_counter else math.nan}
        # Static shapes: each size builds its own model, and a halved batch recompiles rather than going symbolic
        runner = model if compile_mode == "none" else torch.compile(model, mode=compile_mode, dynamic=False)
        for mode in modes:
            result = time_mode(runner, mode, batch, size, device, warmup, iters, amp_dtype)
            row.update({f"{mode}_{key}": value for key, value in result.items()})
            tqdm.write(f"  {spec.label} @ {size}: {mode} {result['img_s']:.1f} img/s "
                       f"(batch {result['batch']}, peak {result['mem_gib']:.2f} GiB)")
        rows.append(row)
        del model, runner
        _reset_peak_memory(device)
    return rows


def csv_columns(modes: Sequence[str], with_batch: bool = True, with_latency: bool = True) -> List[str]:
    columns = ["model", "compile", "img_size", "params_m", "gflops"]
    keys = ("img_s", "mem_gib") + (("batch",) if with_batch else ()) + (("median_ms", "p90_ms") if with_latency else ())
    for key in keys:
        columns += [f"{mode}_{key}" for mode in modes]
    return columns


def _json_safe(row: dict) -> dict:
    """NaN (not measured) becomes null: NaN is not valid JSON."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}


# ----------------------------------------------------------------------------- plotting
def plot_scaleup(rows: Sequence[dict], modes: Sequence[str], path):
    """Throughput (one line style per mode) and GFLOPs against input resolution, one colour per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"infer_fp32": "-", "infer_amp": "--", "train_amp": ":"}
    fig, (ax_tp, ax_flops) = plt.subplots(1, 2, figsize=(13, 5))
    labels = list(dict.fromkeys(row["model"] for row in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, label in enumerate(labels):
        mine = sorted((row for row in rows if row["model"] == label), key=lambda row: row["img_size"])
        sizes = [row["img_size"] for row in mine]
        colour = colours[index % len(colours)]
        for mode in modes:
            ax_tp.plot(sizes, [row[f"{mode}_img_s"] for row in mine], styles[mode], marker="o",
                       color=colour, label=f"{label} {mode}")
        ax_flops.plot(sizes, [row["gflops"] for row in mine], "-", marker="o", color=colour, label=label)
    if all(math.isnan(row["gflops"]) for row in rows):
        ax_flops.text(0.5, 0.5, "FLOPs not counted", ha="center", va="center", transform=ax_flops.transAxes)
    ax_tp.set(xlabel="input resolution (px)", ylabel="images / s", yscale="log", title="throughput")
    ax_flops.set(xlabel="input resolution (px)", ylabel="GFLOPs / image", title="FLOPs")
    for ax in (ax_tp, ax_flops):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="output/analyze/tp")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="input resolutions (default 224)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=50, help="untimed forwards (or train steps) first")
    parser.add_argument("--iters", type=int, default=30, help="timed forwards (or train steps)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--amp-dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                        help="autocast dtype: auto = float16 on CUDA, bfloat16 on the CPU")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile mode the models run under (default: none, eager)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    specs = model_specs(args.model, args.checkpoint)
    if args.amp_dtype == "auto":
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    else:
        amp_dtype = getattr(torch, args.amp_dtype)
    out = prepare_out_dir(args.out)

    rows = benchmark(specs, args.sizes, args.batch_size, args.modes, device, args.warmup, args.iters,
                     amp_dtype, num_classes=args.num_classes, count_flops=not args.no_flops,
                     compile_mode=args.compile)

    columns = csv_columns(args.modes)
    outputs = [out / "tp.csv", out / "tp.json"]
    write_csv(outputs[0], rows, columns)
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "batch_size": args.batch_size, "warmup": args.warmup,
        "iters": args.iters, "amp_dtype": str(amp_dtype).replace("torch.", ""), "compile": args.compile,
    }
    with open(outputs[1], "w") as handle:
        json.dump({"environment": environment, "rows": [_json_safe(row) for row in rows]}, handle, indent=2)
    if len(args.sizes) > 1:
        outputs.append(out / "scaleup.png")
        plot_scaleup(rows, args.modes, outputs[-1])
    report_outputs(outputs)
    print(f"\n{environment}")
    halved = [f"{row['model']} @ {row['img_size']} {mode}: batch {row[f'{mode}_batch']}"
              for row in rows for mode in args.modes if row[f"{mode}_batch"] != args.batch_size]
    if halved:
        print("batch halved after running out of memory: " + "; ".join(halved))
    print(format_table(rows, csv_columns(args.modes, with_batch=False, with_latency=args.batch_size == 1)))
    if device.type == "cpu" and args.batch_size != 1 and args.compile == "none":
        # on the CPU, single-image latency is what users meet
        print("\nbatch-1 latency, fp32:")
        print(latency.table(latency.measure(specs, args.sizes[0], device, args.warmup, args.iters, args.num_classes)))


if __name__ == "__main__":
    run_cli(main)
