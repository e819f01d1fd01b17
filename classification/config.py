"""Default training/model configuration (yacs), with the key names of the Swin/VMamba trainers.

The authors' yaml files load unchanged: every key they use exists here with the same meaning
(key names from the official ``classification/config.py``). An unknown key in a yaml file or in
``--opts`` is an error that names the key and the nearest valid ones.
"""
import difflib
import os

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = [""]

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128            # per process
_C.DATA.DATA_PATH = ""              # ImageFolder root with train/ and val/; "" = built-in digits
_C.DATA.DATASET = "imagenet"        # "imagenet" (any ImageFolder) or "digits" (built-in demo set)
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = "part"         # "no", "part", "full"
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.MASK_PATCH_SIZE = 32        # accepted for yaml compatibility (SimMIM), unused
_C.DATA.MASK_RATIO = 0.6

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = "vssm"              # "vssm", or "timm" to build MODEL.NAME from timm
_C.MODEL.NAME = "vssm_tiny_224"
_C.MODEL.PRETRAINED = ""
_C.MODEL.RESUME = ""
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.MMCKPT = False

_C.MODEL.VSSM = CN()
_C.MODEL.VSSM.PATCH_SIZE = 4
_C.MODEL.VSSM.IN_CHANS = 3
_C.MODEL.VSSM.DEPTHS = [2, 2, 9, 2]
_C.MODEL.VSSM.EMBED_DIM = 96
_C.MODEL.VSSM.SSM_D_STATE = 16
_C.MODEL.VSSM.SSM_RATIO = 2.0
_C.MODEL.VSSM.SSM_RANK_RATIO = 2.0
_C.MODEL.VSSM.SSM_DT_RANK = "auto"
_C.MODEL.VSSM.SSM_ACT_LAYER = "silu"
_C.MODEL.VSSM.SSM_CONV = 3
_C.MODEL.VSSM.SSM_CONV_BIAS = True
_C.MODEL.VSSM.SSM_DROP_RATE = 0.0
_C.MODEL.VSSM.SSM_INIT = "v0"
_C.MODEL.VSSM.SSM_FORWARDTYPE = "v2"
_C.MODEL.VSSM.MLP_RATIO = 4.0
_C.MODEL.VSSM.MLP_ACT_LAYER = "gelu"
_C.MODEL.VSSM.MLP_DROP_RATE = 0.0
_C.MODEL.VSSM.GMLP = False
_C.MODEL.VSSM.PATCH_NORM = True
_C.MODEL.VSSM.NORM_LAYER = "ln"     # the official default; our shipped v2 yamls say "ln2d"
_C.MODEL.VSSM.DOWNSAMPLE = "v2"
_C.MODEL.VSSM.PATCHEMBED = "v2"
_C.MODEL.VSSM.POSEMBED = False

# keyword arguments for timm.create_model when MODEL.TYPE == "timm" (e.g. {"pretrained_cfg_overlay": ...})
_C.MODEL.TIMM_KWARGS = CN(new_allowed=True)

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4             # for a total batch of 512; scaled linearly with the real one
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.COMPILE = ""               # torch.compile mode for the training/evaluation model ("default", ...); "" = eager
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
# The official optimizer ends up decaying A_logs and dt_projs_bias; True reproduces that.
_C.TRAIN.DECAY_SSM_PARAMS = False
# Stop after this many consecutive non-finite losses (each one is skipped and reported).
_C.TRAIN.MAX_NONFINITE_STEPS = 20

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

_C.TRAIN.LAYER_DECAY = 1.0
_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"
# RandomResizedCrop area range and horizontal-flip probability of the train transform (timm's
# ImageNet defaults; the digits demo narrows the crop and turns flips off: a mirrored 2 is no 2)
_C.AUG.SCALE = [0.08, 1.0]
_C.AUG.HFLIP = 0.5

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False

# ----------------------------------------------------------------------------- misc
_C.ENABLE_AMP = False               # SimMIM key, accepted and unused
_C.AMP_ENABLE = True
_C.AMP_DTYPE = "fp16"               # "fp16" (with GradScaler) or "bf16" (no scaler)
_C.AMP_OPT_LEVEL = ""
_C.MODEL_EMA = True                 # the authors' trainer keeps an EMA by default (--model_ema False)
_C.MODEL_EMA_DECAY = 0.9999
_C.OUTPUT = ""
_C.TAG = "default"
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.FUSED_LAYERNORM = False
_C.LOCAL_RANK = 0


def _all_keys(node, prefix=""):
    """Every leaf key of a CfgNode, dotted ("MODEL.VSSM.DEPTHS")."""
    keys = []
    for name, value in node.items():
        keys += _all_keys(value, f"{prefix}{name}.") if isinstance(value, CN) else [prefix + name]
    return keys


def _check_keys(config, keys, where):
    """Raises KeyError for a key that is not in the config, naming the closest valid keys."""
    valid = set(_all_keys(config))
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key.upper(), sorted(valid), n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {key!r} in {where}{hint}")


def _flat_keys(raw, prefix=""):
    keys = []
    for name, value in raw.items():
        keys += _flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return keys


def _merge_file(config, cfg_file):
    """Merge a yaml file into ``config``, following its BASE list first (paths relative to it)."""
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"config file not found: {cfg_file}")
    with open(cfg_file) as f:
        raw = yaml.safe_load(f) or {}
    for base in raw.get("BASE", [""]):
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base))
    _check_keys(config, _flat_keys(raw), cfg_file)
    config.merge_from_file(cfg_file)


def get_default_config():
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def load_config(cfg_file=None, opts=None):
    """Defaults, then ``cfg_file`` (and its BASE files), then ``opts`` (["KEY", "VALUE", ...]).

    Returns an unfrozen CfgNode so that callers can apply command-line flags before freezing.
    """
    config = get_default_config()
    if cfg_file:
        _merge_file(config, cfg_file)
    if opts:
        opts = list(opts)
        if len(opts) % 2:
            raise ValueError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
        _check_keys(config, opts[0::2], "--opts")
        config.merge_from_list(opts)
    return config
