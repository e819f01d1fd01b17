"""Fused SS2D core (CUDA and Triton kernels) vs the unfused path at VMamba's four stage shapes (GPU).

Shapes: batch 128, d_model 96 * 2^i, D = ssm_ratio * d_model (ssm_ratio 1, VMamba-T [s1l8]: D = 96, 192, 384,
768; 2 for VMamba-S/B and VMamba-T [s2l5]), dt rank ceil(d_model / 16) = 6, 12, 24, 48, map 56 / 2^i, d_state 1
(--d-state 16 --ssm-ratio 2: Vanilla VMamba's), fp16 activations under autocast (the model's training setting);
--image 800 1333 --batch 2 gives the maps of a detection-size input. Both paths are `selective_scan.ss2d.ss2d_core`
on x (B, D, H, W) in channels-last storage (the depthwise conv's output) and return the merged fp32 map:
  unfused: backend="unfused" (cross-scan, batched x_proj / dt_proj GEMMs, the CUDA selective scan, cross-merge);
  fused:   backend="fused" (the x_dbl GEMM plus the fused kernels, docs/kernels.md);
  triton:  the same x_dbl GEMM plus the Triton kernels (selective_scan/triton_ss2d.py), called directly
           (`ss2d.scan_routes(..., impl="triton")`), so they are timed beside the CUDA kernels in one run.
--cores picks among them (the fused row needs the extension's CUDA kernels, the triton row needs triton). The
triton table gives its speed relative to the fused CUDA core (fused ms / triton ms) and to the unfused one.
fwd+bwd adds the backward of a fixed fp32 output gradient into x and the five SSM parameters. Times are
medians of CUDA-event timings. Also timed: the x_dbl GEMM alone and the fused forward / backward ops alone
(kernel plus its zero-fills, casts and, backward, the sum of the four routes' dx maps or the channel blocks'
partial sums), so the rest of the fused time is PyTorch glue and the GEMM backward.

Bytes per element for the bandwidth columns are what any SS2D core implementation must move per (batch,
position, channel) element, with s the bytes of x's dtype: forward s + 4 (x read, fp32 y written),
forward+backward 8 + 3s (plus dy read 4, x read s, dx written s). x_dbl (4 (R + 2) values of x's dtype per
position, < 1 B per element at stage 1) is not counted. The card's device-to-device copy bandwidth is measured
in the same run.

    python benchmarks/bench_ss2d.py [--batch 128] [--stages 1 2 3 4] [--image 224 224] [--width 96] [--ssm-ratio 1]
                                    [--d-state 1]
                                    [--cores unfused fused triton] [--json out.json]
"""

import argparse
import json
import math

import torch

import bench_scan  # same directory: its CUDA-event timer and copy-bandwidth probe
import selective_scan
from selective_scan import ss2d, triton_ss2d
from classification.models.vmamba import SS2D

PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
CORES = ("unfused", "fused", "triton")
# the fused cores' forward / backward ops: the dispatcher ops (CUDA kernels), the Triton kernels
OPS = {"fused": (torch.ops.selective_scan_ss2d.fwd, torch.ops.selective_scan_ss2d.bwd),
       "triton": (triton_ss2d.forward, triton_ss2d.backward)}


def time_gpu(fn):
    return bench_scan.time_gpu(fn, warmup=5, repeat=20)


def stage_shape(stage, image, stage1_width=96, ssm_ratio=1.0):
    """(d_model, D, dt rank, map height, map width) of the stage at input size image = (H, W) of a VMamba whose
    stage 1 is stage1_width wide (96: VMamba-T/S, 128: VMamba-B): the stem and every downsample halve the map,
    rounding up."""
    d_model = stage1_width * 2 ** (stage - 1)
    height, width = (math.ceil(side / 2 ** (stage + 1)) for side in image)
    return d_model, int(ssm_ratio * d_model), math.ceil(d_model / 16), height, width


def core_function(core, x, params):
    """SS2D core `core` (CORES) on x (B, D, H, W) with SS2D's parameters `params` (PARAMS order), returning the
    merged fp32 map; call it under autocast."""
    if core != "triton":
        return lambda: ss2d.ss2d_core(x, *params, backend=core)
    x_proj_weight, *scan_params = params

    def triton_core():
        x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels-last storage
        y = ss2d.scan_routes(x_last, ss2d.project(x_last, x_proj_weight), *scan_params, impl="triton")
        return y.permute(0, 3, 1, 2)  # (B, D, H, W) viewing channels-last storage, as ss2d_core returns it
    return triton_core


def unsupported_reason(core, rank, d_state, x):
    """Why `core` cannot run at this shape on x's device, or None."""
    if core == "fused":
        return ss2d.fused_unsupported_reason(rank, d_state, x=x)
    if core == "triton" and not triton_ss2d.available():
        return "triton is not installed"
    return None


def bench_stage(stage, batch, dtype, image=(224, 224), stage1_width=96, ssm_ratio=1.0, cores=CORES, d_state=1):
    d_model, dim, rank, height, width = stage_shape(stage, image, stage1_width, ssm_ratio)
    torch.manual_seed(stage)
    module = SS2D(d_model=d_model, d_state=d_state, ssm_ratio=ssm_ratio, forward_type="v05_noz", conv_bias=False,
                  channel_first=True).cuda()
    params = [getattr(module, name) for name in PARAMS]
    x = torch.randn(batch, dim, height, width, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn(batch, dim, height, width, device="cuda").contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=dtype)

    def timed(fn):
        def run():
            with autocast:
                return fn()
        with torch.no_grad():
            fwd = time_gpu(run)
        fwd_bwd = time_gpu(lambda: torch.autograd.grad(run(), [x, *params], dy))
        return fwd, fwd_bwd

    row = dict(stage=stage, batch=batch, dim=dim, length=height * width, rank=rank, d_state=d_state,
               dtype=str(dtype)[6:])
    s = x.element_size()
    elements = batch * dim * height * width
    row["fwd_bytes_per_element"], row["fwd_bwd_bytes_per_element"] = s + 4, 8 + 3 * s
    outputs = {}
    for core in cores:
        reason = unsupported_reason(core, rank, d_state, x)
        if reason is not None:
            row[core] = f"unsupported: {reason}"
            continue
        fn = core_function(core, x, params)
        with torch.no_grad(), autocast:
            outputs[core] = fn()
        row[f"{core}_fwd_ms"], row[f"{core}_fwd_bwd_ms"] = timed(fn)
        if core == "unfused":
            continue
        if "unfused" in outputs:  # equality in this run, at this size
            row[f"{core}_max_abs_diff_fwd"] = (outputs[core] - outputs["unfused"]).abs().max().item()
        row[f"{core}_fwd_tb_s"] = elements * (s + 4) / (row[f"{core}_fwd_ms"] * 1e-3) / 1e12
        row[f"{core}_fwd_bwd_tb_s"] = elements * (8 + 3 * s) / (row[f"{core}_fwd_bwd_ms"] * 1e-3) / 1e12
        # the pieces: x_dbl GEMM, forward op, backward op
        with torch.no_grad():
            x_last = x.detach().permute(0, 2, 3, 1)
            row["gemm_ms"] = time_gpu(lambda: ss2d.project(x_last, module.x_proj_weight))
            x_dbl = ss2d.project(x_last, module.x_proj_weight)
            op_args = (x_last, x_dbl, module.dt_projs_weight, module.dt_projs_bias, module.A_logs, module.Ds)
            forward_op, backward_op = OPS[core]
            row[f"{core}_op_fwd_ms"] = time_gpu(lambda: forward_op(*op_args))
            ckpt = forward_op(*op_args)[1]
            dy_last = dy.permute(0, 2, 3, 1)
            row[f"{core}_op_bwd_ms"] = time_gpu(lambda: backward_op(dy_last, *op_args, ckpt))
    return row


def ratio(row, numerator, denominator):
    """row[numerator] / row[denominator] as text, '-' where either core did not run."""
    if numerator not in row or denominator not in row:
        return "-"
    return f"{row[numerator] / row[denominator]:.3f}"


def ms(row, key):
    return f"{row[key]:.3f}" if key in row else "-"


def print_tables(result, args):
    print(f"# {result['gpu']}; torch {result['torch']}; {result['build_info']}")
    print(f"# device-to-device copy: {result['copy_tb_s']:.2f} TB/s (read + write); fp16 under autocast, d_state "
          f"{args.d_state}, ssm_ratio {args.ssm_ratio:g}; maps of a {args.image[0]}x{args.image[1]} input")
    for core in ("fused", "triton"):
        if core not in args.cores:
            continue
        print(f"\n{core}: ratios are time / unfused time" + ("" if core == "fused" else
                                                               "; speed vs CUDA is fused CUDA time / triton time"))
        print(f"| stage | B | D | L | R | unfused fwd ms | {core} fwd ms | ratio | unfused fwd+bwd ms "
              f"| {core} fwd+bwd ms | ratio | " + ("" if core == "fused" else "speed vs CUDA fwd, f+b | ")
              + "GEMM / fwd op / bwd op ms | B/elem fwd, f+b | TB/s fwd, f+b | max abs diff fwd |")
        print("| " + " | ".join(["---"] * (15 if core == "fused" else 16)) + " |")
        for r in result["rows"]:
            line = (f"| {r['stage']} | {r['batch']} | {r['dim']} | {r['length']} | {r['rank']} "
                    f"| {ms(r, 'unfused_fwd_ms')} ")
            if core in r:  # unsupported
                print(line + f"| - | - | {ms(r, 'unfused_fwd_bwd_ms')} | - | - | {r[core]} |")
                continue
            line += (f"| {r[f'{core}_fwd_ms']:.3f} | {ratio(r, f'{core}_fwd_ms', 'unfused_fwd_ms')} "
                     f"| {ms(r, 'unfused_fwd_bwd_ms')} | {r[f'{core}_fwd_bwd_ms']:.3f} "
                     f"| {ratio(r, f'{core}_fwd_bwd_ms', 'unfused_fwd_bwd_ms')} ")
            if core == "triton":
                line += (f"| {ratio(r, 'fused_fwd_ms', 'triton_fwd_ms')}, "
                         f"{ratio(r, 'fused_fwd_bwd_ms', 'triton_fwd_bwd_ms')} ")
            print(line + f"| {r['gemm_ms']:.3f} / {r[f'{core}_op_fwd_ms']:.3f} / {r[f'{core}_op_bwd_ms']:.3f} "
                  f"| {r['fwd_bytes_per_element']}, {r['fwd_bwd_bytes_per_element']} "
                  f"| {r[f'{core}_fwd_tb_s']:.2f}, {r[f'{core}_fwd_bwd_tb_s']:.2f} "
                  f"| {r.get(f'{core}_max_abs_diff_fwd', float('nan')):.2e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--image", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="input image size the stage maps derive from (e.g. 800 1333 for detection)")
    parser.add_argument("--width", type=int, default=96, help="stage-1 width: 96 (VMamba-T/S) or 128 (VMamba-B)")
    parser.add_argument("--ssm-ratio", type=float, default=1.0,
                        help="D / d_model: 1 (VMamba-T [s1l8], the default) or 2 (VMamba-S/B)")
    parser.add_argument("--d-state", type=int, default=1,
                        help="SSM state size N: 1 (the v2 models, the default) or 16 (Vanilla VMamba)")
    parser.add_argument("--cores", nargs="+", choices=CORES, default=list(CORES),
                        help="SS2D cores to time (default: all; a core this installation cannot run is reported as "
                             "unsupported)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_ss2d.py times the CUDA and Triton kernels: no CUDA device is visible")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, build_info=selective_scan.build_info(),
                  copy_tb_s=bench_scan.copy_bandwidth_tb_s(), rows=[])
    for stage in args.stages:
        result["rows"].append(bench_stage(stage, args.batch, torch.float16, tuple(args.image), args.width,
                                          args.ssm_ratio, args.cores, args.d_state))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print_tables(result, args)


if __name__ == "__main__":
    main()
