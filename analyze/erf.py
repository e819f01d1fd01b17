"""Effective receptive field (ERF) heatmaps, the method of RepLKNet (Ding et al., arXiv 2203.06717) that the
VMamba paper (arXiv 2401.10166, its ERF figures) uses.

For each image: take the backbone's last-stage map, sum over channels the ReLU of the feature at
the central position, differentiate that scalar with respect to the input, keep the positive part
and sum over colour channels; average over the images. The heatmap shows (x / max) ** 0.2 (the
VMamba figures) or log10(x + 1) / max (RepLKNet's); the table gives, as RepLKNet does on its
log10(x + 1) scale, the side of the smallest central square that holds 20/30/50/99 % of the total
and the fraction of the image that square covers (a larger fraction = a wider ERF).

    python analyze/erf.py --model vmamba_tiny_s1l8 vmamba_tiny_s1l8 --checkpoint none ckpt.pth --data /data/imagenet
    python analyze/erf.py --model convnext_tiny --data digits --num-images 8 --img-size 256
    python analyze/erf.py --model resnet18 --random-images --num-images 2 --img-size 64 --device cpu   # smoke run

Writes erf.png (one heatmap per model), erf.csv, and erf_<model>.npy (the raw mean gradient map) under --out.
"""
import argparse
import math
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from analyze.common import (AnalyzeError, add_common_args, format_table, last_stage_features, list_images,
                            load_image, model_specs, prepare_model, prepare_out_dir, report_outputs,
                            resolve_device, run_cli, write_csv)

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
DISPLAY_SCALES = ("power", "log")


def erf_map(model: nn.Module, images: Iterable[torch.Tensor], device: torch.device,
            total: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Mean positive input-gradient map (H, W) of the central last-stage feature; and the images used.

    Images whose gradient is not finite are skipped (RepLKNet does the same), with a message.
    """
    model.eval().requires_grad_(False)  # only the input's gradient is needed
    accumulated, used = None, 0
    for image in tqdm(images, total=total, desc="ERF images", unit="img", leave=False):
        inputs = image[None].to(device).requires_grad_(True)
        features = last_stage_features(model, inputs)
        height, width = features.shape[-2:]
        central = F.relu(features[:, :, height // 2, width // 2]).sum()
        (gradient,) = torch.autograd.grad(central, inputs)
        contribution = F.relu(gradient)[0].sum(0).double()
        if not torch.isfinite(contribution).all():
            tqdm.write("skipping an image whose gradient is not finite")
            continue
        accumulated = contribution if accumulated is None else accumulated + contribution
        used += 1
    if used == 0:
        raise AnalyzeError("no image gave a finite gradient")
    return (accumulated / used).cpu().numpy(), used


def log_scaled(heatmap: np.ndarray) -> np.ndarray:
    """RepLKNet's scale: log10(x + 1) / max."""
    scaled = np.log10(heatmap + 1)
    return scaled / max(scaled.max(), np.finfo(np.float64).tiny)


def display_scaled(heatmap: np.ndarray, scale: str) -> np.ndarray:
    if scale == "log":
        return log_scaled(heatmap)
    return (heatmap / max(heatmap.max(), np.finfo(np.float64).tiny)) ** 0.2


def central_squares(data: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> List[dict]:
    """For each threshold, the smallest square centred at (H // 2, W // 2) holding that share of the total.

    Returns {threshold, side, area_ratio} rows; the square is clipped at the borders, and the area
    ratio is its clipped area over H * W.
    """
    height, width = data.shape
    center_y, center_x = height // 2, width // 2
    integral = np.pad(data.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral[y, x] = data[:y, :x].sum()
    total = integral[-1, -1]
    if total <= 0:
        raise AnalyzeError("the ERF map is all zeros: no square can be measured")
    squares = []
    for half in range(max(height, width) // 2 + 1):
        top, bottom = max(center_y - half, 0), min(center_y + half + 1, height)
        left, right = max(center_x - half, 0), min(center_x + half + 1, width)
        mass = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
        squares.append((mass / total, 2 * half + 1, (bottom - top) * (right - left) / (height * width)))
    rows = []
    for threshold in thresholds:
        # The last square holds everything, so one always qualifies (tolerance for rounding in the sums).
        _, side, area = next(square for square in squares if square[0] >= threshold - 1e-12)
        rows.append({"threshold": threshold, "side": side, "area_ratio": area})
    return rows


def plot_heatmaps(heatmaps: Sequence[np.ndarray], titles: Sequence[str], scale: str, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(heatmaps)
    columns = min(count, 4)
    lines = math.ceil(count / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 4.2 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, heatmap, title in zip(axes.flat, heatmaps, titles):
        image = ax.imshow(display_scaled(heatmap, scale), cmap="RdYlGn", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- inputs
def image_source(args) -> Tuple[Iterable[torch.Tensor], int, str]:
    """The images to average over (a lazy iterable), how many, and a description for the table."""
    if args.random_images:
        generator = torch.Generator().manual_seed(0)
        images = (torch.randn(3, args.img_size, args.img_size, generator=generator) for _ in range(args.num_images))
        return images, args.num_images, "random"
    root = args.data
    if root == "digits":
        from classification.data import prepare_digits
        root = str(prepare_digits())
    files = list_images(root)
    # Evenly spaced through the sorted list, so an ImageFolder contributes from all of its classes.
    picks = np.linspace(0, len(files) - 1, min(args.num_images, len(files))).round().astype(int)
    return (load_image(str(files[i]), args.img_size) for i in picks), len(picks), root


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="output/analyze/erf")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="an image folder (an ImageFolder's val/ split is used if present), "
                                       "or 'digits' for the built-in dataset")
    source.add_argument("--random-images", action="store_true",
                        help="average over seeded Gaussian-noise images instead of real ones (smoke runs)")
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--display", choices=DISPLAY_SCALES, default="power",
                        help="heatmap scale: power = (x/max)^0.2 (VMamba), log = log10(x+1)/max (RepLKNet)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    specs = model_specs(args.model, args.checkpoint)
    out = prepare_out_dir(args.out)

    heatmaps, rows, outputs = [], [], []
    for spec in specs:
        model = prepare_model(spec, device, num_classes=args.num_classes)
        images, count, source = image_source(args)
        print(f"{spec.label}: ERF over {count} images ({source}) at {args.img_size} px")
        heatmap, used = erf_map(model, images, device, total=count)
        del model
        heatmaps.append(heatmap)
        outputs.append(out / f"erf_{spec.slug}.npy")
        np.save(outputs[-1], heatmap.astype(np.float32))
        row = {"model": spec.label, "images": used, "img_size": args.img_size}
        for square in central_squares(log_scaled(heatmap)):
            percent = round(square["threshold"] * 100)
            row[f"side_{percent}"] = square["side"]
            row[f"area_ratio_{percent}"] = square["area_ratio"]
        rows.append(row)

    columns = ["model", "images", "img_size"] + [f"{key}_{round(t * 100)}" for key in ("side", "area_ratio")
                                                 for t in THRESHOLDS]
    outputs += [out / "erf.csv", out / "erf.png"]
    write_csv(outputs[-2], rows, columns)
    plot_heatmaps(heatmaps, [spec.label for spec in specs], args.display, outputs[-1])
    report_outputs(outputs)
    print(format_table(rows, columns))


if __name__ == "__main__":
    run_cli(main)
