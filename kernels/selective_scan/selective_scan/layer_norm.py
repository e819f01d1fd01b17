"""LayerNorm over the channels of a map, written straight in the dtype the next op wants.

Under AMP, PyTorch runs layer_norm in fp32 and returns fp32; when the next op is a matmul, autocast reads that
back to cast it to fp16/bf16. VMamba's block norms and SS2D's out-norm all feed a matmul, and that round trip
(write 4 B, read 4 B, write 2 B per element, and the same again in the backward pass) is one of the model's
largest costs at 224 px. ``layer_norm(x, ..., out_dtype)`` computes in fp32 and rounds once to ``out_dtype``,
which is what layer_norm followed by the cast gives, in one CUDA kernel per pass (csrc/layer_norm.cu, the
dispatcher ops ``selective_scan_ln::fwd`` / ``::bwd``). With ``channel_first`` it normalises dim 1 of a
(B, C, H, W) map stored channels-last, in place, without a transpose.

Dispatch rule: the kernel runs in eager mode (not under torch.compile: see kernel_takes) when the extension is
built, x is a CUDA float32/float16/bfloat16 tensor whose normalised axis is contiguous in memory (channels-last
storage for ``channel_first``), C is a multiple of 4 and at most 1024, and weight and bias are float32. Otherwise F.layer_norm (then the cast) computes the same values:
that path is the reference the kernel is tested against, and what runs on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["layer_norm"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024


# fixed at import; a constant keeps the dispatch rule traceable by dynamo
_CUDA_OPS = ops.extension_built()

if ops.dispatcher_ops_loaded("selective_scan_ln"):
    @torch.library.register_fake("selective_scan_ln::fwd")
    def _fwd_fake(x, weight, bias, eps, out_dtype):
        rows = x.numel() // x.shape[-1]
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32), \
            x.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("selective_scan_ln::bwd")
    def _bwd_fake(dy, x, weight, mean, rstd):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _rows(x: Tensor, channel_first: bool) -> Tensor:
    """The (..., C) view the kernel reads: x itself, or (B, H, W, C) of a channel-first map."""
    return x.permute(0, 2, 3, 1) if channel_first else x


def _from_rows(y: Tensor, channel_first: bool) -> Tensor:
    return y.permute(0, 3, 1, 2) if channel_first else y


class _LayerNorm(torch.autograd.Function):
    # An autograd.Function around the dispatcher ops: torch.compile traces through it (the ops have fake
    # kernels), and in eager mode it costs the host less than a torch.library custom op.
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, channel_first):
        rows = _rows(x, channel_first)
        y, mean, rstd = torch.ops.selective_scan_ln.fwd(rows, weight, bias, eps, out_dtype)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.channel_first = channel_first
        return _from_rows(y, channel_first)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = _rows(dy, ctx.channel_first).contiguous()  # no copy when dy has x's layout
        dx, dw, db = torch.ops.selective_scan_ln.bwd(dy_rows, rows, weight, mean, rstd)
        return _from_rows(dx, ctx.channel_first), dw, db, None, None, None


def kernel_takes(x: Tensor, weight: Tensor, bias: Optional[Tensor], channel_first: bool = False) -> bool:
    """Whether layer_norm runs the CUDA kernel for these arguments (the dispatch rule above)."""
    if not (_CUDA_OPS and x.is_cuda and x.dtype in _DTYPES) or torch.jit.is_tracing():
        return False  # (under jit tracing, fvcore's FLOP count keys on aten::layer_norm)
    if torch.compiler.is_compiling():
        # inductor writes F.layer_norm + the cast as one kernel too, and fuses it with its neighbours (the residual
        # add before it): VMamba-T's compiled AMP inference runs 10191 instead of 9244 img/s on an H100 with it
        return False
    if weight is None or bias is None or weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return False
    if channel_first and x.dim() != 4:
        return False
    C = x.shape[1] if channel_first else x.shape[-1]
    return C % 4 == 0 and C <= MAX_CHANNELS and _rows(x, channel_first).is_contiguous()


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None, channel_first: bool = False) -> Tensor:
    """LayerNorm of ``x`` over its last axis, or over dim 1 of a (B, C, H, W) map with ``channel_first``;
    the result in ``out_dtype`` (default x's dtype)."""
    if channel_first and x.dim() != 4:
        raise ValueError(f"layer_norm: channel_first needs a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    if not kernel_takes(x, weight, bias, channel_first):
        rows = _rows(x, channel_first)
        if weight is not None and weight.dtype != rows.dtype:
            # e.g. the fp32 output of SS2D's core in a model converted to fp16 / bf16: normalise in fp32
            rows, weight, bias = rows.float(), weight.float(), None if bias is None else bias.float()
        return _from_rows(F.layer_norm(rows, rows.shape[-1:], weight, bias, eps).to(out_dtype), channel_first)
    if torch.is_grad_enabled():
        return _LayerNorm.apply(x, weight, bias, eps, out_dtype, channel_first)
    y, _, _ = torch.ops.selective_scan_ln.fwd(_rows(x, channel_first), weight, bias, eps, out_dtype)
    return _from_rows(y, channel_first)
