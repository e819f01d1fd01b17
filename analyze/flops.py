"""Parameters and GFLOPs, counted as VMamba reports them (fvcore + the selective-scan rule).

    python analyze/flops.py --model vmamba_tiny_s1l8 --size 224 [--json]
    python analyze/flops.py --config detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py [--size 1280 800]

``--model``: any timm model name; the VMamba builders are registered by importing
classification.models. ``--config``: an mmdet/mmseg config, counted for the whole detector or
segmentor (default input 1280x800 for detectors, 512x2048 for segmentors, as the authors report).
``--size``: one value (square) or H W. With ``--json`` the last line is one JSON object with keys
model, params, gflops (and size).
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


def measure_config(config, size=None):
    from vmamba_mm.flops import default_shape, model_flops
    if size is None:
        shape = default_shape(config)
    else:
        shape = (3, size[0], size[0]) if len(size) == 1 else (3, *size)
    flops, params = model_flops(config, shape)
    return dict(model=config, size=list(shape[1:]), params=params, gflops=flops / 1e9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="timm model name, e.g. vmamba_tiny_s1l8")
    what.add_argument("--config", help="mmdet/mmseg config file (a whole detector or segmentor)")
    parser.add_argument("--size", type=int, nargs="+", default=None,
                        help="input size: S or H W (default 224; for --config the authors' size)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.size is not None and len(args.size) not in (1, 2):
        parser.error("--size takes one value or two (H W)")

    if args.config:
        result = measure_config(args.config, args.size)
    else:
        result = measure(args.model, args.size or [224], args.num_classes)
    print(f"{result['model']} @ {result['size'][0]}x{result['size'][1]}: "
          f"params {result['params']:,} ({result['params'] / 1e6:.2f} M), GFLOPs {result['gflops']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
