"""VMamba models: the state-dict layout and parameter counts of the authors' release, layouts, odd input sizes,
construction errors, builders, timm registration and build_model with the shipped yaml configs."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import timm
import torch
from selective_scan import triton_scan

import classification.models as models
from classification.config import load_config
from classification.models import VSSM, Backbone_VSSM, build_model

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "classification" / "configs" / "vssm"

# builder, the authors' yaml, exact parameter count (1000 classes; the authors' counting, head included)
PUBLISHED = [
    ("vmamba_tiny_s1l8", "vmambav2v_tiny_224", 30_249_064),
    ("vmamba_small_s2l15", "vmambav2_small_224", 50_147_752),
    ("vmamba_base_s2l15", "vmambav2_base_224", 88_557_800),
    ("vmamba_tiny_s2l5", "vmambav2_tiny_224", 30_705_832),
    ("vmamba_small_s1l20", "vmambav2v_small_224", 49_012_840),
    ("vmamba_base_s1l20", "vmambav2v_base_224", 86_614_504),
    ("vanilla_vmamba_tiny", "vmambav0_tiny_224", 22_893_448),
    ("vanilla_vmamba_small", "vmambav0_small_224", 44_417_416),
    ("vanilla_vmamba_base", "vmambav0_base_224", 76_254_056),
]


def release_state_dict_shapes(v0, dim=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, num_classes=1000):
    """The key -> shape table of the authors' release files, built from their layout rules (not from our code)."""
    dims = [dim * 2 ** i for i in range(4)]
    N, K = (16, 4) if v0 else (1, 4)
    s = {}
    if v0:
        s.update({"patch_embed.0.weight": (dim, 3, 4, 4), "patch_embed.0.bias": (dim,),
                  "patch_embed.2.weight": (dim,), "patch_embed.2.bias": (dim,)})
    else:
        s.update({"patch_embed.0.weight": (dim // 2, 3, 3, 3), "patch_embed.0.bias": (dim // 2,),
                  "patch_embed.2.weight": (dim // 2,), "patch_embed.2.bias": (dim // 2,),
                  "patch_embed.5.weight": (dim, dim // 2, 3, 3), "patch_embed.5.bias": (dim,),
                  "patch_embed.7.weight": (dim,), "patch_embed.7.bias": (dim,)})
    for i, depth in enumerate(depths):
        C = dims[i]
        D, R = int(ssm_ratio * C), math.ceil(C / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "norm.weight": (C,), p + "norm.bias": (C,),
                      p + "op.x_proj_weight": (K, R + 2 * N, D), p + "op.A_logs": (K * D, N), p + "op.Ds": (K * D,),
                      p + "op.dt_projs_weight": (K, D, R), p + "op.dt_projs_bias": (K, D),
                      p + "op.out_norm.weight": (D,), p + "op.out_norm.bias": (D,),
                      p + "op.in_proj.weight": ((2 * D if v0 else D), C), p + "op.conv2d.weight": (D, 1, 3, 3),
                      p + "op.out_proj.weight": (C, D)})
            if v0:
                s[p + "op.conv2d.bias"] = (D,)
            else:
                s.update({p + "norm2.weight": (C,), p + "norm2.bias": (C,),
                          p + "mlp.fc1.weight": (4 * C, C), p + "mlp.fc1.bias": (4 * C,),
                          p + "mlp.fc2.weight": (C, 4 * C), p + "mlp.fc2.bias": (C,)})
        if i < 3:
            p = f"layers.{i}.downsample."
            if v0:
                s.update({p + "reduction.weight": (2 * C, 4 * C), p + "norm.weight": (4 * C,), p + "norm.bias": (4 * C,)})
            else:
                s.update({p + "1.weight": (2 * C, C, 3, 3), p + "1.bias": (2 * C,),
                          p + "3.weight": (2 * C,), p + "3.bias": (2 * C,)})
    s.update({"classifier.norm.weight": (dims[3],), "classifier.norm.bias": (dims[3],),
              "classifier.head.weight": (num_classes, dims[3]), "classifier.head.bias": (num_classes,)})
    return s


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vmamba_tiny_state_dict_equals_the_release_layout():
    with torch.device("meta"):
        model = models.vmamba_tiny_s1l8()
    expected = release_state_dict_shapes(v0=False)
    assert len(expected) == 276
    assert shapes(model) == expected
    # stage 0 of the VMamba-T release file
    assert expected["layers.0.blocks.0.op.x_proj_weight"] == (4, 8, 96)


def test_vanilla_vmamba_tiny_state_dict_equals_the_release_layout():
    with torch.device("meta"):
        model = models.vanilla_vmamba_tiny()
    assert shapes(model) == release_state_dict_shapes(v0=True, depths=(2, 2, 9, 2), ssm_ratio=2.0)


@pytest.mark.parametrize("builder,config_name,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_and_yaml_configs(builder, config_name, expected):
    with torch.device("meta"):
        model = getattr(models, builder)()
        from_yaml = build_model(load_config(str(CONFIG_DIR / f"{config_name}.yaml")))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert shapes(from_yaml) == shapes(model)
    assert from_yaml.channel_first == model.channel_first == (not builder.startswith("vanilla"))


def test_timm_registration_and_overrides():
    with torch.device("meta"):
        model = timm.create_model("vmamba_tiny_s1l8", num_classes=10, drop_path_rate=0.0)
    assert model.classifier.head.out_features == 10
    assert all(isinstance(b.drop_path, torch.nn.Identity) for layer in model.layers for b in layer.blocks)
    assert set(models.BUILDERS) <= set(timm.list_models("*vmamba*"))


def test_build_model_timm_type():
    config = load_config(opts=["MODEL.TYPE", "timm", "MODEL.NAME", "vanilla_vmamba_tiny", "MODEL.NUM_CLASSES", "7"])
    with torch.device("meta"):
        model = build_model(config)
    assert model.classifier.head.out_features == 7
    config.MODEL.TYPE = "convnet"
    with pytest.raises(ValueError, match="vssm"):
        build_model(config)


def tiny_kwargs(norm_layer="ln2d", **overrides):
    """A small v2 model: every code path of the published one, a few thousand parameters."""
    kw = dict(dims=8, depths=(1, 1, 2, 1), ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False,
              forward_type="v05_noz", mlp_ratio=2.0, downsample_version="v3", patchembed_version="v2",
              norm_layer=norm_layer, drop_path_rate=0.0, num_classes=5)
    kw.update(overrides)
    return kw


TINY_VARIANTS = {
    "v2_ln2d": tiny_kwargs("ln2d"),
    "v2_ln": tiny_kwargs("ln"),
    "v2_bn_gated_v1down": tiny_kwargs("bn", forward_type="v2", downsample_version="v1", patchembed_version="v1"),
    "v0": tiny_kwargs("ln", forward_type="v0", ssm_d_state=4, ssm_ratio=2.0, mlp_ratio=0.0, ssm_conv_bias=True,
                      downsample_version="v1", patchembed_version="v1"),
    "v052d_bidi_v2down": tiny_kwargs("ln2d", forward_type="v052d_noz", downsample_version="v2"),
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_forward_backward_odd_size(variant):
    torch.manual_seed(0)
    model = VSSM(**TINY_VARIANTS[variant]).train()
    x = torch.randn(2, 3, 65, 97)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    # every SSM parameter learns
    assert model.layers[0].blocks[0].op.A_logs.grad.abs().sum() > 0


def test_channel_first_equals_channel_last():
    torch.manual_seed(0)
    last = VSSM(**tiny_kwargs("ln")).eval()
    first = VSSM(**tiny_kwargs("ln2d")).eval()
    assert shapes(first) == shapes(last)
    first.load_state_dict(last.state_dict(), strict=True)
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        torch.testing.assert_close(first(x), last(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first.forward_features(x), last.forward_features(x).permute(0, 3, 1, 2),
                                   rtol=1e-5, atol=1e-5)
        nhwc = first(x)
        first.channels_last_memory = False  # NCHW storage: same numbers
        torch.testing.assert_close(first(x), nhwc, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_drop_path():
    torch.manual_seed(0)
    model = VSSM(**tiny_kwargs(drop_path_rate=0.0)).train()
    x = torch.randn(1, 3, 33, 31)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6, msg=n)

    dropping = VSSM(**tiny_kwargs(drop_path_rate=0.5))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in dropping.layers for b in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 5).tolist())
    dropping.train()
    torch.manual_seed(1)
    a = dropping(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, dropping(x))  # stochastic in training
    dropping.eval()
    torch.testing.assert_close(dropping(x), dropping(x))


def test_backbone_outputs_strides_before_downsample():
    torch.manual_seed(0)
    backbone = Backbone_VSSM(out_indices=(0, 1, 2, 3), **tiny_kwargs("ln2d")).eval()
    outs = backbone(torch.randn(1, 3, 65, 97))
    # stem v2 and downsample v3 give ceil(H / 2) per stride-2 step
    assert [tuple(o.shape) for o in outs] == [(1, 8, 17, 25), (1, 16, 9, 13), (1, 32, 5, 7), (1, 64, 3, 4)]
    assert not hasattr(backbone, "classifier")
    last = Backbone_VSSM(out_indices=(1, 3), **tiny_kwargs("ln")).eval()
    assert [tuple(o.shape) for o in last(torch.randn(1, 3, 64, 64))] == [(1, 16, 8, 8), (1, 64, 2, 2)]


@pytest.mark.parametrize("name,value", [("forward_type", "v9_noz"), ("norm_layer", "gn"),
                                        ("downsample_version", "v7"), ("patchembed_version", "v3"),
                                        ("ssm_act_layer", "tanh"), ("ssm_init", "v9")])
def test_unknown_choices_fail_at_construction_listing_valid_values(name, value):
    with pytest.raises(ValueError) as err:
        VSSM(**tiny_kwargs(**{name: value}))
    message = str(err.value)
    assert repr(value) in message and "valid" in message
    valid_example = {"forward_type": "v05_noz", "norm_layer": "ln2d", "downsample_version": "v3",
                     "patchembed_version": "v2", "ssm_act_layer": "silu", "ssm_init": "v0"}[name]
    assert valid_example in message


def test_v0_forward_type_requires_channel_last():
    with pytest.raises(ValueError, match="channel-last"):
        VSSM(**tiny_kwargs("ln2d", forward_type="v0"))


def test_ssm_init_follows_mamba():
    model = VSSM(**tiny_kwargs())
    op = model.layers[1].blocks[0].op  # C = 16, D = 16, R = 1, N = 1
    dt = torch.nn.functional.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert op.dt_projs_weight.abs().max() <= op.dt_rank ** -0.5
    torch.testing.assert_close(op.A_logs, torch.zeros_like(op.A_logs))  # log(1) with N = 1
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    fc1 = model.layers[3].blocks[0].mlp.fc1  # (128, 64): enough samples for the std
    assert fc1.bias.abs().sum() == 0 and 0.017 < fc1.weight.std() < 0.023
    assert {"A_logs", "Ds"} <= model.no_weight_decay_keywords()


@pytest.mark.cuda
def test_vmamba_tiny_on_cuda_matches_cpu_and_trains_under_amp():
    torch.manual_seed(0)
    model = models.vmamba_tiny_s1l8(num_classes=10).eval()
    x = torch.randn(2, 3, 97, 65)
    with torch.no_grad():
        expected = model(x)
        model.cuda()
        torch.testing.assert_close(model(x.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
    model.train()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(4, 3, 224, 224, device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", models.BUILDERS)
def test_published_models_trace_without_graph_breaks(name):
    """torch.compile sees each published model (one block per stage: every kind of block) as one graph, in
    inference and in training mode (drop path on)."""
    model = getattr(models, name)(depths=(1, 1, 1, 1), num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    for training in (False, True):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.train(training))(x)
        assert explanation.graph_break_count == 0, (training, [b.reason for b in explanation.break_reasons])
        assert explanation.graph_count == 1


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_whole_model_compiles_without_graph_breaks(device):
    # fullgraph=True fails on any graph break: the scan, the fused SS2D core, the cross-scan and the
    # LayerNorm kernels must all be traceable ops (CUDA: TF32 convolutions and other kernel choices, so looser)
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.manual_seed(0)
    model = models.vmamba_tiny_s1l8(dims=16, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0).to(device)
    x = torch.randn(2, 3, 64, 96, device=device)
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, **tol)
    out.square().sum().backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=10 * tol["rtol"], atol=tol["atol"])


KERNEL_LOG = """
import logging

import torch

torch.cuda.is_available = lambda: True  # a GPU, as the models' log sees it
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("classification.models.vmamba").addHandler(handler)
import timm

import classification.models  # noqa: F401

timm.create_model("vmamba_tiny_s1l8")
timm.create_model("vanilla_vmamba_tiny")
assert [record.levelno for record in records] == [logging.WARNING], records
print(records[0].getMessage())
"""


def test_models_warn_once_on_a_gpu_without_the_extensions_cuda_kernels():
    env = dict(os.environ, SELECTIVE_SCAN_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", KERNEL_LOG], env=env, capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = "the Triton kernels" if triton_scan.available() else "the PyTorch path"
    assert "has no CUDA kernels (extension not importable (SELECTIVE_SCAN_NO_EXTENSION is set))" in proc.stdout
    assert f"CUDA tensors run {path}" in proc.stdout
