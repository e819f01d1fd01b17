"""Datasets, transforms, samplers and Mixup for the classification trainer.

Data is an ImageFolder: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (or, with ``--zip``,
``<root>/train.zip`` and ``<root>/val.zip`` holding ``<class>/<image>`` members). Without a data
path the trainer uses the built-in demo set: scikit-learn's bundled handwritten digits, written out
once as such an ImageFolder under the cache directory.
"""
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.transforms import str_to_pil_interp
from torchvision import datasets, transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_VAL_EVERY = 5  # every 5th digit image goes to val: 1437 train / 360 val


class DataError(RuntimeError):
    """A missing or malformed dataset, reported before any GPU work starts."""


def cache_root():
    """The cache directory: ``$VMAMBA_CACHE`` if set, else ``~/.cache/vmamba``."""
    return Path(os.environ.get("VMAMBA_CACHE") or Path.home() / ".cache" / "vmamba")


def prepare_digits(root=None):
    """Write scikit-learn's digits (8x8 grey, 10 classes) as an ImageFolder once; return its root.

    Several processes may call this at the same time (one per DDP rank): each writes into its own
    temporary directory and renames it into place; whoever loses the race discards its copy.
    """
    root = Path(root) if root else cache_root() / "digits"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # sklearn stores 0..16
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        split = "val" if index % DIGITS_VAL_EVERY == 0 else "train"
        class_dir = staging / split / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(class_dir / f"{index:04d}.png")
    try:
        os.rename(staging, root)
    except OSError:
        if not (root / "train").is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return root


class ZipImageFolder(torch.utils.data.Dataset):
    """ImageFolder read from one zip file with ``<class>/<image>`` members (``--zip``).

    The zip is opened lazily in each process (a ZipFile handle cannot cross a fork).
    """

    def __init__(self, zip_path, transform=None):
        self.zip_path = str(zip_path)
        self.transform = transform
        with zipfile.ZipFile(self.zip_path) as archive:
            names = sorted(n for n in archive.namelist()
                           if n.lower().endswith(IMAGE_EXTENSIONS) and n.count("/") >= 1)
        self.classes = sorted({n.split("/")[-2] for n in names})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(n, self.class_to_idx[n.split("/")[-2]]) for n in names]
        self._archive, self._archive_pid = None, None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if self._archive_pid != os.getpid():
            self._archive, self._archive_pid = zipfile.ZipFile(self.zip_path), os.getpid()
        name, target = self.samples[index]
        image = Image.open(io.BytesIO(self._archive.read(name))).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def resolve_data_path(config):
    """The dataset root to use: ``DATA.DATA_PATH``, or the digits ImageFolder when it is empty."""
    if not config.DATA.DATA_PATH:
        return str(prepare_digits())
    return config.DATA.DATA_PATH


def check_data_path(root, zip_mode, eval_only):
    """Raise DataError with a readable message unless ``root`` looks like a usable dataset."""
    splits = ["val"] if eval_only else ["train", "val"]
    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} does not exist or is not a directory "
                        f"(expected {root}/train/<class>/* and {root}/val/<class>/*)")
    for split in splits:
        if zip_mode:
            path = os.path.join(root, f"{split}.zip")
            if not zipfile.is_zipfile(path):
                raise DataError(f"--zip: {path!r} is missing or not a zip file")
        else:
            path = os.path.join(root, split)
            if not os.path.isdir(path):
                raise DataError(f"data path {root!r} has no {split}/ directory "
                                f"(expected the ImageFolder layout {root}/{split}/<class>/<image>)")


def build_transform(is_train, config):
    """timm's ImageNet train transform (RandAugment, colour jitter, random erasing), or the Swin test
    transform: resize to IMG_SIZE * 256/224 and centre-crop (TEST.CROP), else resize to IMG_SIZE."""
    img_size = config.DATA.IMG_SIZE
    if is_train:
        auto_augment = config.AUG.AUTO_AUGMENT
        return create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=auto_augment if auto_augment and auto_augment != "none" else None,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
    interpolation = str_to_pil_interp(config.DATA.INTERPOLATION)
    if config.TEST.CROP:
        resize_to = int(img_size * 256 / 224)
        steps = [transforms.Resize(resize_to, interpolation=interpolation), transforms.CenterCrop(img_size)]
    else:
        steps = [transforms.Resize((img_size, img_size), interpolation=interpolation)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


def build_dataset(is_train, config, root):
    split = "train" if is_train else "val"
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        dataset = ZipImageFolder(os.path.join(root, f"{split}.zip"), transform)
    else:
        try:
            dataset = datasets.ImageFolder(os.path.join(root, split), transform)
        except (FileNotFoundError, OSError) as error:
            raise DataError(f"cannot read {os.path.join(root, split)}: {error}") from error
    if len(dataset.classes) > config.MODEL.NUM_CLASSES:
        raise DataError(f"{os.path.join(root, split)} has {len(dataset.classes)} classes but "
                        f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}")
    return dataset


def build_loaders(config, root, rank, world_size, use_cuda):
    """(train set, val set, train loader, val loader, train sampler, mixup_fn).

    Training shards with a DistributedSampler (also in a single process, so that the shuffling
    order depends only on SEED and the epoch: a resumed run sees the same batches). Validation gives
    each rank a disjoint strided slice without padding, so summed counts give the exact accuracy.
    """
    dataset_val = build_dataset(False, config, root)
    loader_args = dict(batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
                       pin_memory=config.DATA.PIN_MEMORY and use_cuda)
    val_shard = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world_size))
    loader_val = torch.utils.data.DataLoader(val_shard, shuffle=False, drop_last=False, **loader_args)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None, dataset_val, None, loader_val, None, None

    dataset_train = build_dataset(True, config, root)
    sampler_train = torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, drop_last=True,
                                               **loader_args)
    if len(loader_train) == 0:
        raise DataError(f"the training set ({len(dataset_train)} images over {world_size} processes) is "
                        f"smaller than one batch of {config.DATA.BATCH_SIZE}")

    mixup_fn = None
    if config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None:
        mixup_fn = Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX,
                         cutmix_minmax=config.AUG.CUTMIX_MINMAX, prob=config.AUG.MIXUP_PROB,
                         switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                         label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
    return dataset_train, dataset_val, loader_train, loader_val, sampler_train, mixup_fn
