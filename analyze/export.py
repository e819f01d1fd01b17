"""Export an image classifier for deployment (ONNX, torch.export, AOTInductor), reload it and check it.

    python analyze/export.py --model vmamba_tiny_s1l8 --format onnx --size 224 224 --out vmamba_t.onnx
    python analyze/export.py --model vmamba_tiny_s1l8 --format torch-export --size 224 224 --out vmamba_t.pt2
    python analyze/export.py --model vmamba_tiny_s1l8 --format aoti --size 224 224 --device cuda --out vmamba_t_aoti.pt2

Any VMamba builder or timm name; --checkpoint loads trained weights (random init otherwise). The tool writes the
artifact, reloads it from the file (ONNX Runtime on its CPU execution provider for ONNX; torch.export.load; the
AOTInductor package loader), runs it on a real photograph (scikit-learn's bundled sample images, or --image)
and prints the largest logit difference against the eager model and the runtime's latency beside eager's.

Formats:
* onnx: torch.onnx's exporter (dynamo) on the program torch.export captures, opset 18. The selective-scan ops
  become standard ONNX ops through selective_scan.export (a branch-free chunked scan); the exported graph is
  specialised to one input size (--size), with a fixed or a dynamic (--dynamic-batch) batch. Export runs on the
  CPU; in an fp16 file ONNX Runtime's CPU provider runs the nodes it has no float16 kernel for in float32.
* torch-export: torch.export.export, saved with torch.export.save. The selective-scan ops stay single ops (their
  fake kernels give the shapes), so loading the file needs them registered (`import selective_scan`).
* aoti: AOTInductor (torch._inductor.aoti_compile_and_package) compiles that program into a .pt2 package of
  machine code for --device. The selective-scan ops are called through the dispatcher, so the package runs
  without the Python model code where the kernel extension is loaded
  (`torch.ops.load_library(<site-packages>/selective_scan/_C*.so)`).
--dynamic-size (H and W any multiples of 32 from 64, a fixed batch) is for torch-export and aoti; the ONNX graph
is specialised to one size.
"""
import argparse
import math
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from analyze.common import AnalyzeError, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, model_specs, prepare_model, \
    run_cli, timed_call

FORMATS = ("onnx", "torch-export", "aoti")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ONNX_OPSET = 18
STRIDE = 32  # the total stride of the four stages


# ----------------------------------------------------------------------------- inputs
def sample_images(batch: int, height: int, width: int, image: Optional[str] = None) -> torch.Tensor:
    """(batch, 3, height, width) ImageNet-normalised photographs: `image`, or scikit-learn's two bundled sample
    photos taken in turn; each resized on its short side and centre-cropped to height x width."""
    from PIL import Image
    from torchvision import transforms

    if image is not None:
        if not Path(image).is_file():
            raise AnalyzeError(f"image not found: {image}")
        with Image.open(image) as opened:
            pictures = [opened.convert("RGB")]
    else:
        from sklearn.datasets import load_sample_image
        pictures = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    transform = transforms.Compose([
        transforms.Resize(max(height, width), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop((height, width)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    tensors = [transform(picture) for picture in pictures]
    return torch.stack([tensors[i % len(tensors)] for i in range(batch)])


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool):
    if not (dynamic_batch or dynamic_size):
        return None
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size:  # multiples of the total stride: the v1 downsampling pads odd maps, a branch on the size
        dims[2] = STRIDE * torch.export.Dim("height_blocks", min=2, max=128)
        dims[3] = STRIDE * torch.export.Dim("width_blocks", min=2, max=128)
    return (dims,)


def capture(model: nn.Module, images: torch.Tensor, dynamic_batch: bool = False,
            dynamic_size: bool = False) -> torch.export.ExportedProgram:
    """torch.export.export of the model in inference mode (the selective-scan ops kept as single ops). Dynamic
    sizes are traced size-obliviously: a size that is 1 in the example (say one checkpoint chunk of a stage's
    scan) must not become a constant of the graph."""
    from torch.fx.experimental import _config as shape_config

    with torch.no_grad(), shape_config.patch(backed_size_oblivious=dynamic_size):
        return torch.export.export(model, (images,), dynamic_shapes=_dynamic_shapes(dynamic_batch, dynamic_size))


# ----------------------------------------------------------------------------- the three formats
def export_onnx(program: torch.export.ExportedProgram, images: torch.Tensor, path: Path):
    """The program's selective-scan ops decomposed into standard ops, translated by torch.onnx (dynamo)."""
    from selective_scan.export import decompose_for_onnx

    onnx_program = torch.onnx.export(decompose_for_onnx(program), (images,), dynamo=True, opset_version=ONNX_OPSET,
                                     input_names=["images"], output_names=["logits"], verbose=False)
    onnx_program.save(str(path))


def export_torch(program: torch.export.ExportedProgram, images: torch.Tensor, path: Path):
    torch.export.save(program, str(path))


def export_aoti(program: torch.export.ExportedProgram, images: torch.Tensor, path: Path):
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_runner(fmt: str, path: Path, device: torch.device, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The artifact reloaded from its file, as a function of the image batch returning the logits (on `device`)."""
    if fmt == "onnx":
        session = _ort_session(path, threads)
        name = session.get_inputs()[0].name

        def run_onnx(images):
            return torch.from_numpy(session.run(None, {name: images.cpu().numpy()})[0]).to(device)
        return run_onnx
    if fmt == "torch-export":
        module = torch.export.load(str(path)).module()

        def run_exported(images):
            with torch.no_grad():
                return module(images)
        return run_exported
    compiled = torch._inductor.aoti_load_package(str(path))

    def run_aoti(images):
        with torch.no_grad():
            return compiled(images)
    return run_aoti


EXPORTERS = {"onnx": export_onnx, "torch-export": export_torch, "aoti": export_aoti}


# ----------------------------------------------------------------------------- checks and timing
def check_request(fmt: str, device: torch.device, dynamic_batch: bool, dynamic_size: bool, out: Path,
                  size: Sequence[int]):
    """Refuse, with the reason, what a format cannot do (before any model is built)."""
    if fmt not in FORMATS:
        raise AnalyzeError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt != "onnx" and out.suffix != ".pt2":
        raise AnalyzeError(f"{fmt} writes a .pt2 archive: --out must end in .pt2, got {out}")
    if fmt == "onnx" and dynamic_size:
        raise AnalyzeError("the ONNX export is specialised to one input size (the scan's chunking and the route "
                           "orders are constants of the graph): drop --dynamic-size and export each size you need")
    if dynamic_size and dynamic_batch:
        raise AnalyzeError("--dynamic-size takes a fixed batch (traced size-obliviously, the batch would be "
                           "specialised): drop --dynamic-batch or --dynamic-size")
    if dynamic_size and any(side % STRIDE or side < 2 * STRIDE for side in size):
        raise AnalyzeError(f"--dynamic-size exports H and W as multiples of {STRIDE} from {2 * STRIDE} (the models' "
                           f"total stride): give a --size of such sides, got {size[0]}x{size[1]}")
    if fmt == "onnx" and device.type != "cpu":
        raise AnalyzeError("the ONNX export runs on the CPU (its check runs ONNX Runtime's CPU execution "
                           "provider): use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError("--device cuda asked for, but no CUDA GPU is visible")


def latency_ms(run: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of one call, in ms (CUDA synchronised around each call)."""
    for _ in range(warmup):
        run()
    times = [timed_call(run, device) for _ in range(iters)]
    return statistics.median(times) * 1000 if times else math.nan


def export_and_check(spec: ModelSpec, fmt: str, size: Sequence[int], out: Path, batch: int = 1,
                     dynamic_batch: bool = False, dynamic_size: bool = False, dtype: str = "fp32",
                     device: str = "cpu", image: Optional[str] = None, warmup: int = 3, iters: int = 10,
                     threads: Optional[int] = None) -> dict:
    """Export `spec` to `out` in `fmt`, reload it, compare its logits with eager PyTorch and time both.
    Returns dict(max_abs_diff, latency_ms, eager_latency_ms, path)."""
    if dtype not in DTYPES:
        raise AnalyzeError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    torch_device = torch.device(device)
    check_request(fmt, torch_device, dynamic_batch, dynamic_size, out, size)
    height, width = size
    if batch < 1 or height < 1 or width < 1:
        raise AnalyzeError(f"batch and size must be positive, got batch {batch}, size {height}x{width}")
    model = prepare_model(spec, torch_device).to(DTYPES[dtype])
    images = sample_images(batch, height, width, image).to(torch_device, DTYPES[dtype])
    # a batch of 1 would be specialised by torch.export: capture a dynamic batch with two images
    example = images.expand(2, -1, -1, -1).contiguous() if dynamic_batch and batch == 1 else images
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        reference = model(images)
        # timed first: ONNX Runtime's worker threads keep spinning for a while after its runs
        eager_ms = latency_ms(lambda: model(images), torch_device, warmup, iters)
    program = capture(model, example, dynamic_batch, dynamic_size)
    EXPORTERS[fmt](program, example, out)
    run = load_runner(fmt, out, torch_device, threads or torch.get_num_threads())
    diff = (run(images).float() - reference.float()).abs().max().item()
    return dict(path=out, max_abs_diff=diff, latency_ms=latency_ms(lambda: run(images), torch_device, warmup, iters),
                eager_latency_ms=eager_ms)


RUNTIMES = {"onnx": "ONNX Runtime (CPUExecutionProvider)", "torch-export": "torch.export.load",
            "aoti": "AOTInductor package"}


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a VMamba builder such as vmamba_tiny_s1l8, or any timm name")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to load (default: random init)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input size")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="batch size of a fixed-batch export (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch dimension")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="dynamic H and W, multiples of 32 (torch-export, aoti)")
    parser.add_argument("--dtype", default="fp32", help="fp32 or fp16 (model and input)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch-export and aoti; onnx exports on cpu)")
    parser.add_argument("--image", default=None, help="image to check on (default: scikit-learn's sample photos)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed runs (the median is printed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads (default: torch.get_num_threads())")
    parser.add_argument("--out", required=True, help="the file to write")
    args = parser.parse_args(argv)
    spec = model_specs([args.model], [args.checkpoint] if args.checkpoint else [])[0]
    result = export_and_check(spec, args.format, args.size, Path(args.out), batch=args.batch,
                              dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size, dtype=args.dtype,
                              device=args.device, image=args.image, warmup=args.warmup, iters=args.iters,
                              threads=args.threads)
    height, width = args.size
    batch_text = "dynamic batch" if args.dynamic_batch else f"batch {args.batch}"
    size_text = "dynamic size" if args.dynamic_size else f"{height}x{width} (fixed)"
    print(f"wrote {result['path']} ({args.format}, {spec.label}, {batch_text}, {size_text}, {args.dtype}, "
          f"{args.device})")
    print(f"max |logit difference| vs eager PyTorch: {result['max_abs_diff']:.3g}")
    print(f"latency ({RUNTIMES[args.format]}, {args.device}): {result['latency_ms']:.2f} ms median of {args.iters}; "
          f"eager PyTorch: {result['eager_latency_ms']:.2f} ms")


if __name__ == "__main__":
    run_cli(main)
