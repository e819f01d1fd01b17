"""Selective-scan timings at the four VMamba-T stage shapes.

GPU (default when a GPU is visible): B 128, K*D 384/768/1536/3072, L 3136/784/196/49, N 1, B/C groups 4,
fp16/bf16 in, fp32 out, D + delta_bias + softplus (what SS2D calls). Reports forward and forward+backward
median times, and effective bandwidth counting the bytes a perfect kernel must move:
  forward  8 B/element  (u 2 + delta 2 read, y 4 written; B/C, A, D are < 1 % and not counted),
  fwd+bwd 20 B/element  (forward 8, backward u 2 + delta 2 + dy 4 read, du 2 + ddelta 2 written).
It also measures the card's copy bandwidth (a 2 GiB device-to-device copy, read + write bytes) in the
same run, so the ratio is meaningful.

CPU (--device cpu): the torch path at the same shapes with batch 1, fp32, forward and forward+backward.

    python benchmarks/bench_scan.py [--device cpu|cuda] [--backend cuda|torch] [--json out.json]
"""

import argparse
import json
import statistics
import time

import torch

import selective_scan
from selective_scan import selective_scan_fn

STAGES = [(384, 3136), (768, 784), (1536, 196), (3072, 49)]  # (K*D, L) of VMamba-T at 224 px
GROUPS = 4
FWD_BYTES_PER_ELEMENT = 8
FWD_BWD_BYTES_PER_ELEMENT = 20


def make_inputs(batch, channels, length, dtype, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    t = dict(
        u=torch.randn(batch, channels, length, generator=g, device=device).to(dtype),
        delta=(0.5 * torch.rand(batch, channels, length, generator=g, device=device) - 2).to(dtype),
        A=-torch.rand(channels, 1, generator=g, device=device),
        B=torch.randn(batch, GROUPS, 1, length, generator=g, device=device).to(dtype),
        C=torch.randn(batch, GROUPS, 1, length, generator=g, device=device).to(dtype),
        D=torch.ones(channels, device=device),
        delta_bias=torch.rand(channels, generator=g, device=device),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_()
    return t


def time_gpu(fn, warmup=10, repeat=50):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn, warmup=2, repeat=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_tb_s():
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src), warmup=3, repeat=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def bench(device, backend, batch, dtypes):
    timer = time_gpu if device == "cuda" else time_cpu
    rows = []
    for dtype in dtypes:
        for channels, length in STAGES:
            inputs = make_inputs(batch, channels, length, dtype, device, requires_grad=True)
            plain = {k: v.detach() for k, v in inputs.items()}
            call = dict(delta_softplus=True, out_float=True, backend=backend)
            with torch.no_grad():
                fwd_ms = timer(lambda: selective_scan_fn(**plain, **call))
            dy = torch.randn(batch, channels, length, device=device)

            def fwd_bwd():
                selective_scan_fn(**inputs, **call).backward(dy)

            fwd_bwd_ms = timer(fwd_bwd)
            elements = batch * channels * length
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), batch=batch, channels=channels, length=length,
                             fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                             fwd_tb_s=elements * FWD_BYTES_PER_ELEMENT / (fwd_ms * 1e-3) / 1e12,
                             fwd_bwd_tb_s=elements * FWD_BWD_BYTES_PER_ELEMENT / (fwd_bwd_ms * 1e-3) / 1e12))
            del inputs, plain, dy
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["cuda", "torch"], default=None)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    backend = args.backend or ("cuda" if args.device == "cuda" else "torch")
    result = dict(build_info=selective_scan.build_info(), device=args.device, backend=backend,
                  torch=torch.__version__)
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["copy_tb_s"] = copy_bandwidth_tb_s()
        rows = bench("cuda", backend, 128, [torch.float16, torch.bfloat16])
    else:
        result["threads"] = torch.get_num_threads()
        rows = bench("cpu", backend, 1, [torch.float32])
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"# {result['build_info']}; {result.get('gpu', 'CPU, %d threads' % result.get('threads', 0))}; "
          f"torch {result['torch']}; backend {backend}")
    if "copy_tb_s" in result:
        print(f"# device-to-device copy: {result['copy_tb_s']:.2f} TB/s (read + write)")
    print(f"{'dtype':>8} {'batch':>5} {'K*D':>5} {'L':>5} {'fwd ms':>9} {'fwd TB/s':>9} {'f+b ms':>9} {'f+b TB/s':>9}")
    for r in rows:
        print(f"{r['dtype']:>8} {r['batch']:>5} {r['channels']:>5} {r['length']:>5} {r['fwd_ms']:>9.3f} "
              f"{r['fwd_tb_s']:>9.2f} {r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tb_s']:>9.2f}")


if __name__ == "__main__":
    main()
