"""Whole-model speed on one GPU: VMamba-T/S/B with the fused and the unfused SS2D core, beside timm's
Swin-T, ConvNeXt-T and MambaOut-T, then the stage-1 SS2D core alone. One device call:

    python benchmarks/bench_model.py [--models ...] [--compile] [--json out.json]

Per model (paper protocol, analyze/tp.py's timing: batch 128 at 224 px, 50 warm-up + 30 timed steps):
inference fp32 (eval, no_grad, no autocast), inference AMP (fp16 autocast), training AMP (forward,
cross-entropy, backward, no optimizer step) and the training step's peak allocated memory. "fused" and
"unfused" are the same VMamba model with SS2D's core switched (classification.models.vmamba.FUSED_SS2D, the
flag that VMAMBA_SS2D_FUSED=0 clears); --compile adds torch.compile(model) rows for VMamba-T. The last table
is benchmarks/bench_ss2d.py's op measurement at the VMamba-T stage-1 shape (fused vs unfused forward and
forward+backward, bytes per element and bandwidth against the card's copy bandwidth measured in the same run).
The environment line gives host_us_per_op, the CPU time of one tiny CUDA op: where a model is launch-bound its
img/s scale with it, so tables from machines with different CPUs compare only with that in mind.
"""
import argparse
import json
import platform
import time

import torch

from analyze.common import ModelSpec, count_params, format_table, prepare_model
from analyze.tp import MODES, time_mode
from classification.models import vmamba

VMAMBA = ("vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15")
BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny", "mambaout_tiny")


def measure(name, variant, args, device):
    """One row: img/s per mode and training memory for model ``name`` in ``variant``."""
    model = prepare_model(ModelSpec(name), device, img_size=224)
    if variant.endswith("+compile"):
        model = torch.compile(model)
    row = {"model": name, "variant": variant if name in VMAMBA else "timm",
           "params_m": count_params(model) / 1e6}
    previous, vmamba.FUSED_SS2D = vmamba.FUSED_SS2D, not variant.startswith("unfused")
    try:
        for mode in MODES:
            result = time_mode(model, mode, args.batch_size, 224, device, args.warmup, args.iters, torch.float16)
            row[f"{mode}_img_s"] = result["img_s"]
            if mode == "train_amp":
                row["train_mem_gib"] = result["mem_gib"]
            if result["batch"] != args.batch_size:
                row[f"{mode}_batch"] = result["batch"]
    finally:
        vmamba.FUSED_SS2D = previous
    print(f"  {name} {row['variant']}: " + ", ".join(
        f"{mode} {row[f'{mode}_img_s']:.0f}" for mode in MODES) + f", train mem {row['train_mem_gib']:.2f} GiB",
        flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def host_us_per_op(device, calls=2000):
    """Host time of one tiny CUDA op (the GPU idles): the eager models here are partly launch-bound, so their
    img/s depend on the machine's CPU as well as on the GPU; this puts a number on the CPU."""
    x = torch.zeros(8, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        x.add_(1)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(VMAMBA + BASELINES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(VMamba-T), fused and unfused")
    parser.add_argument("--no-op", action="store_true", help="skip the SS2D op table")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py measures GPU speed: no CUDA device is visible")
    device = torch.device("cuda")
    import classification.models  # noqa: F401  (registers the VMamba builders with timm)

    rows = []
    for name in args.models:
        variants = ("fused", "unfused") if name in VMAMBA else ("timm",)
        if args.compile and name == VMAMBA[0]:
            variants += ("fused+compile", "unfused+compile")
        for variant in variants:
            try:
                rows.append(measure(name, variant, args, device))
            except Exception as error:  # a failing variant is reported in the table, the others still run
                print(f"  {name} {variant}: FAILED {type(error).__name__}: {error}", flush=True)
                rows.append({"model": name, "variant": f"{variant} (failed: {type(error).__name__})"})
    columns = ["model", "variant", "params_m"] + [f"{mode}_img_s" for mode in MODES] + ["train_mem_gib"]
    environment = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "python": platform.python_version(), "batch_size": args.batch_size, "img_size": 224,
                   "warmup": args.warmup, "iters": args.iters, "amp_dtype": "float16",
                   "host_us_per_op": round(host_us_per_op(device), 2)}
    print(f"\n{environment}")
    print(format_table(rows, columns))
    swin = next((r for r in rows if r["model"] == BASELINES[0] and "infer_amp_img_s" in r), None)
    if swin:
        print("\nratio to Swin-T (infer fp32 / infer AMP / train AMP):")
        for row in rows:
            if row["model"] in VMAMBA and "infer_amp_img_s" in row:
                print(f"  {row['model']} {row['variant']}: " + " / ".join(
                    f"{row[f'{mode}_img_s'] / swin[f'{mode}_img_s']:.2f}x" for mode in MODES))

    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "models": rows}, handle, indent=2, default=float)
    if not args.no_op:
        from bench_ss2d import main as bench_ss2d_main
        print()
        bench_ss2d_main(["--stages", "1"])


if __name__ == "__main__":
    main()
