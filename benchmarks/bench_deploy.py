"""Latency of exported models: VMamba-T beside Swin-T, each exported and run the same way, in one process.

    python benchmarks/bench_deploy.py [--models NAME ...] [--formats onnx torch-export aoti] [--device cpu|cuda]
                                      [--batch 1] [--size 224] [--threads 2] [--rounds 5] [--no-spin]

Per model: eager PyTorch, then each format written by analyze/export.py's exporters into --out-dir, reloaded from
its file and checked against eager (max |logit difference|). The timing interleaves the models: every round runs
each (model, runtime) for --iters timed calls after one untimed call, and the table gives the median over all
rounds, so load from other processes on a shared machine hits every row alike. ONNX runs in ONNX Runtime's CPU
execution provider with --threads intra-op threads; --no-spin stops its worker threads spinning between nodes
(a large difference on a loaded machine).
"""
import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from analyze.common import ModelSpec, format_table, prepare_model, timed_call
from analyze.export import EXPORTERS, FORMATS, capture, load_runner, sample_images

MODELS = ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224")
SUFFIXES = {"onnx": "onnx", "torch-export": "pt2", "aoti": "pt2"}


def _ort_options(threads: int, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per round")
    parser.add_argument("--no-spin", action="store_true", help="ONNX Runtime threads do not spin")
    parser.add_argument("--out-dir", default="output/deploy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    runners, rows = {}, []
    for name in args.models:
        model = prepare_model(ModelSpec(name), device, img_size=args.size)
        images = sample_images(args.batch, args.size, args.size).to(device)
        with torch.no_grad():
            reference = model(images)
        runners[(name, "eager")] = (lambda m=model, x=images: m(x)), images
        program = capture(model, images)
        for fmt in args.formats:
            if fmt == "onnx" and device.type != "cpu":
                continue
            path = out_dir / f"{name}_b{args.batch}_{args.size}.{SUFFIXES[fmt]}"
            if fmt == "aoti":
                path = path.with_name(path.stem + "_aoti.pt2")
            start = time.perf_counter()
            EXPORTERS[fmt](program, images, path)
            seconds = time.perf_counter() - start
            if fmt == "onnx":
                import onnxruntime as ort

                session = ort.InferenceSession(str(path), _ort_options(args.threads, not args.no_spin),
                                               providers=["CPUExecutionProvider"])
                feed_name = session.get_inputs()[0].name
                run = (lambda s=session, n=feed_name, x=images.numpy(): s.run(None, {n: x}))
                logits = torch.from_numpy(run()[0])
            else:
                run_file = load_runner(fmt, path, device, args.threads)
                run = (lambda r=run_file, x=images: r(x))
                logits = run()
            diff = (logits.float() - reference.float()).abs().max().item()
            runners[(name, fmt)] = run, images
            rows.append(dict(model=name, runtime=fmt, export_s=seconds, max_abs_diff=diff))
            print(f"{name} {fmt}: exported in {seconds:.0f} s to {path}, max |logit difference| {diff:.3g}",
                  flush=True)

    times = {key: [] for key in runners}
    with torch.no_grad():
        for _ in range(args.rounds):
            for key, (run, _) in runners.items():
                run()
                times[key] += [timed_call(run, device) for _ in range(args.iters)]
    table = [dict(model=name, runtime=runtime, median_ms=statistics.median(values) * 1000,
                  min_ms=min(values) * 1000)
             for (name, runtime), values in times.items()]
    diffs = {(row["model"], row["runtime"]): row["max_abs_diff"] for row in rows}
    for row in table:
        row["max_abs_diff"] = diffs.get((row["model"], row["runtime"]), 0.0)
    print(f"\n{platform.processor() or platform.machine()}, {args.device}, batch {args.batch}, {args.size} px, "
          f"fp32, {args.threads} threads, ONNX Runtime spinning {'off' if args.no_spin else 'on'}, "
          f"{args.rounds} rounds x {args.iters} calls")
    print(format_table(table, ["model", "runtime", "median_ms", "min_ms", "max_abs_diff"]))


if __name__ == "__main__":
    main()
