"""The implicit attention of an SS2D layer, and the activation map of one query pixel.

A selective scan is linear in its input u once dt, B and C are fixed (the VMamba paper, arXiv 2401.10166, derives
SS2D's attention this way for its activation-map figures):

    dt = softplus(dts + delta_bias),  cum_t = sum_{s <= t} A * dt_s  (per channel d and state n)
    y_i = sum_{j <= i} M[i, j] u_j + D u_i,   M[d, i, j] = sum_n C_i[n] exp(cum_i - cum_j)[d, n] B_j[n] dt_j[d]

so each route k has a lower-triangular L x L matrix M_k (in the order route k visits the pixels);
averaged over channels it is the route's "attention". exp(cum_i - cum_j) is used instead of
w_i / w_j with w = exp(cum): cum falls along the sequence (A < 0, dt > 0), so w underflows to 0
after a few hundred steps while the difference stays finite. Mapping every route back to raster
order and summing gives the layer's combined attention (cross-merge sums the routes the same way);
a query pixel's row, reshaped to H x W, is its activation map.

    python analyze/attnmap.py --model vmamba_tiny_s1l8 --checkpoint ckpt.pth --image cat.jpg --query 100 120
    python analyze/attnmap.py --model vmamba_tiny_s1l8 --random-image --device cpu   # smoke run

Writes attnmap.png (image, combined and per-route maps of the query), attnmatrix.png (the full
matrices, for maps of at most --max-matrix-len pixels) and attnmap.npz (the numbers) under --out.
"""
import argparse
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from analyze.common import (AnalyzeError, add_common_args, denormalize, load_image, model_specs,
                            prepare_model, prepare_out_dir, report_outputs, resolve_device, run_cli)

# Bound on the (channels, states, rows, columns) block materialised at once.
CHUNK_ELEMENTS = 2 ** 24


@dataclass
class ScanInputs:
    """What the attention needs from one SS2D call, for one image (batch element)."""
    dts: torch.Tensor          # (K*D, L) or (Dd, L) with K*D % Dd == 0: delta before bias and softplus
    A: torch.Tensor            # (K*D, N), negative
    Bs: torch.Tensor           # (K, N, L)
    Cs: torch.Tensor           # (K, N, L)
    delta_bias: Optional[torch.Tensor]  # (K*D,) or (Dd,)
    delta_softplus: bool
    height: int
    width: int
    routes: str = "cross2d"

    @property
    def num_routes(self) -> int:
        return self.Bs.shape[0]

    def deltas(self) -> torch.Tensor:
        """dt per route and channel, (K, D, L), as the scan computes it."""
        channels = self.A.shape[0]
        dts = self.dts if self.delta_bias is None else self.dts + self.delta_bias[:, None]
        dts = dts.repeat_interleave(channels // dts.shape[0], dim=0)
        dt = F.softplus(dts, threshold=20.0) if self.delta_softplus else dts
        return dt.view(self.num_routes, channels // self.num_routes, -1)


def route_orders(height: int, width: int, routes: str = "cross2d") -> torch.Tensor:
    """(K, L): the raster index of the pixel that route k visits at each position.

    Read off cross_scan itself (applied to a map of raster indices), so it always agrees with the model.
    """
    from selective_scan.cross_scan import cross_scan
    raster = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    return cross_scan(raster, channel_first=True, routes=routes)[0, :, 0].long()


def route_attention(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    rows: Optional[torch.Tensor] = None, reduce_channels: bool = True) -> torch.Tensor:
    """The attention matrix of one route, in that route's order.

    dt (D, L) after softplus; A (D, N); B, C (N, L). rows: positions i to compute (default all).
    Returns M[rows] as (R, L) averaged over channels, or (D, R, L) with reduce_channels=False.
    """
    channels, states = A.shape
    length = dt.shape[-1]
    rows = torch.arange(length, device=dt.device) if rows is None else rows.to(dt.device)
    cum = torch.cumsum(A[:, :, None] * dt[:, None, :], dim=-1)                      # (D, N, L)
    future = torch.arange(length, device=dt.device)[None, :] > rows[:, None]          # (R, L): j > i
    C_rows = C[:, rows]                                                               # (N, R)
    step = max(1, CHUNK_ELEMENTS // (states * rows.numel() * length))
    parts = []
    for start in range(0, channels, step):
        cum_chunk = cum[start:start + step]
        exponent = cum_chunk[:, :, rows, None] - cum_chunk[:, :, None, :]            # (d, N, R, L)
        # Masking the exponent (not the product) keeps the non-causal half from overflowing.
        decay = exponent.masked_fill(future, float("-inf")).exp()
        part = torch.einsum("nr,dnrj,nj->drj", C_rows, decay, B) * dt[start:start + step, None, :]
        parts.append(part.sum(0) if reduce_channels else part)
    if reduce_channels:
        return torch.stack(parts).sum(0) / channels
    return torch.cat(parts)


def raster_attention(inputs: ScanInputs, query: Optional[int] = None) -> torch.Tensor:
    """Every route's channel-averaged attention in raster order.

    Returns (K, L, L) with [k, r, s] = weight of pixel s in the output at pixel r through route k,
    or only the query pixel's rows, (K, L), when a raster index is given.
    """
    length = inputs.height * inputs.width
    if inputs.dts.shape[-1] != length:
        raise AnalyzeError(f"scan length {inputs.dts.shape[-1]} does not match the map {inputs.height}x{inputs.width}")
    orders = route_orders(inputs.height, inputs.width, inputs.routes).to(inputs.dts.device)
    positions = torch.argsort(orders, dim=1)  # positions[k, r]: where route k visits raster pixel r
    dt = inputs.deltas()
    A = inputs.A.view(inputs.num_routes, -1, inputs.A.shape[-1])
    maps = []
    for k in range(inputs.num_routes):
        rows = None if query is None else positions[k, query:query + 1]
        matrix = route_attention(dt[k], A[k], inputs.Bs[k], inputs.Cs[k], rows)  # route order
        matrix = matrix[:, positions[k]]  # columns to raster order: column s <- route position of pixel s
        # rows likewise (the query's single row already is the raster pixel's row)
        maps.append(matrix[0] if query is not None else matrix[positions[k]])
    return torch.stack(maps)


# ----------------------------------------------------------------------------- the model side
def find_ss2d_layers(model: nn.Module) -> dict:
    """{qualified name: module} of every layer that can report its scan inputs."""
    return {name: module for name, module in model.named_modules() if callable(getattr(module, "scan_inputs", None))}


def default_layer(names: Sequence[str]) -> str:
    """The last SS2D of the second-to-last stage (14 x 14 at 224 px), else the last SS2D."""
    stages = sorted({int(name.split(".")[1]) for name in names if name.startswith("layers.")})
    if len(stages) >= 2:
        in_stage = [name for name in names if name.startswith(f"layers.{stages[-2]}.")]
        return in_stage[-1]
    return names[-1]


def capture_scan_inputs(model: nn.Module, layer: nn.Module, image: torch.Tensor) -> ScanInputs:
    """Run the model on one image and ask the layer for its scan arguments on the input it received.

    `layer.scan_inputs(x)` returns the selective scan's keyword arguments (u, delta, A, B, C, D,
    delta_bias, delta_softplus; selective_scan_fn's shapes) plus the map's height, width and routes.
    """
    captured = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(image[None])
            scan = layer.scan_inputs(captured[0])
    finally:
        handle.remove()
    # Detached: views of parameters (the bias) keep requires_grad even when taken under no_grad.
    plain = {key: value.detach().float() for key, value in scan.items() if isinstance(value, torch.Tensor)}
    return ScanInputs(dts=plain["delta"][0], A=plain["A"], Bs=plain["B"][0], Cs=plain["C"][0],
                      delta_bias=plain.get("delta_bias"), delta_softplus=scan["delta_softplus"],
                      height=scan["height"], width=scan["width"], routes=scan["routes"])


def query_to_grid(query_pixel: Tuple[int, int], img_size: int, height: int, width: int) -> Tuple[int, int]:
    """The feature-map cell (row, col) covering an input pixel (y, x)."""
    y, x = query_pixel
    if not (0 <= y < img_size and 0 <= x < img_size):
        raise AnalyzeError(f"query pixel {query_pixel} is outside the {img_size}x{img_size} input")
    return y * height // img_size, x * width // img_size


# ----------------------------------------------------------------------------- pictures
def _display(values: torch.Tensor) -> torch.Tensor:
    """Magnitude scaled to [0, 1] (the attention is signed: C and B can take either sign)."""
    magnitude = values.abs()
    return magnitude / magnitude.max().clamp_min(1e-30)


def plot_query_maps(image: torch.Tensor, rows: torch.Tensor, grid_query: Tuple[int, int],
                    query_pixel: Tuple[int, int], height: int, width: int, title: str, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = denormalize(image)
    size = picture.shape[0]
    panels = [("combined", rows.sum(0))] + [(f"route {k}", rows[k]) for k in range(rows.shape[0])]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.3))
    axes[0].imshow(picture)
    axes[0].scatter([query_pixel[1]], [query_pixel[0]], marker="*", s=150, c="red")
    axes[0].set_title("input and query")
    for ax, (name, values) in zip(axes[1:], panels):
        ax.imshow(picture, alpha=0.35)
        ax.imshow(_display(values).view(height, width).cpu(), cmap="jet", alpha=0.65,
                  extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        ax.scatter([(grid_query[1] + 0.5) * size / width - 0.5], [(grid_query[0] + 0.5) * size / height - 0.5],
                   marker="*", s=80, c="white")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrices(matrices: torch.Tensor, title: str, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("combined", matrices.sum(0))] + [(f"route {k}", matrices[k]) for k in range(matrices.shape[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (name, values) in zip(axes, panels):
        ax.imshow(_display(values).cpu(), cmap="viridis")
        ax.set_title(f"{name} (raster order)", fontsize=9)
        ax.set_xlabel("source pixel")
        ax.set_ylabel("output pixel")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="output/analyze/attnmap", several_models=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input image file")
    source.add_argument("--random-image", action="store_true", help="use a seeded random image (smoke runs)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--query", type=int, nargs=2, metavar=("Y", "X"),
                        help="query pixel in input coordinates (default: the centre)")
    parser.add_argument("--layer", default=None,
                        help="qualified name of the SS2D module (default: the last of the second-to-last stage)")
    parser.add_argument("--list-layers", action="store_true", help="print the SS2D layer names and exit")
    parser.add_argument("--max-matrix-len", type=int, default=1024,
                        help="also draw the full L x L matrices when the map has at most this many pixels")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    (spec,) = model_specs([args.model], [args.checkpoint] if args.checkpoint else [])
    model = prepare_model(spec, device, num_classes=args.num_classes)
    layers = find_ss2d_layers(model)
    if not layers:
        raise AnalyzeError(f"{args.model} has no SS2D layer that reports its scan inputs (a `scan_inputs` method)")
    if args.list_layers:
        print("\n".join(layers))
        return
    layer_name = args.layer or default_layer(list(layers))
    if layer_name not in layers:
        raise AnalyzeError(f"no SS2D layer {layer_name!r}; run with --list-layers to see them")

    if args.random_image:
        image = torch.randn(3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    else:
        image = load_image(args.image, args.img_size)
    inputs = capture_scan_inputs(model, layers[layer_name], image.to(device))
    query_pixel = tuple(args.query) if args.query else (args.img_size // 2, args.img_size // 2)
    grid_query = query_to_grid(query_pixel, args.img_size, inputs.height, inputs.width)
    query_index = grid_query[0] * inputs.width + grid_query[1]

    rows = raster_attention(inputs, query=query_index).cpu()
    title = f"{spec.label}, layer {layer_name} ({inputs.height}x{inputs.width}), query pixel {query_pixel}"
    out = prepare_out_dir(args.out)
    outputs = [out / "attnmap.png"]
    plot_query_maps(image, rows, grid_query, query_pixel, inputs.height, inputs.width, title, outputs[0])
    arrays = {"query_rows": rows.view(-1, inputs.height, inputs.width).numpy(),
              "route_orders": route_orders(inputs.height, inputs.width, inputs.routes).numpy(),
              "query_index": query_index}
    if inputs.height * inputs.width <= args.max_matrix_len:
        matrices = raster_attention(inputs).cpu()
        arrays["matrices"] = matrices.numpy()
        outputs.append(out / "attnmatrix.png")
        plot_matrices(matrices, title, outputs[-1])
    outputs.append(out / "attnmap.npz")
    np.savez_compressed(outputs[-1], **arrays)
    report_outputs(outputs)


if __name__ == "__main__":
    run_cli(main)
