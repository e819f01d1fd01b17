"""Train with mmengine's Runner: python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
[--cfg-options k=v ...] [--launcher pytorch]. The logic is shared: vmamba_mm/launch.py."""
from vmamba_mm.launch import train

if __name__ == '__main__':
    train()
