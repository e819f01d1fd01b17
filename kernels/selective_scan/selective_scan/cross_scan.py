"""Cross-scan and cross-merge: SS2D's mapping between a 2-D feature map and K = 4 1-D sequences, and the
route definitions every SS2D implementation in this package uses.

``cross_scan`` turns a map (B, C, H, W) -- or (B, H, W, C) with ``channel_first=False`` -- into
``xs`` (B, 4, C, L), L = H * W, where route k visits the positions in its own order. ``cross_merge``
is its adjoint: it takes ys (B, 4, C, H, W) (or (B, 4, C, L) plus ``hw``), puts every route's
values back where they came from and sums the four. Hence the backward of one is the other.
``route_positions`` gives the same orders as index maps (the fused SS2D core walks the map through them).

Route sets (a route is "transposed" = column-major, and/or "reversed"), as the authors' cross-scan defines them:
  cross2d: row-major, column-major, row-major reversed, column-major reversed (VMamba)
  unidi:   row-major x 4
  bidi:    row-major, row-major, reversed, reversed

Two backends with identical results: Triton kernels (default on CUDA; also run on CPU tensors under
``TRITON_INTERPRET=1``) and plain torch (default elsewhere).

Memory layout: the merged output is always stored channels-last (physically (B, H, W, C)); with
``channel_first=True`` the (B, C, H, W) view of that storage is returned. The out-norm and
projection that follow it in SS2D then run on contiguous rows without a transpose copy.
"""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["ROUTE_SETS", "route_positions", "cross_scan", "cross_merge", "CrossScan", "CrossMerge"]

# (transposed, reversed) per route
ROUTE_SETS = {
    "cross2d": ((False, False), (True, False), (False, True), (True, True)),
    "unidi": ((False, False),) * 4,
    "bidi": ((False, False), (False, False), (False, True), (False, True)),
}
BACKENDS = ("triton", "torch")


def _check_routes(routes):
    if routes not in ROUTE_SETS:
        raise ValueError(f"unknown route set {routes!r}; valid: {sorted(ROUTE_SETS)}")
    return ROUTE_SETS[routes]


@functools.lru_cache(maxsize=64)
def route_positions(height: int, width: int, routes: str = "cross2d", device=None) -> torch.Tensor:
    """(4, L) int64: the raster position (h * W + w) route k visits at its step t, i.e. xs[:, k, :, t] =
    x.flatten(2)[:, :, positions[k, t]]. Cached per map size and device (read-only: do not modify)."""
    raster = torch.arange(height * width, device=device).view(height, width)
    orders = []
    for transposed, reversed_ in _check_routes(routes):
        order = (raster.t() if transposed else raster).flatten()
        orders.append(order.flip(0) if reversed_ else order)
    return torch.stack(orders)


def _pick_backend(backend, tensor):
    if backend is None:
        # a jit trace (fvcore's FLOP counter) hands traced sizes to the kernel launch: trace torch ops
        use_triton = tensor.is_cuda and triton is not None and not torch.jit.is_tracing()
        return "triton" if use_triton else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown cross-scan backend {backend!r}; valid: {list(BACKENDS)} or None")
    if backend == "triton" and triton is None:
        raise RuntimeError("cross-scan backend 'triton' requested but triton is not installed")
    return backend


def _as_channel_first(x, channel_first):
    """A (B, C, H, W) view of a map given in either layout (no copy)."""
    return x if channel_first else x.permute(0, 3, 1, 2)


def _empty_merged(ref, B, C, H, W, dtype):
    """Channels-last storage, returned as its (B, C, H, W) view."""
    return torch.empty((B, H, W, C), dtype=dtype, device=ref.device).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- torch backend
def _scan_torch(x_cf, route_set):
    B, C, H, W = x_cf.shape
    xs = x_cf.new_empty((B, len(route_set), C, H * W))
    for k, (transposed, reversed_) in enumerate(route_set):
        src = x_cf.transpose(2, 3) if transposed else x_cf
        if reversed_:  # reversing a raster order == flipping both spatial axes
            src = src.flip((-2, -1))
        xs[:, k].view(B, C, *src.shape[2:]).copy_(src)
    return xs


def _merge_torch(ys, H, W, out_dtype, route_set):
    B, K, C, L = ys.shape
    # sum the routes sharing an orientation first, so only one transpose is paid
    by_orientation = {}
    for k, (transposed, reversed_) in enumerate(route_set):
        v = ys[:, k].flip(-1) if reversed_ else ys[:, k]
        by_orientation[transposed] = v if transposed not in by_orientation else by_orientation[transposed] + v
    out = _empty_merged(ys, B, C, H, W, out_dtype)
    parts = []
    if False in by_orientation:
        parts.append(by_orientation[False].view(B, C, H, W))
    if True in by_orientation:
        parts.append(by_orientation[True].view(B, C, W, H).transpose(2, 3))
    out.copy_(parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return out


# ----------------------------------------------------------------------------- triton backend
if triton is not None:

    @triton.jit
    def _route_index(h, w, H, W, TRANSPOSED: tl.constexpr, REVERSED: tl.constexpr):
        if TRANSPOSED:
            idx = w * H + h
        else:
            idx = h * W + w
        if REVERSED:
            idx = H * W - 1 - idx
        return idx

    @triton.jit
    def _tile(pid_hw, pid_c, C, H, W, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
        n_tiles_w = tl.cdiv(W, BW)
        c = pid_c * BC + tl.arange(0, BC)[:, None, None]
        h = (pid_hw // n_tiles_w) * BH + tl.arange(0, BH)[None, :, None]
        w = (pid_hw % n_tiles_w) * BW + tl.arange(0, BW)[None, None, :]
        mask = (c < C) & (h < H) & (w < W)
        return c, h, w, mask

    @triton.jit
    def _cross_scan_kernel(
        x_ptr, xs_ptr, C, H, W,
        sx_b, sx_c, sx_h, sx_w,
        T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
        BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    ):
        pid_b = tl.program_id(2).to(tl.int64)
        c, h, w, mask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, BC, BH, BW)
        v = tl.load(x_ptr + pid_b * sx_b + c * sx_c + h * sx_h + w * sx_w, mask=mask)
        L = H * W
        out = xs_ptr + pid_b * (4 * C * L) + c * L  # xs is contiguous (B, 4, C, L)
        tl.store(out + _route_index(h, w, H, W, T0, R0), v, mask=mask)
        tl.store(out + C * L + _route_index(h, w, H, W, T1, R1), v, mask=mask)
        tl.store(out + 2 * C * L + _route_index(h, w, H, W, T2, R2), v, mask=mask)
        tl.store(out + 3 * C * L + _route_index(h, w, H, W, T3, R3), v, mask=mask)

    @triton.jit
    def _cross_merge_kernel(
        ys_ptr, out_ptr, C, H, W,
        sy_b, sy_k, sy_c, sy_l,
        so_b, so_c, so_h, so_w,
        T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
        BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    ):
        pid_b = tl.program_id(2).to(tl.int64)
        c, h, w, mask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, BC, BH, BW)
        src = ys_ptr + pid_b * sy_b + c * sy_c
        acc = tl.load(src + _route_index(h, w, H, W, T0, R0) * sy_l, mask=mask).to(tl.float32)
        acc += tl.load(src + sy_k + _route_index(h, w, H, W, T1, R1) * sy_l, mask=mask).to(tl.float32)
        acc += tl.load(src + 2 * sy_k + _route_index(h, w, H, W, T2, R2) * sy_l, mask=mask).to(tl.float32)
        acc += tl.load(src + 3 * sy_k + _route_index(h, w, H, W, T3, R3) * sy_l, mask=mask).to(tl.float32)
        dst = out_ptr + pid_b * so_b + c * so_c + h * so_h + w * so_w
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_shape(map_cf):
    """Tile (channels, rows, cols): wide along whichever axis is contiguous in memory."""
    if map_cf.stride(1) == 1:  # channels-last storage: channel runs are contiguous
        return 16, 8, 16
    return 1, 32, 32


def _route_flags(route_set):
    flags = {f"T{k}": int(t) for k, (t, _) in enumerate(route_set)}
    flags.update({f"R{k}": int(r) for k, (_, r) in enumerate(route_set)})
    return flags


def _scan_triton(x_cf, route_set):
    B, C, H, W = x_cf.shape
    xs = x_cf.new_empty((B, 4, C, H * W))
    BC, BH, BW = _block_shape(x_cf)
    grid = (triton.cdiv(H, BH) * triton.cdiv(W, BW), triton.cdiv(C, BC), B)
    _cross_scan_kernel[grid](x_cf, xs, C, H, W, *x_cf.stride(), **_route_flags(route_set),
                             BC=BC, BH=BH, BW=BW)
    return xs


def _merge_triton(ys, H, W, out_dtype, route_set):
    B, K, C, L = ys.shape
    out = _empty_merged(ys, B, C, H, W, out_dtype)
    BC, BH, BW = _block_shape(out)
    grid = (triton.cdiv(H, BH) * triton.cdiv(W, BW), triton.cdiv(C, BC), B)
    _cross_merge_kernel[grid](ys, out, C, H, W, *ys.stride(), *out.stride(), **_route_flags(route_set),
                              BC=BC, BH=BH, BW=BW)
    return out


# ----------------------------------------------------------------------------- dispatch + autograd
def _scan(x_cf, routes, backend):
    route_set = ROUTE_SETS[routes]
    if backend == "triton":
        return _scan_triton(x_cf, route_set)
    return _scan_torch(x_cf, route_set)


def _merge(ys, H, W, out_dtype, routes, backend):
    """ys (B, 4, C, L) -> channels-last storage viewed as (B, C, H, W)."""
    route_set = ROUTE_SETS[routes]
    if backend == "triton":
        return _merge_triton(ys, H, W, out_dtype, route_set)
    return _merge_torch(ys, H, W, out_dtype, route_set)


class CrossScan(torch.autograd.Function):
    """x (B, C, H, W) or (B, H, W, C) -> xs (B, 4, C, L); backward = cross-merge."""

    @staticmethod
    def forward(ctx, x, channel_first, routes, backend):
        x_cf = _as_channel_first(x, channel_first)
        ctx.meta = (x_cf.shape[2], x_cf.shape[3], x.dtype, channel_first, routes, backend)
        return _scan(x_cf, routes, backend)

    @staticmethod
    def backward(ctx, dxs):
        H, W, dtype, channel_first, routes, backend = ctx.meta
        dx = _merge(dxs, H, W, dtype, routes, backend)
        return (dx if channel_first else dx.permute(0, 2, 3, 1)), None, None, None


class CrossMerge(torch.autograd.Function):
    """ys (B, 4, C, H, W) -> (B, C, H, W) or (B, H, W, C) (channels-last storage); backward = cross-scan."""

    @staticmethod
    def forward(ctx, ys, channel_first, routes, backend, out_dtype):
        # ys arrives as (B, 4, C, H, W): H and W travel inside the shape, which keeps jit tracing happy
        H, W = ys.shape[-2:]
        ctx.meta = (ys.dtype, channel_first, routes, backend)
        out = _merge(ys.flatten(3), H, W, out_dtype or ys.dtype, routes, backend)
        return out if channel_first else out.permute(0, 2, 3, 1)

    @staticmethod
    def backward(ctx, dout):
        dtype, channel_first, routes, backend = ctx.meta
        dout_cf = _as_channel_first(dout, channel_first)
        dys = _scan(dout_cf, routes, backend).view(*dout_cf.shape[:1], 4, *dout_cf.shape[1:])
        return dys.to(dtype), None, None, None, None


def cross_scan(x, channel_first=True, routes="cross2d", backend=None):
    """(B, C, H, W) [or (B, H, W, C) with channel_first=False] -> (B, 4, C, H*W), x's dtype."""
    _check_routes(routes)
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects a 4-D map, got shape {tuple(x.shape)}")
    return CrossScan.apply(x, channel_first, routes, _pick_backend(backend, x))


def cross_merge(ys, hw=None, channel_first=True, routes="cross2d", backend=None, out_dtype=None):
    """(B, 4, C, H, W) [or (B, 4, C, L) with hw=(H, W)] -> (B, C, H, W) [or (B, H, W, C)].

    The sum is accumulated in fp32 by the Triton kernel; the result has ``out_dtype`` (default: ys's).
    """
    _check_routes(routes)
    if ys.dim() == 4 and hw is not None and ys.shape[-1] == hw[0] * hw[1]:
        ys = ys.unflatten(3, tuple(hw))
    if ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W), or (B, 4, C, L) with hw=(H, W) and L = H*W; "
                         f"got shape {tuple(ys.shape)}, hw={hw}")
    return CrossMerge.apply(ys, channel_first, routes, _pick_backend(backend, ys), out_dtype)
