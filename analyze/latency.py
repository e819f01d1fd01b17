"""Batch-1 latency of image classifiers: median and p90 milliseconds of single-image forwards (model.eval(), no_grad,
fp32), the number that matters for CPU inference.

The models run interleaved, one forward each in turn, so a change in the machine's load while measuring hits them
alike; still, measure on a quiet machine and repeat. `analyze/tp.py --device cpu` prints this table after its
throughput table (with its --warmup and --iters); on its own:

    python analyze/latency.py --model vmamba_tiny_s1l8 vanilla_vmamba_tiny swin_tiny_patch4_window7_224 --threads 2

Writes latency.csv under --out.
"""
import argparse
import math
import statistics
from typing import List, Optional, Sequence

import torch

from analyze.common import (ModelSpec, add_common_args, format_table, model_specs, prepare_model, prepare_out_dir,
                            p90, report_outputs, resolve_device, run_cli, timed_call, write_csv)

COLUMNS = ["model", "img_size", "threads", "median_ms", "p90_ms"]


def measure(specs: Sequence[ModelSpec], img_size: int, device: torch.device, warmup: int, iters: int,
            num_classes: int = 1000) -> List[dict]:
    """One row per model: median and p90 of `iters` timed forwards of one image, after `warmup` untimed ones."""
    models = [(spec.label, prepare_model(spec, device, num_classes=num_classes, img_size=img_size)) for spec in specs]
    image = torch.randn(1, 3, img_size, img_size, device=device)
    times = {label: [] for label, _ in models}
    with torch.no_grad():
        for _ in range(warmup):
            for _, model in models:
                model(image)
        for _ in range(iters):
            for label, model in models:
                times[label].append(timed_call(lambda: model(image), device) * 1e3)
    threads = torch.get_num_threads() if device.type == "cpu" else math.nan
    return [dict(model=label, img_size=img_size, threads=threads, median_ms=statistics.median(values),
                 p90_ms=p90(values)) for label, values in times.items()]


def table(rows: Sequence[dict]) -> str:
    return format_table(rows, COLUMNS)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="output/analyze/latency")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed forwards per model first")
    parser.add_argument("--iters", type=int, default=30, help="timed forwards per model")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = measure(model_specs(args.model, args.checkpoint), args.img_size, device, args.warmup, args.iters,
                   args.num_classes)
    out = prepare_out_dir(args.out)
    write_csv(out / "latency.csv", rows, COLUMNS)
    report_outputs([out / "latency.csv"])
    print(table(rows))


if __name__ == "__main__":
    run_cli(main)
