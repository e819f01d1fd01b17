"""Selective scan (S6) for VMamba: a CUDA extension and an exact chunked PyTorch path behind one op."""

from .ops import build_info, cuda_available, extension_built, scan_flops, selective_scan_fn
from .reference import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "scan_flops", "cuda_available", "extension_built", "build_info"]
