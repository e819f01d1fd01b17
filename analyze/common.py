"""Plumbing shared by the analysis tools (tp.py, erf.py, attnmap.py).

Models are named the way timm names them: the VMamba builders register themselves with timm when
``classification.models`` is imported (e.g. ``vmamba_tiny_s1l8``), and every timm model
(``swin_tiny_patch4_window7_224``, ``convnext_tiny``, ``mambaout_tiny``, ...) works too. Weights are
never downloaded: models start from random init and a checkpoint is loaded only when asked for.
"""
import argparse
import csv
import difflib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Words that mean "no checkpoint" in a --checkpoint list, so one list can mix trained and random models.
RANDOM_INIT_WORDS = ("", "none", "random")


class AnalyzeError(Exception):
    """A user-facing error (bad model name, missing checkpoint, ...): printed without a traceback."""


class ModelSpec(NamedTuple):
    """One model to analyse: a timm/VMamba name and an optional checkpoint path."""
    name: str
    checkpoint: Optional[str] = None

    @property
    def label(self) -> str:
        weights = Path(self.checkpoint).stem if self.checkpoint else "random init"
        return f"{self.name} ({weights})"

    @property
    def slug(self) -> str:
        """The label as a file-name fragment."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.label).strip("_")


# ----------------------------------------------------------------------------- command line
def add_common_args(parser: argparse.ArgumentParser, default_out: str, several_models: bool = True):
    """--model, --checkpoint, --device, --out, --num-classes: the same meaning in every tool."""
    if several_models:
        parser.add_argument("--model", nargs="+", required=True,
                            help="model names (VMamba builders such as vmamba_tiny_s1l8, or any timm name)")
        parser.add_argument("--checkpoint", nargs="*", default=[],
                            help="one checkpoint per model, in the same order ('none' = random init); "
                                 "omit for random init everywhere")
    else:
        parser.add_argument("--model", required=True,
                            help="model name (a VMamba builder such as vmamba_tiny_s1l8, or any timm name)")
        parser.add_argument("--checkpoint", default=None, help="checkpoint to load (default: random init)")
    parser.add_argument("--num-classes", type=int, default=1000,
                        help="classifier width; must match the checkpoint's head (default 1000)")
    parser.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")


def model_specs(names: Sequence[str], checkpoints: Sequence[str] = ()) -> List[ModelSpec]:
    """Pair models with checkpoints (none given = all random init, else one per model).

    Every name and checkpoint file is checked here, before any model is built or measured.
    """
    if checkpoints and len(checkpoints) != len(names):
        raise AnalyzeError(f"got {len(names)} models but {len(checkpoints)} checkpoints; give one checkpoint "
                           f"per model (use 'none' for random init)")
    paths = [None if ckpt.lower() in RANDOM_INIT_WORDS else ckpt for ckpt in checkpoints] or [None] * len(names)
    for name, path in zip(names, paths):
        check_model_name(name)
        if path is not None and not os.path.isfile(path):
            raise AnalyzeError(f"checkpoint not found: {path}")
    return [ModelSpec(name, path) for name, path in zip(names, paths)]


def run_cli(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None):
    """Run a tool's main(); user errors end the program with a one-line message and exit status 2."""
    try:
        main(argv)
    except AnalyzeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- device and outputs
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise AnalyzeError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError(f"--device {name} asked for, but no CUDA GPU is visible")
    return device


def prepare_out_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def report_outputs(paths: Iterable[Path]):
    for path in paths:
        print(f"wrote {path}")


# ----------------------------------------------------------------------------- models
def _import_project_models() -> Optional[BaseException]:
    """Import classification.models (which registers the VMamba builders with timm).

    Returns the import error instead of raising it, so that timm models still work where the
    project's models cannot be imported (e.g. a box without one of their dependencies).
    """
    try:
        import classification.models  # noqa: F401  (registers the builders)
    except Exception as error:  # any failure here only matters if a VMamba name is asked for
        return error
    return None


def check_model_name(name: str):
    """Raise AnalyzeError, with the closest names, unless timm (with the VMamba builders) knows the model."""
    import timm

    import_error = _import_project_models()
    if timm.is_model(name):
        return
    message = f"unknown model {name!r}"
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    if close:
        message += f"; did you mean one of: {', '.join(close)}"
    if import_error is not None:
        message += f" (the VMamba builders are unavailable: importing classification.models failed: {import_error!r})"
    raise AnalyzeError(message)


def build_model(name: str, num_classes: int = 1000, img_size: Optional[int] = None) -> nn.Module:
    """A randomly initialised model by name, on the CPU.

    img_size is passed to models that fix their input size at construction (Swin); models that
    take any size (ConvNeXt, MambaOut, VMamba) do not accept the argument and are built without it.
    """
    import timm

    check_model_name(name)
    kwargs = dict(pretrained=False, num_classes=num_classes)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(name, **kwargs)


def load_checkpoint(model: nn.Module, path: str):
    """Load a checkpoint (any layout classification.models.checkpoint understands) and print its report."""
    try:
        from classification.models.checkpoint import load_pretrained
    except Exception as error:
        raise AnalyzeError(f"cannot load checkpoints: importing classification.models.checkpoint failed: {error!r}")
    try:
        report = load_pretrained(model, path)
    except Exception as error:
        raise AnalyzeError(f"cannot load checkpoint {path}: {error}") from error
    print(f"loaded {path}: {report}")


def prepare_model(spec: ModelSpec, device: torch.device, num_classes: int = 1000,
                  img_size: Optional[int] = None) -> nn.Module:
    """Build, load the checkpoint if any, move to the device; returned in eval mode."""
    model = build_model(spec.name, num_classes=num_classes, img_size=img_size)
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    return model.to(device).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def last_stage_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last stage's feature map (B, C, H, W), before the classifier's norm and pooling.

    Tried in order: timm's forward_intermediates (Swin, ConvNeXt, MambaOut, ...); the input of a
    `classifier` submodule (VSSM, whose layout may be channel-last: its `channel_first` attribute
    says); the model's own output when that already is a 4-D map (plain conv stacks).
    """
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(images, indices=1, intermediates_only=True)[-1]
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        captured = []
        handle = classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            model(images)
        finally:
            handle.remove()
        features = captured[0]
        if features.dim() == 4 and not getattr(model, "channel_first", True):
            features = features.permute(0, 3, 1, 2)
    else:
        features = model(images)
    if features.dim() != 4:
        raise AnalyzeError(f"cannot find a 2-D feature map in {type(model).__name__}: got shape "
                           f"{tuple(features.shape)}")
    return features


# ----------------------------------------------------------------------------- images
def image_transform(size: int):
    """Evaluation preprocessing: resize the short side, centre crop, ImageNet normalisation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_image(path: str, size: int) -> torch.Tensor:
    """One image as a normalised (3, size, size) tensor."""
    from PIL import Image
    if not os.path.isfile(path):
        raise AnalyzeError(f"image not found: {path}")
    with Image.open(path) as image:
        return image_transform(size)(image.convert("RGB"))


def list_images(root: str) -> List[Path]:
    """Image files under root, sorted (an ImageFolder's val/ split is preferred when there is one)."""
    base = Path(root)
    if not base.is_dir():
        raise AnalyzeError(f"image folder not found: {root}")
    if (base / "val").is_dir():
        base = base / "val"
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise AnalyzeError(f"no images under {base}")
    return files


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a (3, H, W) tensor, for display; returns (H, W, 3) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


# ----------------------------------------------------------------------------- tables
def format_value(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) < 10:
            return f"{value:.4g}"
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table (readable in a terminal, pasteable into BENCHMARKS.md)."""
    cells = [[format_value(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def p90(values: Sequence[float]) -> float:
    """The nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def timed_call(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `run`, waited for: on CUDA the device is synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
