"""Registers ``MM_VSSM`` into mmseg's ``MODELS`` (configs import this through ``custom_imports``)."""
from mmseg.registry import MODELS

from vmamba_mm.backbone import MM_VSSM

MODELS.register_module(module=MM_VSSM)
