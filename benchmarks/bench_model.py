"""Whole-model speed on one GPU: VMamba-T/S/B and Vanilla VMamba-T/S/B with the fused and the unfused SS2D core,
beside timm's Swin-T, ConvNeXt-T and MambaOut-T.

    python benchmarks/bench_model.py [--models NAME ...] [--warmup 50] [--iters 30] [--compile] [--no-op]
                                     [--json out.json]

Per model, analyze/tp.py's timing (the paper's protocol: batch 128 at 224 px, 50 warm-up + 30 timed steps):
inference fp32 (eval, no_grad, no autocast), inference AMP (fp16 autocast), training AMP (forward,
cross-entropy, backward, no optimizer step) and the training step's peak allocated memory. "fused" and
"unfused" are the same VMamba built with `timm.create_model(name, ss2d_core="fused")` or `"unfused"` (the
cross-scan, batched projections, selective scan and cross-merge as separate ops). --compile adds
torch.compile(model) rows for VMamba-T. Unless --no-op, the stage-1 SS2D core alone follows
(benchmarks/bench_ss2d.py --stages 1).

The environment line names the kernels CUDA tensors run ("extension", or "triton" where the extension has no CUDA
kernels, e.g. with SELECTIVE_SCAN_NO_EXTENSION=1) and gives host_us_per_op, the host (CPU) time of one tiny CUDA op
(benchmarks/host_cost.py): where a model is launch-bound, its img/s follow the host's speed, so tables from
machines with different CPUs compare only with that number beside them.
"""
import argparse
import json
import platform

import timm
import torch
from selective_scan import ops

from analyze.common import count_params, format_table
from analyze.tp import MODES, time_mode
from host_cost import tiny_op_us  # same directory

VMAMBA = ("vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15", "vanilla_vmamba_tiny", "vanilla_vmamba_small",
          "vanilla_vmamba_base")
BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny", "mambaout_tiny")


def variants(name, vmamba_names, with_compile):
    """(label, ss2d_core, compiled) for each row of model `name`."""
    if name not in vmamba_names:
        return [("timm", None, False)]
    cores = ("fused", "unfused")
    rows = [(core, core, False) for core in cores]
    if with_compile and name == VMAMBA[0]:
        rows += [(f"{core}+compile", core, True) for core in cores]
    return rows


def measure(name, label, ss2d_core, compiled, args, device):
    """One row: img/s per mode and training memory for model `name` with SS2D core `ss2d_core`."""
    kwargs = {} if ss2d_core is None else {"ss2d_core": ss2d_core}
    model = timm.create_model(name, **kwargs).to(device).eval()
    row = {"model": name, "variant": label, "params_m": count_params(model) / 1e6}
    if compiled:
        model = torch.compile(model)
    for mode in MODES:
        result = time_mode(model, mode, args.batch_size, 224, device, args.warmup, args.iters, torch.float16)
        row[f"{mode}_img_s"] = result["img_s"]
        if mode == "train_amp":
            row["train_mem_gib"] = result["mem_gib"]
        if result["batch"] != args.batch_size:
            row[f"{mode}_batch"] = result["batch"]
    print(f"  {name} {label}: " + ", ".join(f"{mode} {row[f'{mode}_img_s']:.0f}" for mode in MODES)
          + f", train mem {row['train_mem_gib']:.2f} GiB", flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(VMAMBA + BASELINES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(VMamba-T), fused and unfused")
    parser.add_argument("--no-op", action="store_true", help="skip the stage-1 SS2D core table")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py measures GPU speed: no CUDA device is visible")
    device = torch.device("cuda")
    import classification.models  # noqa: F401  (registers the VMamba builders with timm)
    vmamba_names = set(timm.list_models(module="vmamba"))

    rows = []
    for name in args.models:
        for label, ss2d_core, compiled in variants(name, vmamba_names, args.compile):
            try:
                rows.append(measure(name, label, ss2d_core, compiled, args, device))
            except Exception as error:  # a failing variant is reported in the table, the others still run
                print(f"  {name} {label}: FAILED {type(error).__name__}: {error}", flush=True)
                rows.append({"model": name, "variant": f"{label} (failed: {type(error).__name__})"})
    columns = ["model", "variant", "params_m"] + [f"{mode}_img_s" for mode in MODES] + ["train_mem_gib"]
    environment = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "timm": timm.__version__, "python": platform.python_version(), "batch_size": args.batch_size,
                   "img_size": 224, "warmup": args.warmup, "iters": args.iters, "amp_dtype": "float16",
                   "host_us_per_op": round(tiny_op_us(device), 2), "kernels": ops.kernel_backend("cuda")}
    print(f"\n{environment}")
    print(format_table(rows, columns))
    swin = next((r for r in rows if r["model"] == BASELINES[0] and "infer_amp_img_s" in r), None)
    if swin:
        print("\nratio to Swin-T (infer fp32 / infer AMP / train AMP):")
        for row in rows:
            if row["model"] in vmamba_names and "infer_amp_img_s" in row:
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
