"""Naive selective scan: one Python step per time index, written straight from the definition.

Only a test oracle (slow); differentiable through autograd and exact in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, out_float=True,
                       return_last_state=False, compute_dtype=torch.float64):
    """Same contract as selective_scan_fn; computes in compute_dtype (float64 by default)."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    x = delta.to(compute_dtype)
    if x.shape[1] != channels:
        x = x.repeat_interleave(channels // x.shape[1], dim=1)
    if delta_bias is not None:
        bias = delta_bias.to(compute_dtype)
        if bias.shape[0] != channels:
            bias = bias.repeat_interleave(channels // bias.shape[0])
        x = x + bias[:, None]
    dt = F.softplus(x, threshold=20.0) if delta_softplus else x
    Bc = B.to(compute_dtype).repeat_interleave(channels // groups, dim=1)  # (batch, channels, N, L)
    Cc = C.to(compute_dtype).repeat_interleave(channels // groups, dim=1)
    uc = u.to(compute_dtype)
    Ac = A.to(compute_dtype)
    h = uc.new_zeros(batch, channels, n_state)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * Ac) * h + (dt[:, :, t] * uc[:, :, t])[:, :, None] * Bc[:, :, :, t]
        ys.append((h * Cc[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uc.new_zeros(batch, channels, 0)
    if D is not None:
        y = y + D.to(compute_dtype)[:, None] * uc
    if not out_float and u.dtype != compute_dtype:
        y = y.to(u.dtype)
    return (y, h) if return_last_state else y
