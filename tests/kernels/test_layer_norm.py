"""selective_scan.layer_norm (a LayerNorm kernel writing its output in a chosen dtype, over the last axis or
over the channels of a channels-last map) equals F.layer_norm + cast, forward and backward; the CUDA kernel on
the GPU, the dispatch rule and the PyTorch path everywhere; and VMamba under CUDA autocast gives the same
logits and gradients with the kernel as with PyTorch's layer_norm."""

import pytest
import torch
import torch.nn.functional as F

from selective_scan import layer_norm as ln


def _reference(x, w, b, eps, out_dtype, channel_first):
    rows = x.permute(0, 2, 3, 1) if channel_first else x
    y = F.layer_norm(rows, rows.shape[-1:], w, b, eps).to(out_dtype)
    return y.permute(0, 3, 1, 2) if channel_first else y


def test_cpu_path_is_layer_norm_and_cast():
    x = torch.randn(2, 24, 5, 3).to(memory_format=torch.channels_last)
    w, b = torch.randn(24), torch.randn(24)
    assert not ln.kernel_takes(x, w, b, channel_first=True)
    y = ln.layer_norm(x, w, b, 1e-5, torch.bfloat16, channel_first=True)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _reference(x, w, b, 1e-5, torch.bfloat16, True), rtol=0, atol=0)
    flat = torch.randn(4, 9, 24)
    torch.testing.assert_close(ln.layer_norm(flat, w, b), F.layer_norm(flat, (24,), w, b), rtol=0, atol=0)


def test_channel_first_needs_a_map():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ln.layer_norm(torch.randn(3, 8), torch.ones(8), torch.zeros(8), channel_first=True)


# (C, leading shape): stage widths of VMamba-T/S/B, C not a multiple of 128, rows not a multiple of a block
_CASES = [(96, (128 * 3136 // 64,)), (48, (3, 37)), (192, (1000,)), (384, (7, 11)), (768, (49,)), (1024, (13,)),
          (36, (5,))]


@pytest.mark.cuda
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_equals_layer_norm_and_cast(in_dtype, out_dtype):
    torch.manual_seed(0)
    for C, lead in _CASES:
        x = (torch.randn(*lead, C, device="cuda") * 2 + 0.5).to(in_dtype).requires_grad_()
        w = torch.randn(C, device="cuda").requires_grad_()
        b = torch.randn(C, device="cuda").requires_grad_()
        assert ln.kernel_takes(x, w, b)
        y = ln.layer_norm(x, w, b, 1e-5, out_dtype)
        ref = _reference(x.float(), w, b, 1e-5, out_dtype, False)
        assert y.dtype == out_dtype and y.shape == x.shape
        tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, ref, **tol)
        if out_dtype != torch.float32:  # one rounding of (nearly) the same fp32 value: rarely different
            assert (y != ref).float().mean() < 1e-3
        g = torch.randn_like(ref)
        got = torch.autograd.grad(y, (x, w, b), g)
        want = torch.autograd.grad(ref, (x, w, b), g)
        assert got[0].dtype == in_dtype
        rows = x.numel() // C
        grad_tol = 1e-2 if in_dtype != torch.float32 else 1e-4
        for a, e in zip(got, want):
            torch.testing.assert_close(a.float(), e.float(), rtol=grad_tol, atol=grad_tol * max(1.0, rows / 1000))
    with torch.no_grad():  # the no-grad path calls the op directly
        torch.testing.assert_close(ln.layer_norm(x, w, b, 1e-5, out_dtype), y)


@pytest.mark.cuda
def test_cuda_channel_first_map_in_place():
    torch.manual_seed(0)
    x = torch.randn(3, 96, 14, 9, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(96, device="cuda").requires_grad_()
    b = torch.randn(96, device="cuda").requires_grad_()
    assert ln.kernel_takes(x, w, b, channel_first=True)
    y = ln.layer_norm(x, w, b, 1e-6, torch.float16, channel_first=True)
    ref = _reference(x, w, b, 1e-6, torch.float16, True)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    g = torch.randn_like(ref).contiguous()  # NCHW-contiguous gradient: the backward makes its own rows
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_dispatch_rule_and_misaligned_views():
    w, b = torch.randn(96, device="cuda"), torch.randn(96, device="cuda")
    nchw = torch.randn(2, 96, 5, 5, device="cuda")  # channels not contiguous: PyTorch path, same values
    assert not ln.kernel_takes(nchw, w, b, channel_first=True)
    torch.testing.assert_close(ln.layer_norm(nchw, w, b, channel_first=True), _reference(nchw, w, b, 1e-5, torch.float32, True))
    assert not ln.kernel_takes(torch.randn(4, 2048, device="cuda"), torch.ones(2048, device="cuda"),
                               torch.zeros(2048, device="cuda"))
    assert not ln.kernel_takes(torch.randn(4, 96, device="cuda"), w.half(), b.half())
    # a contiguous view whose data pointer is not 16-byte aligned (a slice of a flat buffer)
    flat = torch.randn(10 * 96 + 1, device="cuda")
    x = flat[1:].view(10, 96)
    assert ln.kernel_takes(x, w, b)
    torch.testing.assert_close(ln.layer_norm(x, w, b), _reference(x, w, b, 1e-5, torch.float32, False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_vmamba_autocast_same_with_and_without_kernel(monkeypatch):
    import timm
    import classification.models  # noqa: F401
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
    monkeypatch.setattr(ln, "_CUDA_OPS", False)
    ref_out, ref_grads = run()
    torch.testing.assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)
