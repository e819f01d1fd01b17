"""Registers ``MM_VSSM`` into mmseg's ``MODELS`` (configs import this through ``custom_imports``)."""
from mmseg.registry import MODELS

from detection.mm_vssm import MM_VSSM

MODELS.register_module(module=MM_VSSM)
