"""VMamba: Visual State Space Model (Liu et al., arXiv 2401.10166), as a timm model family.

Blocks (Linear2d, LayerNorm2d, stems, downsamples, Mlp), the 2-D selective-scan mixer SS2D and VSSBlock, then
the classifier VSSM (timm's model API: forward_features / forward_head / forward_intermediates, feature_info,
features_only through timm's feature getter), the dense-prediction Backbone_VSSM built on the same feature path,
the checkpoint filter that maps the authors' release files to our keys, and the nine published models (plus a
tiny test model) as timm builders with their release URLs. Parameter names and shapes follow the authors' release,
so their checkpoints load with ``strict=True``.

Layouts: ``norm_layer="ln"`` builds a channel-last model (activations (B, H, W, C), nn.Linear,
nn.LayerNorm); ``"ln2d"`` / ``"bn"`` a channel-first one (activations (B, C, H, W), Linear2d,
LayerNorm2d / BatchNorm2d). Both have identical state_dict keys. The channel-first model keeps its
activations in channels-last *memory* (NCHW shape, NHWC storage): per-pixel linears and norms then
run on contiguous rows and no transposes are materialised.
"""
import functools
import logging
import math
import os
import re
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from selective_scan import ops, ss2d
from selective_scan.layer_norm import layer_norm
from selective_scan.ss2d import ss2d_core
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .checkpoint import load_pretrained, load_state_dict_from

__all__ = ["Linear2d", "LayerNorm", "LayerNorm2d", "SS2D", "VSSBlock", "VSSM", "Backbone_VSSM", "FORWARD_TYPES",
           "NORM_LAYERS", "SS2D_CORES", "checkpoint_filter_fn"]

# The scan core and the LayerNorm dispatch on the device and dtype of their input: leaf calls for torch.fx.
register_notrace_function(ss2d_core)


# ============================================================================= layout helpers
@register_notrace_module  # branches on the input's device and layout
class Linear2d(nn.Linear):
    """nn.Linear over the channel axis of a (B, C, H, W) map (a 1x1 conv with nn.Linear's weight)."""

    def forward(self, x):
        x_last = x.permute(0, 2, 3, 1)
        # A GEMM over channels-last storage is fastest, except for full fp32 on CUDA: there cuDNN's 1x1
        # convolution follows PyTorch's default TF32 policy for convolutions (as the authors' conv-based
        # Linear2d does), which cuBLAS GEMMs do not (torch.backends.cuda.matmul.allow_tf32 is off).
        fp32_on_cuda = x.is_cuda and x.dtype == torch.float32 and not torch.is_autocast_enabled("cuda")
        if x_last.is_contiguous() and not fp32_on_cuda:
            return F.linear(x_last, self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # accept a conv-shaped (out, in, 1, 1) weight as well (the authors' conv-based Linear2d)
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[prefix + "weight"] = weight.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_notrace_module  # branches on the input's device and dtype
class LayerNorm(nn.LayerNorm):
    """LayerNorm over C: the last axis, or dim 1 of a (B, C, H, W) map (``channel_first``).

    The output dtype is the one autocast's layer_norm + the next op would leave: fp32 under autocast, or, for a
    norm marked ``matmul_input`` (its output goes straight into a linear layer, which would cast it), the
    autocast dtype; x's dtype without autocast. On CUDA selective_scan.layer_norm computes it in one kernel
    (channels-last storage for channel-first maps: no transpose, one rounding).
    """

    def __init__(self, normalized_shape, eps=1e-5, channel_first=False, matmul_input=False, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.channel_first = channel_first
        self.matmul_input = matmul_input

    def forward(self, x):
        autocast_dtype = _autocast_dtype(x.device.type)
        out_dtype = x.dtype
        if autocast_dtype is not None:
            out_dtype = autocast_dtype if self.matmul_input else torch.float32
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype, channel_first=self.channel_first)


class LayerNorm2d(LayerNorm):
    """LayerNorm over C of a (B, C, H, W) map."""

    def __init__(self, normalized_shape, eps=1e-5, matmul_input=False, **kwargs):
        super().__init__(normalized_shape, eps=eps, channel_first=True, matmul_input=matmul_input, **kwargs)


def _autocast_dtype(device_type):
    """The autocast dtype active for `device_type`, or None (also on the meta device, which autocast does not
    know; torch.amp.is_autocast_available would say so, but torch.compile cannot trace it)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _norm_before_matmul(norm_layer, dim, **dd):
    """``norm_layer(dim)`` for a norm that feeds a linear layer (LayerNorm.matmul_input)."""
    return norm_layer(dim, matmul_input=True, **dd) if norm_layer is LayerNorm2d else norm_layer(dim, **dd)


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)

    def extra_repr(self):
        return f"dims={self.dims}"


def _to_channel_first(channel_first):
    """Identity in a channel-first model; (B, H, W, C) -> (B, C, H, W) in a channel-last one."""
    return nn.Identity() if channel_first else Permute(0, 3, 1, 2)


def _to_channel_last(channel_first):
    return nn.Identity() if channel_first else Permute(0, 2, 3, 1)


NORM_LAYERS = {"ln": nn.LayerNorm, "ln2d": LayerNorm2d, "bn": nn.BatchNorm2d}
CHANNEL_FIRST_NORMS = ("ln2d", "bn")
ACT_LAYERS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _lookup(table, name, what):
    key = name.lower() if isinstance(name, str) else name
    if key not in table:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(table)}")
    return table[key]


# ============================================================================= stems, downsamples, MLP
def make_stem(version, in_chans, dim, patch_size, patch_norm, norm_layer, channel_first, **dd):
    """Output (B, dim, ceil(H/4), ceil(W/4)) (v2) or (B, dim, H//p, W//p) (v1), in the model's layout.

    Module indices are those of the authors' checkpoints: v1 conv 0 / norm 2;
    v2 conv 0 / norm 2 / conv 5 / norm 7 (the others are layout permutes and the GELU).
    """
    norm = (lambda c: norm_layer(c, **dd)) if patch_norm else (lambda c: nn.Identity())
    if version == "v1":
        return nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd),
            _to_channel_last(channel_first),
            norm(dim),
        )
    if version == "v2":
        if patch_size != 4:
            raise ValueError(f"patchembed v2 is two stride-2 convs, i.e. patch_size 4; got {patch_size}")
        return nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1, **dd),
            _to_channel_last(channel_first),
            norm(dim // 2),
            _to_channel_first(channel_first),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1, **dd),
            _to_channel_last(channel_first),
            norm(dim),
        )
    raise ValueError(f"unknown patchembed version {version!r}; valid: ['v1', 'v2']")


@register_notrace_module  # pads odd sizes, a branch on the input's shape
class PatchMerging2D(nn.Module):
    """Downsample v1: concatenate each 2x2 neighbourhood (odd sizes zero-padded), norm, Linear 4C -> out."""

    def __init__(self, dim, out_dim, norm_layer, channel_first, **dd):
        super().__init__()
        self.channel_first = channel_first
        self.reduction = (Linear2d if channel_first else nn.Linear)(4 * dim, out_dim, bias=False, **dd)
        self.norm = norm_layer(4 * dim, **dd)

    def forward(self, x):
        h_axis, w_axis, c_axis = (2, 3, 1) if self.channel_first else (1, 2, 3)
        H, W = x.shape[h_axis], x.shape[w_axis]
        if H % 2 or W % 2:
            pad = [0, 0, 0, W % 2, 0, H % 2] if not self.channel_first else [0, W % 2, 0, H % 2]
            x = F.pad(x, pad)

        def pick(dh, dw):
            idx = [slice(None)] * 4
            idx[h_axis], idx[w_axis] = slice(dh, None, 2), slice(dw, None, 2)
            return x[tuple(idx)]

        # the authors' neighbour order: (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([pick(0, 0), pick(1, 0), pick(0, 1), pick(1, 1)], dim=c_axis)
        return self.reduction(self.norm(x))


def make_downsample(version, dim, out_dim, norm_layer, channel_first, **dd):
    """Between stages; conv versions keep the authors' indices (conv 1, norm 3)."""
    if version == "v1":
        return PatchMerging2D(dim, out_dim, norm_layer, channel_first, **dd)
    if version in ("v2", "v3"):
        conv_args = dict(kernel_size=2, stride=2) if version == "v2" else dict(kernel_size=3, stride=2, padding=1)
        return nn.Sequential(
            _to_channel_first(channel_first),
            nn.Conv2d(dim, out_dim, **conv_args, **dd),
            _to_channel_last(channel_first),
            norm_layer(out_dim, **dd),
        )
    if version == "none":
        return nn.Identity()
    raise ValueError(f"unknown downsample version {version!r}; valid: ['none', 'v1', 'v2', 'v3']")


class Mlp(nn.Module):
    """fc1 -> act -> fc2; ``gated`` (gMLP) makes fc1 twice as wide and multiplies by act(gate)."""

    def __init__(self, dim, hidden_dim, act_layer=nn.GELU, drop=0.0, channel_first=False, gated=False, **dd):
        super().__init__()
        linear = Linear2d if channel_first else nn.Linear
        self.channel_axis = 1 if channel_first else -1
        self.gated = gated
        self.fc1 = linear(dim, 2 * hidden_dim if gated else hidden_dim, **dd)
        self.act = act_layer()
        self.fc2 = linear(hidden_dim, dim, **dd)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        x = self.fc1(x)
        if self.gated:
            x, gate = x.chunk(2, dim=self.channel_axis)
            x = x * self.act(gate)
        else:
            x = self.act(x)
        x = self.drop(x)
        return self.drop(self.fc2(x))


# ============================================================================= SS2D
def _parse_forward_type(forward_type):
    """-> dict(gated, fp32_inputs, routes). Only names with the math of v0 / the v2 family are valid.

    The authors' v2-family bases differ in implementation only; what we keep of them is whether the
    scan inputs are cast to fp32 (which matters under AMP) and the route set of v051d / v052d.
    """
    name = forward_type
    if name == "v0":
        return dict(gated=True, fp32_inputs=True, routes="cross2d")
    gated = not name.endswith("_noz")
    base = name[: -len("_noz")] if not gated else name
    if base not in _V2_BASES:
        raise ValueError(f"unknown forward_type {forward_type!r}; valid: {FORWARD_TYPES}")
    fp32_inputs, routes = _V2_BASES[base]
    return dict(gated=gated, fp32_inputs=fp32_inputs, routes=routes)


# base -> (cast scan inputs to fp32, route set)
_V2_BASES = {
    "v01": (True, "cross2d"), "v02": (True, "cross2d"), "v03": (True, "cross2d"),
    "v04": (False, "cross2d"), "v05": (False, "cross2d"),
    "v051d": (False, "unidi"), "v052d": (False, "bidi"),
    "v1": (True, "cross2d"), "v2": (True, "cross2d"), "v3": (False, "cross2d"),
}
FORWARD_TYPES = ["v0"] + sorted(_V2_BASES) + sorted(b + "_noz" for b in _V2_BASES)


SS2D_CORES = ("auto",) + ss2d.BACKENDS

_logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def log_kernels() -> None:
    """Says once per process which kernels the models run (ops.kernels_summary); a warning where a GPU is visible
    but the extension has no CUDA kernels for it."""
    backend = ops.kernel_backend("cuda")
    if backend == "extension" or not torch.cuda.is_available():
        _logger.info(ops.kernels_summary())
        return
    speed = ("the Triton kernels, about 0.4x its AMP speed on an H100" if backend == "triton" else
             "the PyTorch path, about 0.03x its AMP speed on an H100 (install triton for about 0.4x)")
    _logger.warning(f"VMamba: the selective-scan extension has no CUDA kernels ({ops.build_info()}): CUDA tensors "
                    f"run {speed}. With a CUDA toolkit matching torch's, `pip install --no-build-isolation "
                    f"./kernels/selective_scan` builds them.")


def _default_ss2d_core():
    """SS2D's core when the model is built without one: "auto" (fused on CUDA where the kernels take the call),
    or "unfused" where VMAMBA_SS2D_FUSED=0 is set (for scripts that cannot pass a model argument)."""
    return "unfused" if os.environ.get("VMAMBA_SS2D_FUSED", "1") == "0" else "auto"


class SS2D(nn.Module):
    """2-D selective scan: in_proj -> dwconv -> SiLU -> cross-scan -> S6 (K=4 routes) -> cross-merge
    -> out_norm (-> * SiLU(z) if gated) -> out_proj.

    ``forward_type``: "v0" (vanilla VMamba, channel-last only) or a v2-family name such as
    "v05_noz" (no gate, what the published v2 models use); see FORWARD_TYPES.
    ``core``: the implementation of the scan core (``selective_scan.ss2d.ss2d_core``): "auto" (fused on CUDA
    where the fused kernels take the call, unfused otherwise), "fused", "unfused" or "reference"; None reads
    the default (see ``_default_ss2d_core``).
    """

    K = 4

    def __init__(
        self,
        d_model=96,
        d_state=16,
        ssm_ratio=2.0,
        dt_rank="auto",
        act_layer=nn.SiLU,
        d_conv=3,
        conv_bias=True,
        dropout=0.0,
        bias=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        initialize="v0",
        forward_type="v2",
        channel_first=False,
        core=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mode = _parse_forward_type(forward_type)
        core = _default_ss2d_core() if core is None else core
        if core not in SS2D_CORES:
            raise ValueError(f"unknown ss2d core {core!r}; valid: {list(SS2D_CORES)}")
        if forward_type == "v0" and channel_first:
            raise ValueError("forward_type 'v0' is channel-last only: use norm_layer 'ln'")
        if initialize != "v0":
            raise ValueError(f"unknown ssm initialize {initialize!r}; valid: ['v0']")
        self.channel_first = channel_first
        self.gated = mode["gated"]
        self.fp32_inputs = mode["fp32_inputs"]
        self.routes = mode["routes"]
        self.d_state = d_state
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if core == "fused":
            reason = ss2d.fused_unsupported_reason(dt_rank, d_state, self.routes)
            if reason is not None:
                raise ValueError(f"ss2d core 'fused' cannot run this block: {reason}")
        self.core = core
        K = self.K
        linear = Linear2d if channel_first else nn.Linear

        self.in_proj = linear(d_model, 2 * d_inner if self.gated else d_inner, bias=bias, **dd)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias, **dd) if d_conv > 1 else None

        # per-route projections to (dt, B, C) and dt -> d_inner; A = -exp(A_logs); D skip
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner, **dd))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner, **dd))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state, **dd))
        self.Ds = nn.Parameter(torch.empty(K * d_inner, **dd))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

        # the scan core's output is fp32: this norm computes from it whatever the model's dtype
        self.out_norm = LayerNorm(d_inner, channel_first=channel_first, matmul_input=True, **dd)
        self.out_proj = linear(d_inner, d_model, bias=bias, **dd)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        """The authors' "v0" init (Mamba's): dt log-uniform in [dt_min, dt_max], S4D-real A."""
        K, D, N, R = self.K, self.d_inner, self.d_state, self.dt_rank
        bound = D ** -0.5  # nn.Linear(D, R + 2N)'s default init, per route
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-R ** -0.5, R ** -0.5)
        device = self.dt_projs_bias.device
        dt = torch.exp(torch.rand(K, D, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=device)).repeat(K * D, 1))
        self.Ds.fill_(1.0)

    def ssm(self, x):
        """x (B, D, H, W) after the depthwise conv -> merged scan output, fp32, in the module's layout."""
        return ss2d_core(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                         routes=self.routes, channel_first=self.channel_first, fp32_scan_inputs=self.fp32_inputs,
                         backend=None if self.core == "auto" else self.core, check=False)

    def core_for(self, x):
        """Which implementation ``ssm`` runs for an input map like x (B, D, H, W): "fused", "unfused" or
        "reference"."""
        return ss2d.select_core(x, self.dt_rank, self.d_state, self.routes, None if self.core == "auto" else self.core)

    def pre_scan(self, x):
        """in_proj, gate split, depthwise conv, activation -> (x channel-first, z or None)."""
        channel_axis = 1 if self.channel_first else -1
        x = self.in_proj(x)
        z = None
        if self.gated:
            x, z = x.chunk(2, dim=channel_axis)
            z = self.act(z)
        x = x if self.channel_first else x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        return self.act(x), z

    @torch.no_grad()
    def scan_inputs(self, x):
        """For analysis (attention maps): the scan's inputs for block input ``x``, plus the map size
        and route set. Same code path as forward."""
        x, _ = self.pre_scan(x)
        scan = ss2d.unfused_scan_inputs(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                                        self.Ds, self.routes, self.fp32_inputs)
        return dict(scan, height=x.shape[2], width=x.shape[3], routes=self.routes)

    def forward(self, x):
        x, z = self.pre_scan(x)
        y = self.out_norm(self.ssm(x)).to(x.dtype)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))


# ============================================================================= block, stage, head
class VSSBlock(nn.Module):
    """x + DropPath(SS2D(norm(x))), then x + DropPath(Mlp(norm2(x))) when mlp_ratio > 0."""

    def __init__(
        self,
        hidden_dim,
        drop_path=0.0,
        norm_layer=nn.LayerNorm,
        channel_first=False,
        ssm_d_state=16,
        ssm_ratio=2.0,
        ssm_dt_rank="auto",
        ssm_act_layer=nn.SiLU,
        ssm_conv=3,
        ssm_conv_bias=True,
        ssm_drop_rate=0.0,
        ssm_init="v0",
        forward_type="v2",
        mlp_ratio=4.0,
        mlp_act_layer=nn.GELU,
        mlp_drop_rate=0.0,
        gmlp=False,
        use_checkpoint=False,
        ss2d_core=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.use_checkpoint = use_checkpoint
        if ssm_ratio > 0:
            self.norm = _norm_before_matmul(norm_layer, hidden_dim, **dd)
            self.op = SS2D(
                d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias, dropout=ssm_drop_rate,
                initialize=ssm_init, forward_type=forward_type, channel_first=channel_first, core=ss2d_core, **dd,
            )
        else:
            self.op = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = _norm_before_matmul(norm_layer, hidden_dim, **dd)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), act_layer=mlp_act_layer, drop=mlp_drop_rate,
                           channel_first=channel_first, gated=gmlp, **dd)
        else:
            self.mlp = None

    def _forward(self, x):
        if self.op is not None:
            x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class VSSStage(nn.Module):
    """``blocks`` then ``downsample`` (Identity after the last stage); the feature tap is the blocks' output."""

    def __init__(self, blocks, downsample):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x):
        return self.downsample(self.blocks(x))


POOL_TYPES = ("avg", "max", "")


class ClassifierHead(nn.Module):
    """norm -> global pool -> dropout -> Linear (keys ``norm.*``, ``head.*``, as the authors' ``classifier``).

    ``global_pool`` "avg" (the published models), "max", or "" (no pooling: the normed map in the model's
    layout)."""

    def __init__(self, dim, num_classes, norm_layer, channel_first, drop_rate=0.0, global_pool="avg", **dd):
        super().__init__()
        self.channel_first = channel_first
        self.norm = norm_layer(dim, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes, global_pool, dim, **dd):
        """A new head for `num_classes` on `dim` features (and a new pooling unless global_pool is None)."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        return self.head

    def forward(self, x, pre_logits=False):
        x = self.norm(x)
        if self.global_pool:
            x_cf = x if self.channel_first else x.permute(0, 3, 1, 2)
            pool = F.adaptive_avg_pool2d if self.global_pool == "avg" else F.adaptive_max_pool2d
            x = pool(x_cf, 1).flatten(1)
        x = self.drop(x)
        return x if pre_logits else self.head(x)


def _check_pool(global_pool):
    if global_pool not in POOL_TYPES:
        raise ValueError(f"unknown global_pool {global_pool!r}; valid: {list(POOL_TYPES)}")
    return global_pool


# ============================================================================= VSSM
class VSSM(nn.Module):
    """VMamba classifier: stem -> 4 stages of VSSBlocks (downsample between) -> classifier.

    Unknown ``forward_type``, ``norm_layer``, ``downsample_version``, ``patchembed_version``,
    activation or init names raise ValueError at construction, listing the valid values.
    ``ss2d_core`` picks SS2D's core implementation in every block (see SS2D).
    """

    def __init__(
        self,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        depths=(2, 2, 9, 2),
        dims=96,
        ssm_d_state=16,
        ssm_ratio=2.0,
        ssm_dt_rank="auto",
        ssm_act_layer="silu",
        ssm_conv=3,
        ssm_conv_bias=True,
        ssm_drop_rate=0.0,
        ssm_init="v0",
        forward_type="v2",
        mlp_ratio=4.0,
        mlp_act_layer="gelu",
        mlp_drop_rate=0.0,
        gmlp=False,
        drop_rate=0.0,
        drop_path_rate=0.1,
        patch_norm=True,
        norm_layer="ln",
        downsample_version="v2",
        patchembed_version="v1",
        use_checkpoint=False,
        posembed=False,
        global_pool="avg",
        ss2d_core=None,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        log_kernels()
        dd = {"device": device, "dtype": dtype}
        if posembed:
            raise ValueError("posembed=True is not supported (no published VMamba uses it)")
        unknown = set(kwargs) - {"imgsize"}  # the authors' posembed size, unused without posembed
        if unknown:
            raise TypeError(f"VSSM got unexpected keyword arguments {sorted(unknown)}")
        norm_cls = _lookup(NORM_LAYERS, norm_layer, "norm_layer")
        ssm_act = _lookup(ACT_LAYERS, ssm_act_layer, "ssm_act_layer")
        mlp_act = _lookup(ACT_LAYERS, mlp_act_layer, "mlp_act_layer")
        self.channel_first = norm_layer.lower() in CHANNEL_FIRST_NORMS
        # channel-first activations kept in NHWC storage (see the module docstring); False keeps NCHW
        self.channels_last_memory = self.channel_first
        self.output_fmt = "NCHW" if self.channel_first else "NHWC"
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(self.num_layers)]
        self.dims = list(dims)
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.depths = list(depths)
        self.feature_info = [dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}.blocks")
                             for i, dim in enumerate(self.dims)]

        self.patch_embed = make_stem(patchembed_version, in_chans, self.dims[0], patch_size, patch_norm,
                                     norm_cls, self.channel_first, **dd)
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            block_rates = drop_path_rates[sum(depths[:i]):sum(depths[:i + 1])]
            blocks = [
                VSSBlock(
                    self.dims[i], drop_path=rate, norm_layer=norm_cls, channel_first=self.channel_first,
                    ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act,
                    ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init,
                    forward_type=forward_type, mlp_ratio=mlp_ratio, mlp_act_layer=mlp_act,
                    mlp_drop_rate=mlp_drop_rate, gmlp=gmlp, use_checkpoint=use_checkpoint, ss2d_core=ss2d_core,
                    **dd,
                )
                for rate in block_rates
            ]
            downsample = (make_downsample(downsample_version, self.dims[i], self.dims[i + 1], norm_cls,
                                          self.channel_first, **dd)
                          if i < self.num_layers - 1 else nn.Identity())
            self.layers.append(VSSStage(blocks, downsample))
        self.classifier = ClassifierHead(self.num_features, num_classes, norm_cls, self.channel_first, drop_rate,
                                         global_pool, **dd)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):  # Linear2d included
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):  # LayerNorm2d included
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --------------------------------------------------------------------------- timm's model API
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        """SSM parameters that should not decay (the authors' optimizer decays A_logs and dt_projs_bias)."""
        return {"A_logs", "Ds", "dt_projs_bias"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """Parameter groups in depth order (layer-wise lr decay): the stem, each block, each stage's downsample
        after its blocks, the classifier's norm last."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^classifier\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        for m in self.modules():
            if isinstance(m, VSSBlock):
                m.use_checkpoint = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.classifier.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        weight = self.patch_embed[0].weight  # the head goes where the model is, in its dtype
        head = self.classifier.reset(num_classes, global_pool, self.num_features, device=weight.device,
                                     dtype=weight.dtype)
        if num_classes > 0:
            self._init_weights(head)

    def filter_checkpoint(self, state_dict):
        """This model's keys from any checkpoint layout it loads (checkpoint_filter_fn); load_pretrained calls it."""
        return checkpoint_filter_fn(state_dict, self)

    def load_pretrained(self, source, key=None, strict=True):
        """Weights from a path (.pth or .safetensors), a checkpoint dict or a state_dict in any layout
        checkpoint_filter_fn maps, the authors' release files included (``key`` picks e.g. "model_ema" over the
        default "model"); a classifier head of another width stays at its initialisation. This is what timm's
        ``pretrained=True`` calls for this family (``custom_load``: the authors' files pickle their yacs config,
        which timm's weights-only reader refuses), after timm has resolved and cached the file. Returns a
        checkpoint.LoadReport."""
        return load_pretrained(self, source, key=key, strict=strict, new_head_prefixes=("classifier.head.",))

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor of images, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects images (B, {self.in_chans}, H, W), got a tensor of "
                             f"shape {tuple(x.shape)}")
        weight = self.patch_embed[0].weight
        if x.dtype != weight.dtype and _autocast_dtype(x.device.type) is None:
            raise TypeError(f"the input is {x.dtype} but the model's weights are {weight.dtype}: convert one of "
                            f"them (model.to(dtype) / x.to(dtype)) or run under torch.autocast")
        if x.device != weight.device:
            raise ValueError(f"the input is on {x.device} but the model is on {weight.device}")

    def forward_stem(self, x):
        if not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_input(x)
        if self.channels_last_memory:
            # before the stem, so its convolutions and norms already run on channels-last storage
            x = x.contiguous(memory_format=torch.channels_last)
        return self.patch_embed(x)

    def _format(self, x, output_fmt):
        """A map in the model's layout -> the output_fmt view (no copy)."""
        if output_fmt == self.output_fmt:
            return x
        return x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x.permute(0, 2, 3, 1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stages in ``indices`` (the last n if an int, all if None), each the output of the
        stage's blocks before its downsample (strides 4 / 8 / 16 / 32), as views in ``output_fmt`` ("NCHW" or
        "NHWC"). ``norm`` applies the classifier's norm to the last stage's feature; ``stop_early`` skips the
        stages after the last one asked for. Returns the intermediates, or (final features, intermediates)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last_index = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.forward_stem(x)
        for i, stage in enumerate(stages):
            x = stage.blocks(x)
            if i in take_indices:
                feature = self.classifier.norm(x) if norm and i == last_index else x
                intermediates.append(self._format(feature, output_fmt))
            if not (stop_early and i == max_index):
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Keep the stages up to the last of ``indices`` (its downsample dropped, so the features end at the tap);
        ``prune_norm`` drops the classifier's norm (also dropped when the features no longer reach the last stage,
        which it is sized for), ``prune_head`` the classifier and its pooling. Returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if prune_norm or prune_end:
            self.classifier.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x):
        x = self.forward_stem(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ============================================================================= backbone
class Backbone_VSSM(VSSM):
    """VSSM without the classifier, for detection / segmentation (the authors' key layout).

    Returns a list of contiguous (NCHW) maps, one per ``out_indices`` stage (strides 4/8/16/32): the
    stage's ``forward_intermediates`` feature normalised by ``outnorm{i}``. ``pretrained``: a
    classification checkpoint (path or dict); its classifier keys are ignored, every other
    difference is reported; a missing file is an error.
    """

    def __init__(self, out_indices=(0, 1, 2, 3), pretrained=None, norm_layer="ln", **kwargs):
        super().__init__(norm_layer=norm_layer, **kwargs)
        norm_cls = NORM_LAYERS[norm_layer.lower()]
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.out_indices = tuple(out_indices)
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", norm_cls(self.dims[i], **dd))
        del self.classifier
        self.load_report = self.load_pretrained(pretrained) if pretrained is not None else None

    def load_pretrained(self, source, key=None, strict=False):
        return load_pretrained(self, source, key=key, strict=strict, ignore_prefixes=("classifier.",),
                               expected_missing_prefixes=("outnorm",))

    def forward(self, x):
        if not self.out_indices:
            return self.forward_features(x)
        features = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                              output_fmt=self.output_fmt, intermediates_only=True)
        outs = []
        for i, feature in zip(self.out_indices, features):
            out = self._format(getattr(self, f"outnorm{i}")(feature), "NCHW")
            # Standard NCHW memory: mmcv's RoIAlign (and other ops that index data_ptr directly)
            # read channels-last storage as if it were NCHW and return scrambled features.
            outs.append(out.contiguous())
        return outs


# ============================================================================= checkpoints
# The authors' earlier names: block norm ``ln_1``, mixer ``self_attention``, stem ``patch_embed.proj/norm``, and a
# top-level ``norm`` / ``head`` (Vanilla VMamba releases).
_LEGACY_NAMES = ((re.compile(r"\.ln_1\."), ".norm."), (re.compile(r"\.self_attention\."), ".op."),
                 (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
                 (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
                 (re.compile(r"^norm\."), "classifier.norm."), (re.compile(r"^head\."), "classifier.head."))


def checkpoint_filter_fn(state_dict, model):
    """A checkpoint in any layout the authors released (a ``{"model": ..., "model_ema": ...}`` file or a bare
    state_dict, a DDP ``module.`` prefix, an mmengine ``backbone.`` prefix, the legacy key names above) -> the
    keys of ``model``; the first convolution is adapted when the model has other input channels. This is the
    one place checkpoint keys are renamed."""
    from timm.models import adapt_input_conv

    state_dict, _ = load_state_dict_from(state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _LEGACY_NAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    stem = "patch_embed.0.weight"
    own = model.state_dict()
    if stem in out and stem in own and out[stem].shape[1] != own[stem].shape[1]:
        out[stem] = adapt_input_conv(own[stem].shape[1], out[stem])
    return out


# ============================================================================= published models
_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"


def _cfg(url="", **kwargs):
    return {
        "url": url, "custom_load": bool(url), "num_classes": 1000, "input_size": (3, 224, 224),
        "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.0", "classifier": "classifier.head",
        "license": "mit", "paper_ids": "arXiv:2401.10166", "paper_name": "VMamba: Visual State Space Model",
        "origin_url": "https://github.com/MzeroMiko/VMamba", **kwargs,
    }


# One entry per checkpoint the authors released (their README's ImageNet-1K table: #v2cls and #v0cls assets).
default_cfgs = generate_default_cfgs({
    "vmamba_tiny_s1l8.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"),
    "vmamba_small_s2l15.in1k": _cfg(_RELEASES + "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth"),
    "vmamba_base_s2l15.in1k": _cfg(_RELEASES + "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth"),
    "vmamba_tiny_s2l5.in1k": _cfg(_RELEASES + "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth"),
    "vmamba_small_s1l20.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth"),
    "vmamba_base_s1l20.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth"),
    "vanilla_vmamba_tiny.in1k": _cfg(_RELEASES + "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth"),
    "vanilla_vmamba_small.in1k": _cfg(_RELEASES + "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth"),
    "vanilla_vmamba_base.in1k": _cfg(_RELEASES + "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth"),
    "test_vmamba": _cfg(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 192, 192)),
})


def _create_vmamba(variant, pretrained=False, **kwargs):
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if isinstance(pretrained, (str, os.PathLike)):  # a local file, named the timm way
        overlay["file"], pretrained = os.fspath(pretrained), True
    if overlay.get("file") or overlay.get("url"):
        # timm's weights-only reader refuses the authors' files (they pickle their yacs config): VSSM.load_pretrained
        # reads any checkpoint file, so it loads a file or URL given here as it loads the registered releases
        overlay.setdefault("custom_load", True)
    return build_model_with_cfg(
        VSSM, variant, pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_V2_ARGS = dict(
    ssm_d_state=1, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=False,
    ssm_drop_rate=0.0, ssm_init="v0", forward_type="v05_noz", mlp_ratio=4.0, mlp_act_layer="gelu",
    mlp_drop_rate=0.0, gmlp=False, patch_norm=True, norm_layer="ln2d", downsample_version="v3",
    patchembed_version="v2",
)
_V0_ARGS = dict(
    ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=True,
    ssm_drop_rate=0.0, ssm_init="v0", forward_type="v0", mlp_ratio=0.0, patch_norm=True, norm_layer="ln",
    downsample_version="v1", patchembed_version="v1",
)


@register_model
def vmamba_tiny_s1l8(pretrained=False, **kwargs):
    """VMamba-T [s1l8] (vmambav2v_tiny_224): 30.2M params, 4.9 GFLOPs, 82.6 top-1."""
    args = dict(_V2_ARGS, dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained=False, **kwargs):
    """VMamba-S [s2l15] (vmambav2_small_224): 50.1M params, 8.7 GFLOPs, 83.6 top-1."""
    args = dict(_V2_ARGS, dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained=False, **kwargs):
    """VMamba-B [s2l15] (vmambav2_base_224): 88.6M params, 15.4 GFLOPs, 83.9 top-1."""
    args = dict(_V2_ARGS, dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained=False, **kwargs):
    """VMamba-T [s2l5] (vmambav2_tiny_224): 30.7M params, 4.9 GFLOPs, 82.5 top-1."""
    args = dict(_V2_ARGS, dims=96, depths=(2, 2, 5, 2), ssm_ratio=2.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s2l5", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s1l20(pretrained=False, **kwargs):
    """VMamba-S [s1l20] (vmambav2v_small_224): 49.0M params, 8.6 GFLOPs, 83.3 top-1."""
    args = dict(_V2_ARGS, dims=96, depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s1l20", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s1l20(pretrained=False, **kwargs):
    """VMamba-B [s1l20] (vmambav2v_base_224): 86.6M params, 15.2 GFLOPs, 83.8 top-1."""
    args = dict(_V2_ARGS, dims=128, depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path_rate=0.5)
    return _create_vmamba("vmamba_base_s1l20", pretrained, **dict(args, **kwargs))


@register_model
def vanilla_vmamba_tiny(pretrained=False, **kwargs):
    """Vanilla VMamba-T (vmambav0_tiny_224): 22.9M params, 5.6 GFLOPs, 82.2 top-1."""
    args = dict(_V0_ARGS, dims=96, depths=(2, 2, 9, 2), drop_path_rate=0.2)
    return _create_vmamba("vanilla_vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vanilla_vmamba_small(pretrained=False, **kwargs):
    """Vanilla VMamba-S (vmambav0_small_224): 44.4M params, 11.2 GFLOPs, 83.5 top-1."""
    args = dict(_V0_ARGS, dims=96, depths=(2, 2, 27, 2), drop_path_rate=0.3)
    return _create_vmamba("vanilla_vmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def vanilla_vmamba_base(pretrained=False, **kwargs):
    """Vanilla VMamba-B (vmambav0_base_224): 76.3M params, 18.0 GFLOPs, 83.7 top-1."""
    args = dict(_V0_ARGS, dims=128, depths=(2, 2, 27, 2), drop_path_rate=0.5)
    return _create_vmamba("vanilla_vmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def test_vmamba(pretrained=False, **kwargs):
    """A tiny v2-style VMamba for fast tests (no released weights)."""
    args = dict(_V2_ARGS, dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), ssm_ratio=1.0, mlp_ratio=2.0,
                drop_path_rate=0.0)
    return _create_vmamba("test_vmamba", pretrained, **dict(args, **kwargs))
