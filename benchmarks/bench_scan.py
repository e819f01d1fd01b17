"""Selective-scan timings at the four VMamba-T stage shapes, one row per backend: the CUDA extension, the Triton
kernels (selective_scan/triton_scan.py) and the PyTorch path.

GPU (default when a GPU is visible): B 128, K*D 384/768/1536/3072, L 3136/784/196/49, N 1, B/C groups 4,
fp16/bf16 in, fp32 out, D + delta_bias + softplus (what SS2D calls). Reports forward, backward and
forward+backward median times, and effective bandwidth counting the bytes a perfect kernel must move:
  forward  8 B/element  (u 2 + delta 2 read, y 4 written; B/C, A, D are < 1 % and not counted),
  backward 12 B/element (u 2 + delta 2 + dy 4 read, du 2 + ddelta 2 written): the backward op alone,
           given the forward's saved state (its kernel plus the zero-fill and casts of dB/dC),
  fwd+bwd 20 B/element  (forward 8 + backward 12). This one times y.backward(dy) on leaf inputs, so it
           also holds autograd's work, including adding the new gradients into the leaves' .grad
           (for u and delta, 6 B/element more traffic each call).
It also measures the card's copy bandwidth (a 2 GiB device-to-device copy, read + write bytes) in the
same run, so the ratio is meaningful. Each timing is one call between two events, waited for, so it holds the
host's time to issue the call on an idle GPU (Python checks, op dispatch, autograd, allocation: about 0.1 ms
per forward and 0.3 ms per forward+backward on an H100 machine's host, varying between runs); --calls K instead
times K calls issued back to back and reports their mean, which hides that time behind the GPU work as a
training step does.

GPU rows: every backend available (cuda where the extension is built with CUDA, triton where triton is installed,
torch), or those --backend names. CPU (--device cpu): the torch path at the same shapes with batch 1, fp32, forward
and forward+backward.

    python benchmarks/bench_scan.py [--device cpu|cuda] [--backend cuda triton torch] [--json out.json]
    python benchmarks/bench_scan.py --calls 10  # back-to-back calls
    python benchmarks/bench_scan.py --profile 0 # one fp16 forward and backward at stage 0, untimed (for ncu)
"""

import argparse
import json
import statistics
import time

import torch

import selective_scan
from selective_scan import selective_scan_fn, torch_scan, triton_scan

STAGES = [(384, 3136), (768, 784), (1536, 196), (3072, 49)]  # (K*D, L) of VMamba-T at 224 px
GROUPS = 4
FWD_BYTES_PER_ELEMENT = 8
BWD_BYTES_PER_ELEMENT = 12
FWD_BWD_BYTES_PER_ELEMENT = 20
BACKENDS = ("cuda", "triton", "torch")


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


def time_gpu(fn, warmup=10, repeat=50, calls=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
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


def backward_op(plain, dy, backend):
    """The backward alone, given the forward's saved state: the op `selective_scan::bwd` as the autograd rule calls
    it (backend "cuda"), the Triton backward (backend "triton") or the PyTorch implementation's backward (backend
    "torch")."""
    args = (plain["u"], plain["delta"], plain["A"], plain["B"], plain["C"], plain["D"], plain["delta_bias"])
    if backend == "torch":
        return lambda: torch_scan.scan_backward(dy, *args, True)
    if backend == "triton":
        _, _, checkpoints = triton_scan.forward(*args, True, True)
        return lambda: triton_scan.backward(dy, None, *args, checkpoints, True)
    ops = torch.ops.selective_scan
    _, _, checkpoints = ops.fwd(*args, True, True)
    return lambda: ops.bwd(dy, None, *args, checkpoints, True)


def profile_once(stage):
    """One fp16 forward and backward op at a stage, for a profiler to capture (ncu -k regex:scan_)."""
    channels, length = STAGES[stage]
    plain = make_inputs(128, channels, length, torch.float16, "cuda", requires_grad=False)
    dy = torch.randn(128, channels, length, device="cuda")
    backward = backward_op(plain, dy, "cuda")  # its forward call is the profiled forward
    backward()
    torch.cuda.synchronize()


def available_backends(device):
    """The backends a GPU run times by default (the CPU one times the torch path)."""
    if device != "cuda":
        return ["torch"]
    return [b for b in BACKENDS if (b != "cuda" or selective_scan.cuda_available())
            and (b != "triton" or triton_scan.available())]


def bench(device, backends, batch, dtypes, calls=1):
    timer = (lambda fn: time_gpu(fn, calls=calls)) if device == "cuda" else time_cpu
    rows = []
    for dtype in dtypes:
        for channels, length in STAGES:
            inputs = make_inputs(batch, channels, length, dtype, device, requires_grad=True)
            plain = {k: v.detach() for k, v in inputs.items()}
            dy = torch.randn(batch, channels, length, device=device)
            for backend in backends:
                call = dict(delta_softplus=True, out_float=True, backend=backend)
                with torch.no_grad():
                    fwd_ms = timer(lambda: selective_scan_fn(**plain, **call))
                bwd_ms = timer(backward_op(plain, dy, backend))

                def fwd_bwd():
                    selective_scan_fn(**inputs, **call).backward(dy)

                fwd_bwd_ms = timer(fwd_bwd)
                elements = batch * channels * length
                rows.append(dict(backend=backend, dtype=str(dtype).replace("torch.", ""), batch=batch,
                                 channels=channels, length=length, fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                                 fwd_tb_s=elements * FWD_BYTES_PER_ELEMENT / (fwd_ms * 1e-3) / 1e12,
                                 bwd_tb_s=elements * BWD_BYTES_PER_ELEMENT / (bwd_ms * 1e-3) / 1e12,
                                 fwd_bwd_tb_s=elements * FWD_BWD_BYTES_PER_ELEMENT / (fwd_bwd_ms * 1e-3) / 1e12))
            del inputs, plain, dy
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                        help="GPU: the backends to time (default: every one available); CPU: torch only")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--calls", type=int, default=1, help="GPU: time this many calls issued back to back")
    parser.add_argument("--profile", type=int, metavar="STAGE",
                        help="run one fp16 forward and backward at this stage (0-3) only, untimed")
    args = parser.parse_args()
    if args.profile is not None:
        profile_once(args.profile)
        return
    backends = args.backend or available_backends(args.device)
    if args.device == "cpu" and backends != ["torch"]:
        parser.error("--device cpu times the torch path only")
    result = dict(build_info=selective_scan.build_info(), device=args.device, backends=backends,
                  torch=torch.__version__, calls=args.calls)
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["copy_tb_s"] = copy_bandwidth_tb_s()
        rows = bench("cuda", backends, 128, [torch.float16, torch.bfloat16], args.calls)
    else:
        result["threads"] = torch.get_num_threads()
        rows = bench("cpu", backends, 1, [torch.float32])
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"# {result['build_info']}; {result.get('gpu', 'CPU, %d threads' % result.get('threads', 0))}; "
          f"torch {result['torch']}"
          + (f"; {args.calls} calls back to back" if args.device == "cuda" and args.calls > 1 else ""))
    if "copy_tb_s" in result:
        print(f"# device-to-device copy: {result['copy_tb_s']:.2f} TB/s (read + write)")
    print(f"{'backend':>8} {'dtype':>8} {'batch':>5} {'K*D':>5} {'L':>5} {'fwd ms':>9} {'fwd TB/s':>9} "
          f"{'bwd ms':>9} {'bwd TB/s':>9} {'f+b ms':>9} {'f+b TB/s':>9}")
    for r in rows:
        print(f"{r['backend']:>8} {r['dtype']:>8} {r['batch']:>5} {r['channels']:>5} {r['length']:>5} "
              f"{r['fwd_ms']:>9.3f} {r['fwd_tb_s']:>9.2f} {r['bwd_ms']:>9.3f} {r['bwd_tb_s']:>9.2f} "
              f"{r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tb_s']:>9.2f}")


if __name__ == "__main__":
    main()
