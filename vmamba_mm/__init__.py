"""What the detection and segmentation code share: the ``MM_VSSM`` backbone (``vmamba_mm.backbone``),
the train/test entry points (``vmamba_mm.launch``), whole-model FLOPs (``vmamba_mm.flops``), the
synthetic demo data (``vmamba_mm.synthetic``), the distributed launcher script (``tools/dist_run.sh``)
and the backbone config every detection and segmentation config inherits (``configs/vmamba.py``).

``detection`` and ``segmentation`` each register ``MM_VSSM`` into their library's ``MODELS`` and hold
their own configs and tools; neither imports the other. Importing this package imports nothing else.
"""
