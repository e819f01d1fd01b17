"""torch.compile against eager on one GPU: AMP throughput at batch 128 and AMP latency at batch 1, VMamba beside the
timm baselines, each model compiled the same way.

    python benchmarks/bench_compile.py [--models NAME ...] [--modes eager default reduce-overhead] [--json out.json]

Throughput (batch 128, 224 px, fp16 autocast; analyze/tp.py's timing with 10 warm-up + 20 timed steps, the first
warm-up steps compile): inference and training (forward, cross-entropy, backward, no optimizer step), for eager and
torch.compile(mode="default"). Latency (batch 1): median and p90 ms of 100 single-image AMP forwards, each waited for,
for every mode in --modes ("reduce-overhead" replays CUDA graphs).
"""
import argparse
import json
import statistics
import time

import timm
import torch

from analyze.tp import time_mode
from host_cost import tiny_op_us  # same directory

MODELS = ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224", "convnext_tiny", "mambaout_tiny")


def latency_ms(model, image, warmup=20, iters=100):
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for i in range(warmup + iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(image)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * len(times))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["eager", "default", "reduce-overhead"],
                        choices=["eager", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_compile.py measures GPU speed: no CUDA device is visible")
    import classification.models  # noqa: F401  (registers the VMamba builders with timm)
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(device)}; torch {torch.__version__}; host {tiny_op_us(device):.2f} us/op")
    print("| model | mode | infer AMP img/s (b128) | train AMP img/s (b128) | latency AMP b1 median / p90 ms |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name in args.models:
        for mode in args.modes:
            torch._dynamo.reset()
            model = timm.create_model(name).to(device)
            run = model if mode == "eager" else torch.compile(model, mode=mode)
            row = dict(model=name, mode=mode)
            if mode in ("eager", "default"):  # batch-128 throughput: eager against the default compile
                for step in ("infer_amp", "train_amp"):
                    row[step] = time_mode(run, step, 128, 224, device, 10, 20, torch.float16)["img_s"]
            model.eval()
            row["latency_ms"] = latency_ms(run, torch.randn(1, 3, 224, 224, device=device))
            rows.append(row)
            throughput = [f"{row[k]:.0f}" if k in row else "" for k in ("infer_amp", "train_amp")]
            print(f"| {name} | {mode} | {throughput[0]} | {throughput[1]} | "
                  f"{row['latency_ms'][0]:.3f} / {row['latency_ms'][1]:.3f} |", flush=True)
            del run, model
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
