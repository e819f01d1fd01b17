"""Train with mmengine's Runner: python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
[--cfg-options k=v ...] [--launcher pytorch]. The logic is shared: detection/launch.py."""
from detection.launch import train

if __name__ == '__main__':
    train()
