"""Cross-scan / cross-merge: the paper's four routes (row-major, column-major and their reverses),
adjointness, autograd, and the Triton kernels (run by the Triton interpreter on CPU) against the torch
implementation."""
import textwrap

import pytest
import torch

from selective_scan.cross_scan import ROUTE_SETS, cross_merge, cross_scan


def route_orders(routes, H, W):
    """Route k's visiting order as flat row-major indices, written straight from the route definitions."""
    row_major = torch.arange(H * W)
    col_major = torch.arange(H * W).view(H, W).t().reshape(-1)  # position w*H + h holds h*W + w
    per_route = {
        "cross2d": [row_major, col_major, row_major.flip(0), col_major.flip(0)],
        "unidi": [row_major] * 4,
        "bidi": [row_major, row_major, row_major.flip(0), row_major.flip(0)],
    }
    return per_route[routes]


def make_map(B, C, H, W, channel_first, dtype=torch.float64):
    x = torch.randn(B, C, H, W, dtype=dtype)
    return x if channel_first else x.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("routes", sorted(ROUTE_SETS))
@pytest.mark.parametrize("channel_first", [True, False])
def test_scan_follows_the_route_orders(routes, channel_first):
    B, C, H, W = 2, 3, 5, 7  # H != W catches row/column mix-ups
    x = make_map(B, C, H, W, channel_first)
    xs = cross_scan(x, channel_first=channel_first, routes=routes, backend="torch")
    assert xs.shape == (B, 4, C, H * W)
    x_flat = (x if channel_first else x.permute(0, 3, 1, 2)).reshape(B, C, H * W)
    for k, order in enumerate(route_orders(routes, H, W)):
        torch.testing.assert_close(xs[:, k], x_flat[:, :, order], rtol=0, atol=0)


@pytest.mark.parametrize("routes", sorted(ROUTE_SETS))
@pytest.mark.parametrize("channel_first", [True, False])
def test_merge_is_adjoint_and_backward_of_scan(routes, channel_first):
    B, C, H, W = 2, 3, 5, 7
    x = make_map(B, C, H, W, channel_first).requires_grad_()
    ys = torch.randn(B, 4, C, H, W, dtype=torch.float64)
    xs = cross_scan(x, channel_first=channel_first, routes=routes, backend="torch")
    merged = cross_merge(ys, channel_first=channel_first, routes=routes, backend="torch")
    assert merged.shape == x.shape
    # <scan(x), y> == <x, merge(y)>
    torch.testing.assert_close((xs * ys.flatten(3)).sum(), (x * merged).sum())
    # backward of scan is merge
    xs.backward(ys.flatten(3))
    torch.testing.assert_close(x.grad, merged, rtol=0, atol=0)
    # backward of merge is scan
    ys.requires_grad_()
    g = make_map(B, C, H, W, channel_first)
    cross_merge(ys, channel_first=channel_first, routes=routes, backend="torch").backward(g)
    torch.testing.assert_close(ys.grad.flatten(3), cross_scan(g, channel_first, routes, backend="torch"))


def test_merge_accepts_flat_routes_with_hw_and_rejects_bad_input():
    ys = torch.randn(1, 4, 2, 3 * 5)
    torch.testing.assert_close(cross_merge(ys, hw=(3, 5)), cross_merge(ys.view(1, 4, 2, 3, 5)))
    with pytest.raises(ValueError, match="cross2d"):
        cross_scan(torch.randn(1, 2, 3, 3), routes="diagonal")
    with pytest.raises(ValueError, match="hw"):
        cross_merge(ys)


TRITON_VS_TORCH = textwrap.dedent("""
    import torch
    from selective_scan.cross_scan import ROUTE_SETS, cross_merge, cross_scan
    torch.manual_seed(0)
    checked = 0
    for routes in ROUTE_SETS:
        for channel_first in (True, False):
            for dtype in (torch.float32, torch.float16):
                B, C, H, W = 2, 5, 7, 9  # partial tiles along every axis
                x = torch.randn(B, C, H, W, dtype=dtype)
                x = x if channel_first else x.permute(0, 2, 3, 1).contiguous()
                ys = torch.randn(B, 4, C, H, W, dtype=dtype)
                outs = {}
                for backend in ("torch", "triton"):
                    xg = x.clone().requires_grad_()
                    yg = ys.clone().requires_grad_()
                    xs = cross_scan(xg, channel_first, routes, backend=backend)
                    merged = cross_merge(yg, channel_first=channel_first, routes=routes, backend=backend)
                    (xs.float() * ys.flatten(3).float()).sum().backward()
                    (merged.float() * x.float()).sum().backward()
                    outs[backend] = (xs, merged, xg.grad, yg.grad)
                # scans (xs, grad of ys) are copies: exact; merges (merged, grad of x) are sums of 4
                sum_tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=4e-3)
                for i, (a, b) in enumerate(zip(outs["torch"], outs["triton"])):
                    assert a.shape == b.shape and a.dtype == b.dtype, (routes, channel_first, a.shape, b.shape)
                    tol = dict(rtol=0, atol=0) if i in (0, 3) else sum_tol
                    torch.testing.assert_close(a.float(), b.float(), **tol)
                checked += 1
    # a strided (non-contiguous) input and an fp32 merge of fp16-typed output
    x = torch.randn(2, 6, 7, 9)[:, ::2]
    torch.testing.assert_close(cross_scan(x, backend="triton"), cross_scan(x, backend="torch"))
    ys = torch.randn(1, 4, 3, 4, 6)
    torch.testing.assert_close(cross_merge(ys, backend="triton", out_dtype=torch.float16),
                               cross_merge(ys, backend="torch", out_dtype=torch.float16))
    print("checked", checked)
""")


def test_triton_interpreted_equals_torch(triton_interpreted):
    assert "checked 12" in triton_interpreted(TRITON_VS_TORCH)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_cuda_equals_torch(dtype):
    torch.manual_seed(0)
    for routes in ROUTE_SETS:
        for channel_first in (True, False):
            x = make_map(3, 70, 33, 45, channel_first, dtype=dtype).cuda()
            ys = torch.randn(3, 4, 70, 33, 45, device="cuda", dtype=torch.float32)
            torch.testing.assert_close(cross_scan(x, channel_first, routes), cross_scan(x, channel_first, routes,
                                                                                       backend="torch"))
            torch.testing.assert_close(cross_merge(ys, channel_first=channel_first, routes=routes),
                                       cross_merge(ys, channel_first=channel_first, routes=routes, backend="torch"))
