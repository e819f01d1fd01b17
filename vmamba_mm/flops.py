"""FLOPs of a whole detector / segmentor from its config, counting the selective scan.

As the authors report them: fvcore counts (one multiply-add = one FLOP) of one forward in test
mode on a random (3, H, W) image — Mask R-CNN at (3, 1280, 800) through backbone, neck, RPN
proposals and RoI heads; UperNet at (3, 512, 2048) through backbone and decode head (the auxiliary
head is training-only). Command line: ``python analyze/flops.py --config CONFIG [--size H W]``.
"""
import torch
from torch import nn

from classification.models.flops import count_flops, count_params


class _TensorForward(nn.Module):
    """``model._forward(inputs, data_samples)`` with fixed samples, so fvcore can trace it."""

    def __init__(self, model, data_samples):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs):
        return self.model._forward(inputs, self.data_samples)


def build_from_config(config):
    """Model of ``config`` (path or Config) with its default scope, without pretrained loading."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return MODELS.build(cfg.model), cfg.get('default_scope')


def default_shape(config):
    """The (C, H, W) at which the authors report FLOPs: 1280x800 for detectors, 512x2048 for segmentors."""
    from mmengine.config import Config
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    return (3, 1280, 800) if cfg.get('default_scope') == 'mmdet' else (3, 512, 2048)


def model_flops(config, shape):
    """Returns (FLOPs, params) of one test-mode forward of the config's model on a (C, H, W) input."""
    model, scope = build_from_config(config)
    model.eval()
    _, height, width = shape
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=meta)]
    else:
        from mmseg.structures import SegDataSample
        samples = [SegDataSample(metainfo=meta)]
    inputs = torch.randn(1, *shape)
    return count_flops(_TensorForward(model, samples), (inputs,)), count_params(model)
