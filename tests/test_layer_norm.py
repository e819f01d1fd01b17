"""layer_norm_lastdim (Triton LayerNorm writing a lower-precision output) equals F.layer_norm + cast,
forward and backward: interpreted on the CPU, compiled on CUDA; and VMamba under CUDA autocast gives
the same logits and gradients with the kernel as with PyTorch's layer_norm."""

import pytest
import torch
import torch.nn.functional as F

INTERPRETED = r"""
import torch, torch.nn.functional as F
from classification.models.layer_norm import layer_norm_lastdim
torch.manual_seed(0)
cases = 0
# (C, leading shape, out dtype): non-power-of-two C, one row, rows not a multiple of the tile, empty
for C, lead, out_dtype in [(96, (2, 5, 7), torch.float16), (192, (3, 11), torch.float32),
                           (37, (130,), torch.bfloat16), (768, (1,), torch.float16), (16, (0, 4), torch.float16)]:
    x = (torch.randn(*lead, C) * 3 + 1).requires_grad_()
    w = torch.randn(C).requires_grad_()
    b = torch.randn(C).requires_grad_()
    y = layer_norm_lastdim(x, w, b, 1e-6, out_dtype)
    ref = F.layer_norm(x, (C,), w, b, 1e-6).to(out_dtype)
    assert y.dtype == out_dtype and y.shape == ref.shape
    # one rounding of the same fp32 value (the interpreter rounds bf16 by truncation: 1 ulp)
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[out_dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=ulp, atol=ulp)
    if x.numel():
        g = torch.randn(y.shape).to(out_dtype)
        got = torch.autograd.grad(y, (x, w, b), g)
        want = torch.autograd.grad(ref, (x, w, b), g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    cases += 1
print("checked", cases)
"""


def test_interpreted_kernel_equals_layer_norm_and_cast(triton_interpreted):
    assert "checked 5" in triton_interpreted(INTERPRETED)


def test_cpu_falls_back_to_layer_norm():
    from classification.models.layer_norm import layer_norm_lastdim
    x, w, b = torch.randn(4, 9, 24), torch.randn(24), torch.randn(24)
    torch.testing.assert_close(layer_norm_lastdim(x, w, b, 1e-5, torch.bfloat16),
                               F.layer_norm(x, (24,), w, b, 1e-5).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernel_equals_layer_norm_and_cast(out_dtype):
    from classification.models.layer_norm import layer_norm_lastdim
    torch.manual_seed(0)
    for C, rows in [(96, 128 * 3136 // 64), (192, 1000), (1536, 49), (37, 5)]:
        x = (torch.randn(rows, C, device="cuda") * 2 + 0.5).requires_grad_()
        w = torch.randn(C, device="cuda").requires_grad_()
        b = torch.randn(C, device="cuda").requires_grad_()
        y = layer_norm_lastdim(x, w, b, 1e-5, out_dtype)
        ref = F.layer_norm(x, (C,), w, b, 1e-5).to(out_dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, ref, **tol)
        if out_dtype != torch.float32:  # one rounding of (nearly) the same fp32 value: rarely different
            assert (y != ref).float().mean() < 1e-3
        g = torch.randn_like(ref)
        for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3 * max(1.0, rows / 1000))


@pytest.mark.cuda
def test_vmamba_autocast_same_with_and_without_kernel(monkeypatch):
    import timm
    import classification.models  # noqa: F401
    from classification.models import vmamba
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny_s1l8", dims=32, depths=(1, 1, 2, 1), num_classes=10).cuda().eval()  # eval: no drop path
    x = torch.randn(2, 3, 96, 128, device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        out.float().sum().backward()
        return out.float(), [p.grad.clone() for p in model.parameters()]

    out, grads = run()
    monkeypatch.setattr(vmamba, "layer_norm_lastdim", lambda x, w, b, eps, dtype:
                        F.layer_norm(x, x.shape[-1:], w, b, eps).to(dtype))
    ref_out, ref_grads = run()
    torch.testing.assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)
