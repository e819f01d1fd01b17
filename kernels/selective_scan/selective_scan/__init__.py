"""Kernels of VMamba: the selective scan (S6), cross-scan / cross-merge, the SS2D core and a channels-last LayerNorm.

Three layers, as in mamba_ssm: the compiled kernels (csrc/, the extension `selective_scan._C`, which registers
them as dispatcher ops), their Python interface (ops.py, cross_scan.py, ss2d.py, layer_norm.py: one dispatcher
each, the autograd rule, and the PyTorch reference beside the kernels), and the nn.Modules, which live with the
model (classification/models/vmamba.py) and call `ss2d_core` and `layer_norm`.
"""

from .cross_scan import ROUTE_SETS, cross_merge, cross_scan, route_positions
from .ops import (build_info, cpu_kernels_built, cuda_available, extension_built, kernels_summary, scan_flops,
                  selective_scan_fn)
from .reference import selective_scan_ref
from .ss2d import ss2d_core

__all__ = ["selective_scan_fn", "selective_scan_ref", "scan_flops", "ss2d_core", "cross_scan", "cross_merge",
           "route_positions", "ROUTE_SETS", "cuda_available", "extension_built", "cpu_kernels_built", "build_info",
           "kernels_summary"]
