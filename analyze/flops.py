"""Parameters and GFLOPs of a model, counted as VMamba reports them (fvcore + the scan rule).

    python analyze/flops.py --model vmamba_tiny_s1l8 --size 224 [--json]

``--model``: any timm model name; the VMamba builders are registered by importing
classification.models. ``--size``: one value (square) or H W. With ``--json`` the last line is
one JSON object with keys model, params, gflops (and size).
"""
import argparse
import json

import timm
import torch

import classification.models  # noqa: F401  (registers the VMamba builders with timm)
from classification.models.flops import count_flops, count_params


def measure(model_name, size, num_classes=1000):
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    height, width = (size[0], size[0]) if len(size) == 1 else size
    flops = count_flops(model, torch.randn(1, 3, height, width))
    return dict(model=model_name, size=[height, width], params=count_params(model), gflops=flops / 1e9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="timm model name, e.g. vmamba_tiny_s1l8")
    parser.add_argument("--size", type=int, nargs="+", default=[224], help="input size: S or H W")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one value or two (H W)")

    result = measure(args.model, args.size, args.num_classes)
    print(f"{result['model']} @ {result['size'][0]}x{result['size'][1]}: "
          f"params {result['params']:,} ({result['params'] / 1e6:.2f} M), GFLOPs {result['gflops']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
