"""FLOPs and parameter counts the way VMamba reports them (fvcore, as the authors' README and paper count them).

fvcore counts one multiply-add as one FLOP for matmuls, convolutions and einsums, and counts norms
and pooling with its default rules. The selective scan is counted by the rule of mamba issue #110
(``selective_scan.scan_flops``); SiLU, GELU, neg, exp, flip, softplus and the cross-scan/merge
count zero. Works on any nn.Module and inputs (classification, detection or segmentation models).
"""
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

__all__ = ["flop_handlers", "count_flops", "count_params", "scan_flop_jit"]

SCAN_OP = "selective_scan::fwd"
ZERO_FLOP_OPS = (
    "aten::silu", "aten::silu_", "aten::gelu", "aten::neg", "aten::exp", "aten::flip", "aten::softplus",
    "prim::PythonOp.CrossScan", "prim::PythonOp.CrossMerge",
)


def scan_flop_jit(inputs, outputs):
    """fvcore handle for ``selective_scan::fwd(u, delta, A, B, C, D, ...)``."""
    from selective_scan import scan_flops
    batch, channels, length = get_shape(inputs[0])
    d_state = get_shape(inputs[2])[1]
    with_D = get_shape(inputs[5]) is not None
    return scan_flops(batch, length, channels, d_state, with_D=with_D)


def flop_handlers():
    """Extra fvcore op handles: pass to ``FlopCountAnalysis(...).set_op_handle(**flop_handlers())``."""
    handlers = {op: None for op in ZERO_FLOP_OPS}
    handlers[SCAN_OP] = scan_flop_jit
    return handlers


def count_flops(model, inputs, by_module=False):
    """Total FLOPs (float) of ``model(*inputs)`` in eval mode without gradients.

    ``inputs``: a tensor or a tuple of positional inputs. ``by_module=True`` also returns fvcore's
    per-module dict. The model's train/eval state is restored afterwards.
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(**flop_handlers())
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = float(analysis.total())
            per_module = dict(analysis.by_module()) if by_module else None
    finally:
        model.train(was_training)
    return (total, per_module) if by_module else total


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
