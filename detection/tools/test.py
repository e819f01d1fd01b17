"""Evaluate a checkpoint: python tools/test.py CONFIG CHECKPOINT [--tta] [--out preds.pkl]
[--work-dir DIR] [--cfg-options k=v ...] [--launcher pytorch]. The logic is shared: vmamba_mm/launch.py."""
from vmamba_mm.launch import test

if __name__ == '__main__':
    test()
