"""Host (CPU) time per call of VMamba's pieces on CUDA, with inputs so small that the GPU idles: the wall time
per call is then what the host spends issuing it. At batch 128 an eager model is bound by the larger of this
(summed over a step) and its GPU time, so this table says where launch overhead comes from.

    python benchmarks/host_cost.py

Rows: one tiny CUDA op (the floor; bench_model.py and gpu_check.sh print it as host_us_per_op), PyTorch's
layer_norm and ours (forward; forward + backward), the fused SS2D core, an SS2D module, a VSSBlock (fused and
unfused core, AMP and fp32, inference and a training step), and whole models at batch 1 (VMamba-T beside timm's
Swin-T). The blocks are VMamba-T's first (C 96), taken from models built with ss2d_core="fused" / "unfused".
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F

import classification.models  # noqa: F401  (registers the VMamba builders with timm)
from selective_scan import ss2d
from selective_scan.layer_norm import layer_norm

SS2D_PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def per_call_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def tiny_op_us(device=None, calls=2000):
    """Host time of one tiny CUDA op (x.add_(1) on 8 floats): eager models are partly launch-bound, so their img/s
    depend on the machine's CPU as well as on its GPU; this puts a number on the CPU."""
    x = torch.zeros(8, device=device or "cuda")
    return per_call_us(lambda: x.add_(1), calls)


def first_block(ss2d_core, device):
    """VMamba-T's first VSSBlock (C 96, channel-first) with the given SS2D core, in eval mode."""
    model = timm.create_model("vmamba_tiny_s1l8", ss2d_core=ss2d_core)
    return model.layers[0].blocks[0].to(device).eval()


def block_rows(device):
    rows = [("one tiny CUDA op (x.add_(1))", tiny_op_us(device, 300))]
    x = torch.randn(2, 8, 8, 96, device=device, requires_grad=True)
    w = torch.ones(96, device=device, requires_grad=True)
    b = torch.zeros(96, device=device, requires_grad=True)
    rows.append(("F.layer_norm forward", per_call_us(lambda: F.layer_norm(x.data, (96,), w.data, b.data))))
    rows.append(("layer_norm forward (fp16 out), no grad",
                 per_call_us(lambda: layer_norm(x.data, w.data, b.data, 1e-5, torch.float16))))
    rows.append(("F.layer_norm + cast, forward + backward",
                 per_call_us(lambda: F.layer_norm(x, (96,), w, b).half().sum().backward())))
    rows.append(("layer_norm (fp16 out), forward + backward",
                 per_call_us(lambda: layer_norm(x, w, b, 1e-5, torch.float16).sum().backward())))

    block, unfused_block = first_block("fused", device), first_block("unfused", device)
    module = block.op
    xc = torch.randn(2, 96, 8, 8, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", torch.float16):
        xin = module.act(module.conv2d(module.in_proj(xc)))
        params = [getattr(module, name) for name in SS2D_PARAMS]
        rows.append(("ss2d_core(backend='fused'), AMP, no grad",
                     per_call_us(lambda: ss2d.ss2d_core(xin, *params, backend="fused"))))
        rows.append(("SS2D module, AMP, no grad", per_call_us(lambda: module(xc))))
        rows.append(("VSSBlock, AMP, no grad", per_call_us(lambda: block(xc))))
        rows.append(("VSSBlock with the unfused core, AMP, no grad", per_call_us(lambda: unfused_block(xc))))
    with torch.no_grad():
        rows.append(("VSSBlock, fp32, no grad", per_call_us(lambda: block(xc))))
    block.train()
    xg = xc.clone().requires_grad_()

    def block_step():
        with torch.autocast("cuda", torch.float16):
            y = block(xg)
        y.float().sum().backward()
    rows.append(("VSSBlock training step (AMP forward + backward)", per_call_us(block_step, 100)))
    return rows


def model_rows(device):
    rows = []
    images = torch.randn(1, 3, 224, 224, device=device)
    for name in ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224"):
        model = timm.create_model(name).to(device).eval()
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            rows.append((f"{name}, batch 1, AMP inference", per_call_us(lambda: model(images), 50)))
        model.train()

        def step():
            with torch.autocast("cuda", torch.float16):
                loss = model(images).float().sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
        rows.append((f"{name}, batch 1, AMP training step", per_call_us(step, 30)))
    return rows


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_cost.py measures CUDA launch overhead: no CUDA device is visible")
    device = torch.device("cuda")
    rows = block_rows(device) + model_rows(device)
    print(f"# {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    print("| call | host us per call |\n| --- | --- |")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
