"""Throughput and peak memory of VMamba-T/S/B beside timm baselines, with the paper's protocol (SPEC 6).

Per model, in one process on one GPU:
  infer_fp32  model.eval(), no_grad, fp32, batch 128 at 224 px, 50 warm-up + 30 timed forwards
  infer_amp   the same under autocast (fp16 by default)
  train_amp   model.train(), autocast, forward + cross-entropy + backward (no optimizer step),
              50 warm-up + 30 timed; the batch is halved on out-of-memory
img/s = batch * timed iterations / seconds between two cuda synchronizes; memory = peak allocated.

    python benchmarks/bench_models.py --out results.json
    python benchmarks/bench_models.py --models vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 --modes infer_amp

Timm models are built with pretrained=False (no network). The table is printed last.
"""
import argparse
import gc
import json
import platform
import time

import timm
import torch
import torch.nn.functional as F

import classification.models  # noqa: F401  (registers the VMamba builders with timm)

VMAMBA = {"vmamba_tiny_s1l8": "VMamba-T", "vmamba_small_s2l15": "VMamba-S", "vmamba_base_s2l15": "VMamba-B"}
BASELINES = {"swin_tiny_patch4_window7_224": "Swin-T", "convnext_tiny": "ConvNeXt-T", "mambaout_tiny": "MambaOut-T"}
MODES = ("infer_fp32", "infer_amp", "train_amp")


def _amp(dtype):
    return torch.autocast("cuda", dtype=dtype)


def _timed(step, warmup, iters):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_mode(model, mode, batch, size, warmup, iters, amp_dtype, num_classes=1000):
    """-> dict(batch, img_s, peak_gib); halves the batch on OOM (train and inference alike)."""
    while batch >= 1:
        try:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            x = torch.randn(batch, 3, size, size, device="cuda")
            if mode == "train_amp":
                model.train()
                target = torch.randint(0, num_classes, (batch,), device="cuda")
                scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

                def step():
                    model.zero_grad(set_to_none=True)
                    with _amp(amp_dtype):
                        loss = F.cross_entropy(model(x), target)
                    scaler.scale(loss).backward()
            else:
                model.eval()
                autocast = mode == "infer_amp"

                @torch.no_grad()
                def step():
                    if autocast:
                        with _amp(amp_dtype):
                            model(x)
                    else:
                        model(x)
            seconds = _timed(step, warmup, iters)
            result = dict(batch=batch, img_s=batch * iters / seconds,
                          peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
            model.zero_grad(set_to_none=True)
            return result
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            print(f"  OOM at batch {batch}; halving", flush=True)
            batch //= 2
    raise RuntimeError("out of memory even at batch 1")


def environment():
    info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import selective_scan
        info["selective_scan"] = selective_scan.build_info()
        info["selective_scan_cuda"] = selective_scan.cuda_available()
    except ImportError as err:
        info["selective_scan"] = f"not importable: {err}"
        info["selective_scan_cuda"] = False
    return info


def print_table(results):
    header = f"{'model':<30} {'params M':>9} {'mode':<11} {'batch':>5} {'img/s':>8} {'peak GiB':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        for mode, m in r["modes"].items():
            print(f"{r['label'] + ' (' + r['model'] + ')':<30.30} {r['params'] / 1e6:>9.2f} {mode:<11} "
                  f"{m['batch']:>5} {m['img_s']:>8.0f} {m['peak_gib']:>9.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*VMAMBA, *BASELINES])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--amp-dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (not the paper protocol)")
    parser.add_argument("--nchw", action="store_true",
                        help="run channel-first VMamba in NCHW storage instead of its default NHWC (A/B test)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_models.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    amp_dtype = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16

    env = environment()
    print(json.dumps(env), flush=True)
    if not env["selective_scan_cuda"]:
        print("WARNING: the selective_scan CUDA kernel is not available; VMamba runs the torch scan", flush=True)

    results = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False, num_classes=1000).cuda()
        if args.nchw and hasattr(model, "channels_last_memory"):
            model.channels_last_memory = False
        entry = dict(model=name, label=VMAMBA.get(name) or BASELINES.get(name) or name,
                     params=sum(p.numel() for p in model.parameters()), modes={})
        runnable = torch.compile(model) if args.compile else model
        for mode in args.modes:
            entry["modes"][mode] = run_mode(runnable, mode, args.batch, args.size, args.warmup, args.iters, amp_dtype)
            m = entry["modes"][mode]
            print(f"{name} {mode}: batch {m['batch']} {m['img_s']:.0f} img/s peak {m['peak_gib']:.2f} GiB", flush=True)
        results.append(entry)
        del model, runnable
        gc.collect()
        torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, protocol=vars(args), results=results), f, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
