"""Registers ``MM_VSSM`` into mmdet's ``MODELS`` (configs import this through ``custom_imports``)."""
from mmdet.registry import MODELS

from vmamba_mm.backbone import MM_VSSM

MODELS.register_module(module=MM_VSSM)
