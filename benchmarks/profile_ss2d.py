"""One fused SS2D forward+backward at VMamba-T stage-1 shape, for a profiler (ncu) to look at the kernels.

    ncu --kernel-name regex:ss2d_ python benchmarks/profile_ss2d.py [--batch 128]
"""

import argparse

import torch

from selective_scan import ss2d
from classification.models.vmamba import SS2D

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=128)
args = parser.parse_args()
module = SS2D(d_model=96, d_state=1, ssm_ratio=2.0, forward_type="v05_noz", conv_bias=False).cuda()
params = [getattr(module, n) for n in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")]
x = torch.randn(args.batch, 192, 56, 56, device="cuda").half().contiguous(memory_format=torch.channels_last)
x.requires_grad_()
with torch.autocast("cuda", dtype=torch.float16):
    y = ss2d.ss2d_core(x, *params, backend="fused")
torch.autograd.grad(y, [x, *params], torch.randn_like(y))
torch.cuda.synchronize()
