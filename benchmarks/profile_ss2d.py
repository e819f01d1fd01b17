"""One fused SS2D forward+backward at VMamba's stage-1 shape (56x56 map, d_model 96), untimed, for a profiler or
a sanitizer to look at the kernels:

    ncu --kernel-name regex:ss2d_ python benchmarks/profile_ss2d.py [--batch 128] [--ssm-ratio 1]
    compute-sanitizer --tool memcheck python benchmarks/profile_ss2d.py --batch 2

--ssm-ratio 1 is VMamba-T [s1l8] (D 96), 2 VMamba-S/B (D 192).
"""

import argparse

import torch

from selective_scan import ss2d
from classification.models.vmamba import SS2D

PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ssm-ratio", type=float, default=1.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_ss2d.py runs the CUDA kernels: no CUDA device is visible")
    module = SS2D(d_model=96, d_state=1, ssm_ratio=args.ssm_ratio, forward_type="v05_noz", conv_bias=False).cuda()
    params = [getattr(module, name) for name in PARAMS]
    x = torch.randn(args.batch, module.d_inner, 56, 56, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        y = ss2d.ss2d_core(x, *params, backend="fused")
    torch.autograd.grad(y, [x, *params], torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
