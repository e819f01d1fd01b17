"""``MM_VSSM``: the VMamba backbone as an OpenMMLab model (one class for mmdet and mmseg).

The class depends on mmengine conventions only (``init_weights``), not on mmdet or mmseg;
``detection.models`` and ``segmentation.models`` each register it into their library's ``MODELS``.
It *is* a ``classification.models.Backbone_VSSM``, so detector/segmentor checkpoints keep the
official ``backbone.<Backbone_VSSM key>`` layout and the authors' release files load unchanged.

Differences from the authors' wrapper, on purpose:
- an unknown keyword (e.g. a Swin argument left over from an inherited config) is a ``TypeError``
  (``VSSM`` rejects it) instead of being swallowed;
- ``pretrained`` is read in ``init_weights``, which the runner calls before training (inference
  from a detector checkpoint does not need the classification file), and a missing or unreadable
  file is an error, never a silent random initialisation.
"""
import torch
from mmengine.logging import print_log

from classification.models import Backbone_VSSM


class MM_VSSM(Backbone_VSSM):
    """VMamba backbone: channel-first feature maps at strides 4/8/16/32 for ``out_indices``.

    Args:
        pretrained (str, optional): a classification checkpoint (the authors' ``{'model': ...}``
            file or a bare state_dict), loaded by :meth:`init_weights`; ``None``: random init.
        compile (bool or str): run the backbone through ``torch.compile`` (a mode name such as
            ``'max-autotune'``, or True for the default mode); the detector / segmentor heads stay eager.
        **kwargs: ``Backbone_VSSM`` / ``VSSM`` arguments (``dims``, ``depths``, ``ssm_ratio``, ...).
    """

    def __init__(self, pretrained=None, compile=False, **kwargs):
        super().__init__(**kwargs)
        self.pretrained = pretrained
        if compile not in (False, None, True) and not isinstance(compile, str):
            raise TypeError(f'MM_VSSM: compile must be a bool or a torch.compile mode, got {compile!r}')
        self.compile_mode = 'default' if compile is True else (compile or None)
        self._compiled_forwards = {}  # built at the first call, so the module stays copyable until then

    def forward(self, x):
        if self.compile_mode is None:
            return super().forward(x)
        if self.training not in self._compiled_forwards:
            # Training compiles one graph per input shape: inductor (torch 2.14) fails on symbolic strides of the
            # channels-last activations saved for backward. Inference takes new shapes symbolically.
            self._compiled_forwards[self.training] = torch.compile(
                super().forward, mode=self.compile_mode, dynamic=False if self.training else None)
        return self._compiled_forwards[self.training](x)

    def init_weights(self):
        if self.pretrained is None:
            return
        self.load_report = self.load_pretrained(self.pretrained)
        print_log(f'MM_VSSM: loaded {self.pretrained}: {self.load_report}', logger='current')
