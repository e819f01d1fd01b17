"""Where a model's GPU time goes: the torch.profiler kernel table of a few steps at the paper's protocol shapes.

    python benchmarks/profile_model.py --model vmamba_tiny_s1l8 --modes infer_amp train_amp [--ss2d-core unfused]
                                       [--compile] [--cpu-top 20]

Per mode it prints the kernels sorted by total CUDA time (share of the step, calls, time per step), the
GPU time and the wall time per step (a wall time well above the GPU time means the CPU cannot issue the
kernels fast enough), and with --cpu-top N the N operators with the most CPU time of their own.
"""
import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from analyze.tp import _step_fn


def kernel_table(prof, steps, top):
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"GPU time per step: {total / steps / 1e3:.2f} ms",
             "| share | ms/step | calls/step | kernel |", "| --- | --- | --- | --- |"]
    for e in events[:top]:
        lines.append(f"| {100 * e.self_device_time_total / total:.1f}% | {e.self_device_time_total / steps / 1e3:.3f} "
                     f"| {e.count / steps:.0f} | {e.key[:110]} |")
    return "\n".join(lines)


def cpu_table(prof, steps, top):
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| self CPU ms/step | calls/step | operator |", "| --- | --- | --- |"]
    for e in events[:top]:
        lines.append(f"| {e.self_cpu_time_total / steps / 1e3:.3f} | {e.count / steps:.0f} | {e.key[:110]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--modes", nargs="+", default=["infer_amp", "train_amp"],
                        choices=["infer_fp32", "infer_amp", "train_amp"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--cpu-top", type=int, default=0, help="also list the operators with most CPU time")
    parser.add_argument("--ss2d-core", choices=["auto", "fused", "unfused"],
                        help="a VMamba model's SS2D core (default: the model's own, auto)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_model.py profiles CUDA kernels: no CUDA device is visible")
    import classification.models  # noqa: F401  (registers the VMamba builders with timm)
    device = torch.device("cuda")
    kwargs = {"ss2d_core": args.ss2d_core} if args.ss2d_core else {}
    model = timm.create_model(args.model, **kwargs).to(device).eval()
    if args.compile:
        model = torch.compile(model)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    for mode in args.modes:
        step = _step_fn(model, mode, images, torch.float16)
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu_top else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        print(f"\n## {args.model} {mode}{' (compiled)' if args.compile else ''}, batch {args.batch_size}")
        print(f"wall time per step (unprofiled): {wall_ms:.2f} ms")
        print(kernel_table(prof, args.steps, args.top))
        if args.cpu_top:
            print(cpu_table(prof, args.steps, args.cpu_top))


if __name__ == "__main__":
    main()
