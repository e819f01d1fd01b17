"""Evaluate a checkpoint: python tools/test.py CONFIG CHECKPOINT [--tta] [--out preds.pkl]
[--work-dir DIR] [--cfg-options k=v ...] [--launcher pytorch]. The logic is shared: detection/launch.py."""
from detection.launch import test

if __name__ == '__main__':
    test()
