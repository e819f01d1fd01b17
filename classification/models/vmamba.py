"""VMamba: Visual State Space Model (Liu et al., arXiv 2401.10166).

Building blocks (Linear2d, LayerNorm2d, stems, downsamples, Mlp), the 2-D selective-scan mixer SS2D,
VSSBlock, the classifier VSSM and the dense-prediction Backbone_VSSM, then the nine published
models as timm-registered builders. Parameter names and shapes follow the authors' release so
that its checkpoints load with ``strict=True``.

Layouts: ``norm_layer="ln"`` builds a channel-last model (activations (B, H, W, C), nn.Linear,
nn.LayerNorm); ``"ln2d"`` / ``"bn"`` a channel-first one (activations (B, C, H, W), Linear2d,
LayerNorm2d / BatchNorm2d). Both have identical state_dict keys. The channel-first model keeps its
activations in channels-last *memory* (NCHW shape, NHWC storage): per-pixel linears and norms then
run on contiguous rows and no transposes are materialised.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from selective_scan import ss2d
from selective_scan.layer_norm import layer_norm
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model

__all__ = ["Linear2d", "LayerNorm2d", "SS2D", "VSSBlock", "VSSM", "Backbone_VSSM", "FORWARD_TYPES",
           "NORM_LAYERS", "rename_legacy_keys"]


# ============================================================================= layout helpers
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
        # accept a conv-shaped (out, in, 1, 1) weight as well
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[prefix + "weight"] = weight.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over C of a (B, C, H, W) map.

    The output dtype is the one autocast's layer_norm + the next op would leave: fp32 under autocast, or, for a
    norm marked ``matmul_input`` (its output goes straight into a linear layer, which would cast it), the
    autocast dtype; x's dtype without autocast. On CUDA selective_scan.layer_norm computes it in one kernel
    over channels-last storage (no transpose, one rounding).
    """

    def __init__(self, normalized_shape, eps=1e-5, matmul_input=False, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.matmul_input = matmul_input

    def forward(self, x):
        device = x.device.type
        out_dtype = x.dtype
        if torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device) if self.matmul_input else torch.float32
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype, channel_first=True)


def _norm_before_matmul(norm_layer, dim):
    """``norm_layer(dim)`` for a norm that feeds a linear layer (LayerNorm2d.matmul_input)."""
    return norm_layer(dim, matmul_input=True) if norm_layer is LayerNorm2d else norm_layer(dim)


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
def make_stem(version, in_chans, dim, patch_size, patch_norm, norm_layer, channel_first):
    """Output (B, dim, ceil(H/4), ceil(W/4)) (v2) or (B, dim, H//p, W//p) (v1), in the model's layout.

    Module indices are those of the authors' checkpoints: v1 conv 0 / norm 2;
    v2 conv 0 / norm 2 / conv 5 / norm 7 (the others are layout permutes and the GELU).
    """
    norm = (lambda c: norm_layer(c)) if patch_norm else (lambda c: nn.Identity())
    if version == "v1":
        return nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            _to_channel_last(channel_first),
            norm(dim),
        )
    if version == "v2":
        if patch_size != 4:
            raise ValueError(f"patchembed v2 is two stride-2 convs, i.e. patch_size 4; got {patch_size}")
        return nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            _to_channel_last(channel_first),
            norm(dim // 2),
            _to_channel_first(channel_first),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
            _to_channel_last(channel_first),
            norm(dim),
        )
    raise ValueError(f"unknown patchembed version {version!r}; valid: ['v1', 'v2']")


class PatchMerging2D(nn.Module):
    """Downsample v1: concatenate each 2x2 neighbourhood (odd sizes zero-padded), norm, Linear 4C -> out."""

    def __init__(self, dim, out_dim, norm_layer, channel_first):
        super().__init__()
        self.channel_first = channel_first
        self.reduction = (Linear2d if channel_first else nn.Linear)(4 * dim, out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

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


def make_downsample(version, dim, out_dim, norm_layer, channel_first):
    """Between stages; conv versions keep the authors' indices (conv 1, norm 3)."""
    if version == "v1":
        return PatchMerging2D(dim, out_dim, norm_layer, channel_first)
    if version in ("v2", "v3"):
        conv_args = dict(kernel_size=2, stride=2) if version == "v2" else dict(kernel_size=3, stride=2, padding=1)
        return nn.Sequential(
            _to_channel_first(channel_first),
            nn.Conv2d(dim, out_dim, **conv_args),
            _to_channel_last(channel_first),
            norm_layer(out_dim),
        )
    if version == "none":
        return nn.Identity()
    raise ValueError(f"unknown downsample version {version!r}; valid: ['none', 'v1', 'v2', 'v3']")


class Mlp(nn.Module):
    """fc1 -> act -> fc2; ``gated`` (gMLP) makes fc1 twice as wide and multiplies by act(gate)."""

    def __init__(self, dim, hidden_dim, act_layer=nn.GELU, drop=0.0, channel_first=False, gated=False):
        super().__init__()
        linear = Linear2d if channel_first else nn.Linear
        self.channel_axis = 1 if channel_first else -1
        self.gated = gated
        self.fc1 = linear(dim, 2 * hidden_dim if gated else hidden_dim)
        self.act = act_layer()
        self.fc2 = linear(hidden_dim, dim)
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
    ):
        super().__init__()
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

        self.in_proj = linear(d_model, 2 * d_inner if self.gated else d_inner, bias=bias)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias) if d_conv > 1 else None

        # per-route projections to (dt, B, C) and dt -> d_inner; A = -exp(A_logs); D skip
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

        self.out_norm = LayerNorm2d(d_inner, matmul_input=True) if channel_first else nn.LayerNorm(d_inner)
        self.out_proj = linear(d_inner, d_model, bias=bias)
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
        return ss2d.ss2d_core(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                              routes=self.routes, channel_first=self.channel_first,
                              fp32_scan_inputs=self.fp32_inputs, backend=None if self.core == "auto" else self.core,
                              check=False)

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


# ============================================================================= block, stage
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
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        if ssm_ratio > 0:
            self.norm = _norm_before_matmul(norm_layer, hidden_dim)
            self.op = SS2D(
                d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias, dropout=ssm_drop_rate,
                initialize=ssm_init, forward_type=forward_type, channel_first=channel_first, core=ss2d_core,
            )
        else:
            self.op = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = _norm_before_matmul(norm_layer, hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), act_layer=mlp_act_layer, drop=mlp_drop_rate,
                           channel_first=channel_first, gated=gmlp)
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
    """``blocks`` then ``downsample`` (Identity after the last stage)."""

    def __init__(self, blocks, downsample):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x):
        return self.downsample(self.blocks(x))


class ClassifierHead(nn.Module):
    """norm -> global average pool -> dropout -> Linear (keys ``norm.*``, ``head.*``)."""

    def __init__(self, dim, num_classes, norm_layer, channel_first, drop_rate=0.0):
        super().__init__()
        self.channel_first = channel_first
        self.norm = norm_layer(dim)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, pre_logits=False):
        x = self.norm(x)
        x = F.adaptive_avg_pool2d(x if self.channel_first else x.permute(0, 3, 1, 2), 1).flatten(1)
        x = self.drop(x)
        return x if pre_logits else self.head(x)


# ============================================================================= VSSM
class VSSM(nn.Module):
    """VMamba classifier: stem -> 4 stages of VSSBlocks (downsample between) -> classifier.

    Unknown ``forward_type``, ``norm_layer``, ``downsample_version``, ``patchembed_version``,
    activation or init names raise ValueError at construction, listing the valid values.
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
        ss2d_core=None,
        **kwargs,
    ):
        super().__init__()
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
        self.num_classes = num_classes
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(self.num_layers)]
        self.dims = list(dims)
        self.num_features = self.dims[-1]
        self.depths = list(depths)

        self.patch_embed = make_stem(patchembed_version, in_chans, self.dims[0], patch_size, patch_norm,
                                     norm_cls, self.channel_first)
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
                )
                for rate in block_rates
            ]
            downsample = (make_downsample(downsample_version, self.dims[i], self.dims[i + 1], norm_cls,
                                          self.channel_first)
                          if i < self.num_layers - 1 else nn.Identity())
            self.layers.append(VSSStage(blocks, downsample))
        self.classifier = ClassifierHead(self.num_features, num_classes, norm_cls, self.channel_first, drop_rate)

        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(_legacy_keys_hook)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):  # Linear2d included
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):  # LayerNorm2d included
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        """SSM parameters that should not decay (the authors' optimizer decays A_logs and dt_projs_bias)."""
        return {"A_logs", "Ds", "dt_projs_bias"}

    def set_grad_checkpointing(self, enable=True):
        for m in self.modules():
            if isinstance(m, VSSBlock):
                m.use_checkpoint = enable

    def get_classifier(self):
        return self.classifier.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.head = head.to(self.classifier.norm.weight.device)
        self._init_weights(self.classifier.head)

    def forward_stem(self, x):
        if self.channels_last_memory:
            # before the stem, so its convolutions and norms already run on channels-last storage
            x = x.contiguous(memory_format=torch.channels_last)
        return self.patch_embed(x)

    def forward_features(self, x):
        x = self.forward_stem(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x, pre_logits=False):
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ============================================================================= legacy checkpoint names
_LEGACY_PREFIXES = (("patch_embed.proj.", "patch_embed.0."), ("patch_embed.norm.", "patch_embed.2."),
                    ("norm.", "classifier.norm."), ("head.", "classifier.head."))


def rename_legacy_keys(state_dict, prefix=""):
    """Early VMamba checkpoints (v0) used ``ln_1``/``self_attention``/top-level ``norm``/``head``;
    rename those in place to the current names (no-op for current checkpoints)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        new = name.replace(".ln_1.", ".norm.").replace(".self_attention.", ".op.")
        for old_start, new_start in _LEGACY_PREFIXES:
            if new.startswith(old_start):
                new = new_start + new[len(old_start):]
                break
        if new != name:
            state_dict[prefix + new] = state_dict.pop(key)
    return state_dict


def _legacy_keys_hook(module, state_dict, prefix, *args):
    if any(".ln_1." in k or ".self_attention." in k or k.startswith(prefix + "patch_embed.proj.")
           for k in state_dict):
        rename_legacy_keys(state_dict, prefix)


# ============================================================================= backbone
class Backbone_VSSM(VSSM):
    """VSSM without the classifier, for detection / segmentation.

    Returns a list of contiguous (NCHW) maps, one per ``out_indices`` stage (strides 4/8/16/32), each
    taken before that stage's downsample and normalised by ``outnorm{i}``. ``pretrained``: a
    classification checkpoint (path or dict); its classifier keys are ignored, every other
    difference is reported; a missing file is an error.
    """

    def __init__(self, out_indices=(0, 1, 2, 3), pretrained=None, norm_layer="ln", **kwargs):
        super().__init__(norm_layer=norm_layer, **kwargs)
        norm_cls = NORM_LAYERS[norm_layer.lower()]
        self.out_indices = tuple(out_indices)
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", norm_cls(self.dims[i]))
        del self.classifier
        self.load_report = self.load_pretrained(pretrained) if pretrained is not None else None

    def load_pretrained(self, source, key=None):
        from .checkpoint import load_pretrained
        return load_pretrained(self, source, key=key, strict=False, ignore_prefixes=("classifier.",),
                               expected_missing_prefixes=("outnorm",))

    def forward(self, x):
        x = self.forward_stem(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer.blocks(x)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(x)
                out = out if self.channel_first else out.permute(0, 3, 1, 2)
                # Standard NCHW memory: mmcv's RoIAlign (and other ops that index data_ptr directly)
                # read channels-last storage as if it were NCHW and return scrambled features.
                outs.append(out.contiguous())
            x = layer.downsample(x)
        return outs if self.out_indices else x


# ============================================================================= published models
_V2_DEFAULTS = dict(
    ssm_d_state=1, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=False,
    ssm_drop_rate=0.0, ssm_init="v0", forward_type="v05_noz", mlp_ratio=4.0, mlp_act_layer="gelu",
    mlp_drop_rate=0.0, gmlp=False, patch_norm=True, norm_layer="ln2d", downsample_version="v3",
    patchembed_version="v2",
)
_V0_DEFAULTS = dict(
    ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=True,
    ssm_drop_rate=0.0, ssm_init="v0", forward_type="v0", mlp_ratio=0.0, patch_norm=True, norm_layer="ln",
    downsample_version="v1", patchembed_version="v1",
)


def _create_vssm(defaults, pretrained=False, **kwargs):
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    model = VSSM(**{**defaults, **kwargs})
    if pretrained:
        if pretrained is True:
            raise ValueError("no download URLs are known: pass pretrained=<path to a checkpoint>")
        from .checkpoint import load_pretrained
        load_pretrained(model, pretrained)
    return model


@register_model
def vmamba_tiny_s1l8(pretrained=False, **kwargs):
    """VMamba-T [s1l8] (vmambav2v_tiny_224): 30.2M params, 4.9 GFLOPs, 82.6 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 96, "depths": (2, 2, 8, 2), "ssm_ratio": 1.0,
                         "drop_path_rate": 0.2}, pretrained, **kwargs)


@register_model
def vmamba_small_s2l15(pretrained=False, **kwargs):
    """VMamba-S [s2l15] (vmambav2_small_224): 50.1M params, 8.7 GFLOPs, 83.6 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 96, "depths": (2, 2, 15, 2), "ssm_ratio": 2.0,
                         "drop_path_rate": 0.3}, pretrained, **kwargs)


@register_model
def vmamba_base_s2l15(pretrained=False, **kwargs):
    """VMamba-B [s2l15] (vmambav2_base_224): 88.6M params, 15.4 GFLOPs, 83.9 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 128, "depths": (2, 2, 15, 2), "ssm_ratio": 2.0,
                         "drop_path_rate": 0.6}, pretrained, **kwargs)


@register_model
def vmamba_tiny_s2l5(pretrained=False, **kwargs):
    """VMamba-T [s2l5] (vmambav2_tiny_224): 30.7M params, 4.9 GFLOPs, 82.5 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 96, "depths": (2, 2, 5, 2), "ssm_ratio": 2.0,
                         "drop_path_rate": 0.2}, pretrained, **kwargs)


@register_model
def vmamba_small_s1l20(pretrained=False, **kwargs):
    """VMamba-S [s1l20] (vmambav2v_small_224): 49.0M params, 8.6 GFLOPs, 83.3 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 96, "depths": (2, 2, 20, 2), "ssm_ratio": 1.0,
                         "drop_path_rate": 0.3}, pretrained, **kwargs)


@register_model
def vmamba_base_s1l20(pretrained=False, **kwargs):
    """VMamba-B [s1l20] (vmambav2v_base_224): 86.6M params, 15.2 GFLOPs, 83.8 top-1."""
    return _create_vssm({**_V2_DEFAULTS, "dims": 128, "depths": (2, 2, 20, 2), "ssm_ratio": 1.0,
                         "drop_path_rate": 0.5}, pretrained, **kwargs)


@register_model
def vanilla_vmamba_tiny(pretrained=False, **kwargs):
    """Vanilla VMamba-T (vmambav0_tiny_224): 22.9M params, 5.6 GFLOPs, 82.2 top-1."""
    return _create_vssm({**_V0_DEFAULTS, "dims": 96, "depths": (2, 2, 9, 2), "drop_path_rate": 0.2},
                        pretrained, **kwargs)


@register_model
def vanilla_vmamba_small(pretrained=False, **kwargs):
    """Vanilla VMamba-S (vmambav0_small_224): 44.4M params, 11.2 GFLOPs, 83.5 top-1."""
    return _create_vssm({**_V0_DEFAULTS, "dims": 96, "depths": (2, 2, 27, 2), "drop_path_rate": 0.3},
                        pretrained, **kwargs)


@register_model
def vanilla_vmamba_base(pretrained=False, **kwargs):
    """Vanilla VMamba-B (vmambav0_base_224): 76.3M params, 18.0 GFLOPs, 83.7 top-1."""
    return _create_vssm({**_V0_DEFAULTS, "dims": 128, "depths": (2, 2, 27, 2), "drop_path_rate": 0.5},
                        pretrained, **kwargs)
