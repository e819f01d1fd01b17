"""Train and evaluate VMamba (or any timm model) on ImageNet-style data, Swin-Transformer style.

    python classification/main.py --cfg classification/configs/demo/vmamba_digits.yaml
    torchrun --nproc_per_node 8 classification/main.py --cfg <yaml> --batch-size 128 --data-path <imagenet>
    python -m torch.distributed.launch --nproc_per_node 8 classification/main.py --cfg <yaml> ...

Without --data-path the built-in digits ImageFolder is used (written once under ~/.cache/vmamba).
"""
import argparse
import datetime
import math
import os
import sys
import time

import selective_scan
import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from torch.utils.tensorboard import SummaryWriter

from classification.config import load_config
from classification.data import DataError, build_loaders, check_data_path, resolve_data_path
from classification.logger import create_logger
from classification.models import build_model
from classification.models.checkpoint import load_pretrained, load_state_dict_from
from classification.optim import build_optimizer, build_scheduler, scale_learning_rates
from classification.utils import (CheckpointError, GradientUpdate, NonFiniteGuard, all_reduce_sum,
                                  checkpoint_candidates, distributed_env, epoch_seed, is_distributed,
                                  memory_used_mb, read_checkpoint, save_checkpoint_atomic, seed_everything,
                                  setup_device, tensors_hash)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_PREFIXES = ("classifier.head.", "head.", "fc.")  # VSSM; Swin, ConvNeXt, MambaOut; ResNet
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def str2bool(value):
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_option(argv=None):
    parser = argparse.ArgumentParser("VMamba training and evaluation")
    parser.add_argument("--cfg", metavar="FILE", help="yaml config file")
    parser.add_argument("--opts", nargs="+", default=None, help="override config keys: KEY VALUE [KEY VALUE ...]")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", help="ImageFolder root with train/ and val/ (default: built-in digits)")
    parser.add_argument("--zip", action="store_true", help="read <data-path>/{train,val}.zip instead of folders")
    parser.add_argument("--cache-mode", choices=["no", "full", "part"],
                        help="accepted for compatibility; images are always read on access")
    parser.add_argument("--pretrained", help="initial weights: our checkpoint or an authors' release file")
    parser.add_argument("--resume", help="checkpoint to resume from (default: the latest under --output)")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="torch.compile the model (mode; default 'default'); TRAIN.COMPILE in the config")
    parser.add_argument("--disable_amp", "--disable-amp", action="store_true", help="train in fp32")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), help="autocast dtype on CUDA")
    parser.add_argument("--output", default="output", metavar="PATH",
                        help="root of the output folder: <output>/<model name>/<tag>")
    parser.add_argument("--tag", help="experiment tag (sub-folder of the output)")
    parser.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    parser.add_argument("--throughput", action="store_true", help="only measure inference throughput")
    parser.add_argument("--model_ema", "--model-ema", type=str2bool, nargs="?", const=True, default=None,
                        help="keep and validate an EMA of the weights")
    parser.add_argument("--model_ema_decay", "--model-ema-decay", type=float, help="EMA decay")
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", default=None,
                        help="passed by torch.distributed.launch; the LOCAL_RANK environment variable wins")
    args = parser.parse_args(argv)

    config = load_config(args.cfg, args.opts)
    overrides = {
        "DATA.BATCH_SIZE": args.batch_size, "DATA.DATA_PATH": args.data_path, "DATA.CACHE_MODE": args.cache_mode,
        "MODEL.PRETRAINED": args.pretrained, "MODEL.RESUME": args.resume,
        "TRAIN.ACCUMULATION_STEPS": args.accumulation_steps, "TRAIN.COMPILE": args.compile,
        "AMP_DTYPE": args.amp_dtype, "TAG": args.tag,
        "MODEL_EMA": args.model_ema, "MODEL_EMA_DECAY": args.model_ema_decay,
    }
    for key, value in overrides.items():
        if value is not None:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    config.DATA.ZIP_MODE = config.DATA.ZIP_MODE or args.zip
    config.TRAIN.USE_CHECKPOINT = config.TRAIN.USE_CHECKPOINT or args.use_checkpoint
    config.AMP_ENABLE = config.AMP_ENABLE and not args.disable_amp
    config.EVAL_MODE = config.EVAL_MODE or args.eval
    config.THROUGHPUT_MODE = config.THROUGHPUT_MODE or args.throughput
    config.OUTPUT = os.path.join(args.output, config.MODEL.NAME, config.TAG)
    return args, config


def find_resume_checkpoint(config):
    """(path, checkpoint dict) to resume from, or (None, None). Runs on the CPU, before any GPU work.

    An explicit --resume must be readable. Auto-resume takes the newest readable checkpoint under
    the output folder (any tag), skipping unreadable ones with a message.
    """
    if config.MODEL.RESUME:
        return config.MODEL.RESUME, read_checkpoint(config.MODEL.RESUME)
    if not config.TRAIN.AUTO_RESUME:
        return None, None
    for path in checkpoint_candidates(config.OUTPUT):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            print(f"auto-resume: skipping {error}", file=sys.stderr)
    return None, None


def read_pretrained(path):
    """The state_dict of a --pretrained file (ours or the authors'), read on the CPU up front."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--pretrained {path!r} does not exist")
    try:
        state_dict, _ = load_state_dict_from(path)
    except Exception as error:  # damaged file, or no weights inside
        raise CheckpointError(f"--pretrained {path!r} is unreadable: {type(error).__name__}: {error}") from error
    return state_dict


def load_pretrained_weights(model, state_dict, path, logger):
    """Load pretrained weights; a classifier head of another number of classes is left at its
    initialisation (fine-tuning on a new label set), anything else that does not fit is an error."""
    report = load_pretrained(model, state_dict, new_head_prefixes=HEAD_PREFIXES)
    if report["new_head"]:
        logger.info(f"pretrained classifier head {tuple(report['new_head'])} does not fit this model: not loaded")
    logger.info(f"pretrained weights from {path}: {report}")


def describe_precision(config, device):
    if device.type != "cuda":
        return "fp32: AMP needs CUDA, so this CPU run trains and evaluates in fp32"
    if not config.AMP_ENABLE:
        return "fp32 (AMP disabled)"
    if config.AMP_DTYPE == "fp16":
        return "AMP fp16 autocast with a GradScaler"
    return "AMP bf16 autocast, no GradScaler"


def log_model_size(model, config, device, logger):
    """Params and FLOPs at the configured image size; a failure to count FLOPs is only reported."""
    try:
        from classification.models.flops import count_flops, count_params
    except ImportError as error:  # e.g. fvcore missing: train anyway
        logger.info(f"number of params: {sum(p.numel() for p in model.parameters()):,}")
        logger.info(f"FLOPs: unavailable (classification.models.flops: {error})")
        return
    logger.info(f"number of params: {count_params(model):,}")
    was_training = model.training
    model.eval()
    try:
        inputs = torch.randn(1, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
        with torch.no_grad():
            flops = count_flops(model, inputs)
        logger.info(f"FLOPs at {config.DATA.IMG_SIZE}px: {flops / 1e9:.4g} G")
    except Exception as error:  # counting is informative only; never stop training for it
        logger.info(f"FLOPs: unavailable ({type(error).__name__}: {error})")
    model.train(was_training)


def restore_checkpoint(checkpoint, path, config, model, model_ema, optimizer, lr_scheduler, updates_per_epoch,
                       grad_update, logger):
    """Load weights (and, when training, optimizer, scaler, EMA, epoch, best accuracies; the schedule
    continues at the next epoch). Returns (max_accuracy, max_accuracy_ema).
    """
    logger.info(f"resuming from {path}")
    # load_pretrained is strict, checks shapes key by key and maps the authors' older key names
    load_pretrained(model, checkpoint["model"])
    if model_ema is not None:
        if checkpoint.get("model_ema") is not None:
            load_pretrained(model_ema.module, checkpoint["model_ema"])
        else:
            logger.info("the checkpoint has no EMA weights: the EMA starts from the loaded model")
            load_pretrained(model_ema.module, checkpoint["model"])
    max_accuracy = checkpoint.get("max_accuracy", 0.0)
    max_accuracy_ema = checkpoint.get("max_accuracy_ema", 0.0)
    if not config.EVAL_MODE and not config.THROUGHPUT_MODE and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        grad_update.load_state_dict(checkpoint.get("scaler") or {})
        config.defrost()
        config.TRAIN.START_EPOCH = checkpoint["epoch"] + 1
        config.freeze()
        logger.info(f"resumed after epoch {checkpoint['epoch']}: max accuracy {max_accuracy:.2f}%"
                    + (f", EMA {max_accuracy_ema:.2f}%" if model_ema is not None else ""))
        continue_schedule(checkpoint, config, optimizer, lr_scheduler, updates_per_epoch, logger)
    return max_accuracy, max_accuracy_ema


def continue_schedule(checkpoint, config, optimizer, lr_scheduler, updates_per_epoch, logger):
    """Set this run's learning-rate schedule to the start of epoch TRAIN.START_EPOCH.

    The schedule is counted in optimizer updates, and a timm scheduler's state is only the schedule it was built
    with (updates per epoch, scaled learning rates, length). Loading that state, as Swin's trainer does, replays
    the old schedule at the new run's update count once the world size, batch size, accumulation or number of
    epochs changed. So the checkpoint's scheduler state is not loaded: the schedule built from this run's config
    is set to the epoch.
    """
    epoch = config.TRAIN.START_EPOCH
    saved_updates_per_epoch = checkpoint.get("updates_per_epoch")
    if saved_updates_per_epoch is not None and saved_updates_per_epoch != updates_per_epoch:
        logger.info(f"the checkpoint was written at {saved_updates_per_epoch} optimizer updates per epoch, this run "
                    f"makes {updates_per_epoch} (another world size, batch size, accumulation or data set): the "
                    f"learning-rate schedule is this run's, continued at epoch {epoch} (not at the checkpoint's "
                    f"update count {epoch * saved_updates_per_epoch})")
    # the optimizer state brought the checkpoint's base learning rates; the schedule's are this run's
    for group, base_lr in zip(optimizer.param_groups, lr_scheduler.base_values):
        group[f"initial_{lr_scheduler.param_group_field}"] = base_lr
    lr_scheduler.step_update(epoch * updates_per_epoch)
    logger.info(f"learning-rate schedule continues at epoch {epoch}: update {epoch * updates_per_epoch} of "
                f"{config.TRAIN.EPOCHS * updates_per_epoch} ({updates_per_epoch} per epoch), "
                f"lr {optimizer.param_groups[0]['lr']:.6e}")


def train_one_epoch(config, model, criterion, data_loader, optimizer, epoch, mixup_fn, lr_scheduler, grad_update,
                    model_ema, nonfinite_guard, device, logger, writer=None):
    model.train()
    optimizer.zero_grad()
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(data_loader) // accumulation
    num_steps = updates_per_epoch * accumulation  # leftover batches would not complete an update
    use_amp = config.AMP_ENABLE and device.type == "cuda"
    world_size = dist.get_world_size() if is_distributed() else 1
    batch_time, loss_meter, norm_meter, scale_meter = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()

    start = end = window_start = time.time()
    last_logged_step = -1
    for idx, (samples, targets) in enumerate(data_loader):
        if idx == num_steps:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with torch.autocast(device.type, dtype=AMP_DTYPES[config.AMP_DTYPE], enabled=use_amp):
            outputs = model(samples)
        loss = criterion(outputs.float(), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            # Its backward still runs (DDP needs every rank's backward); the resulting non-finite
            # gradients make the update below be skipped on every rank.
            logger.warning(f"non-finite loss {loss_value} at epoch {epoch} step {idx}: its update will be skipped")

        update_now = (idx + 1) % accumulation == 0
        grad_norm = grad_update(loss / accumulation, optimizer, model.parameters(), config.TRAIN.CLIP_GRAD,
                                update=update_now)
        if update_now:
            grad_norm = grad_norm.item()
            nonfinite_guard.record(math.isfinite(grad_norm), where=f"epoch {epoch} step {idx}")
            if math.isfinite(grad_norm):
                norm_meter.update(grad_norm)
                if model_ema is not None:
                    model_ema.update(model.module if is_distributed() else model)
            else:
                logger.warning(f"update skipped at epoch {epoch} step {idx}: non-finite gradient norm "
                               f"({nonfinite_guard.in_a_row} in a row; loss scale now {grad_update.loss_scale()})")
            optimizer.zero_grad()
            lr_scheduler.step_update((epoch * num_steps + idx + 1) // accumulation)
        if math.isfinite(loss_value):
            loss_meter.update(loss_value, targets.size(0))
        scale_meter.update(grad_update.loss_scale())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batch_time.update(time.time() - end)
        end = time.time()

        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            images_per_second = ((idx - last_logged_step) * samples.size(0) * world_size
                                 / max(end - window_start, 1e-9))
            window_start, last_logged_step = end, idx
            lr = optimizer.param_groups[0]["lr"]
            eta = datetime.timedelta(seconds=int(batch_time.avg * (num_steps - idx - 1)))
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {eta} lr {lr:.6f}\ttime {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
                f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
                f"loss_scale {scale_meter.val:.1f}\t{images_per_second:.1f} img/s\tmem {memory_used_mb(device):.0f}MB")
            if writer is not None:
                step = epoch * num_steps + idx
                writer.add_scalar("train/loss", loss_meter.val, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", norm_meter.val, step)
                writer.add_scalar("train/loss_scale", scale_meter.val, step)
                writer.add_scalar("train/images_per_second", images_per_second, step)
    epoch_time = time.time() - start
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}, "
                f"{num_steps * config.DATA.BATCH_SIZE * world_size / epoch_time:.1f} img/s overall")
    return loss_meter.avg


@torch.no_grad()
def validate(config, data_loader, model, device, logger):
    """(top-1 %, top-5 %, mean loss) over the whole validation set, summed across ranks."""
    model.eval()
    use_amp = config.AMP_ENABLE and device.type == "cuda"
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    end = time.time()
    for idx, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=AMP_DTYPES[config.AMP_DTYPE], enabled=use_amp):
            outputs = model(images)
        outputs = outputs.float()
        top5 = outputs.topk(min(5, outputs.size(1)), dim=1).indices
        hits = top5.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets).double(), hits[:, 0].sum().double(),
                               hits.any(dim=1).sum().double(), torch.tensor(targets.numel(), device=device).double()])
        if idx % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx}/{len(data_loader)}]\ttime {time.time() - end:.3f}s\t"
                        f"mem {memory_used_mb(device):.0f}MB")
    all_reduce_sum(totals)
    loss_sum, top1, top5_hits, count = totals.tolist()
    count = max(count, 1.0)
    acc1, acc5, loss = 100.0 * top1 / count, 100.0 * top5_hits / count, loss_sum / count
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}")
    return acc1, acc5, loss


@torch.no_grad()
def throughput(config, data_loader, model, device, logger):
    """Inference img/s on one batch (the paper's protocol on GPU: 50 warm-up, 30 timed, fp32)."""
    model.eval()
    warmup, timed = (50, 30) if device.type == "cuda" else (2, 5)
    images, _ = next(iter(data_loader))
    images = images.to(device)
    for _ in range(warmup):
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.time()
    for _ in range(timed):
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.time() - start
    logger.info(f"throughput: batch {images.size(0)}, {warmup} warm-up + {timed} timed forwards on {device}: "
                f"{timed * images.size(0) / elapsed:.1f} img/s")


def save_checkpoint(config, epoch, model, model_ema, max_accuracy, max_accuracy_ema, optimizer, lr_scheduler,
                    updates_per_epoch, grad_update, logger):
    """Write ``ckpt_epoch_{epoch}.pth`` (rank 0 only, see main) atomically: a kill at any moment leaves whole files."""
    path = os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
    state = {
        "model": model.state_dict(),
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "updates_per_epoch": updates_per_epoch,
        "scaler": grad_update.state_dict(),
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "max_accuracy_ema": max_accuracy_ema,
        "config": config.dump(),
    }
    save_checkpoint_atomic(state, path)
    logger.info(f"{path} saved")


def main(argv=None):
    args, config = parse_option(argv)
    rank, world_size, local_rank = distributed_env(args.local_rank)

    # Everything that can be wrong with the inputs is checked here, on the CPU, before any GPU work.
    data_root = resolve_data_path(config)
    check_data_path(data_root, config.DATA.ZIP_MODE, eval_only=config.EVAL_MODE or config.THROUGHPUT_MODE)
    resume_path, resume_checkpoint = find_resume_checkpoint(config)
    pretrained = read_pretrained(config.MODEL.PRETRAINED) if config.MODEL.PRETRAINED and not resume_path else None

    device = setup_device(rank, world_size, local_rank)
    config.LOCAL_RANK = local_rank
    total_batch = scale_learning_rates(config, world_size)
    config.freeze()
    logger = create_logger(config.OUTPUT, dist_rank=rank, name=config.MODEL.NAME)
    logger.info(f"rank {rank}/{world_size}, local rank {local_rank}, pid {os.getpid()}, device {device}, "
                f"{'process group ' + dist.get_backend() if is_distributed() else 'no process group'}")
    logger.info(describe_precision(config, device))
    logger.info(selective_scan.kernels_summary())
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE != "no":
        logger.info(f"DATA.CACHE_MODE {config.DATA.CACHE_MODE!r} is accepted but not implemented: "
                    "images are read from the zip on access")
    if rank == 0:
        with open(os.path.join(config.OUTPUT, "config.yaml"), "w") as f:
            f.write(config.dump())
        logger.info(f"full config saved to {os.path.join(config.OUTPUT, 'config.yaml')}\n{config.dump()}")

    dataset_train, dataset_val, loader_train, loader_val, sampler_train, mixup_fn = build_loaders(
        config, data_root, rank, world_size, use_cuda=device.type == "cuda")
    origin = " (the built-in digits: no --data-path given)" if not config.DATA.DATA_PATH else ""
    logger.info(f"data: {data_root}{origin}, {len(dataset_val)} val images"
                + (f", {len(dataset_train)} train images" if dataset_train is not None else ""))

    logger.info(f"creating model {config.MODEL.TYPE}/{config.MODEL.NAME}")
    seed_everything(config.SEED)  # the same initial weights on every rank and in every run
    model = build_model(config)
    if config.TRAIN.USE_CHECKPOINT and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    if pretrained is not None:
        load_pretrained_weights(model, pretrained, config.MODEL.PRETRAINED, logger)
    elif config.MODEL.PRETRAINED:
        logger.info(f"--pretrained {config.MODEL.PRETRAINED} ignored: resuming from {resume_path}")
    logger.info(str(model))
    model.to(device)
    if rank == 0:
        log_model_size(model, config, device, logger)
    model_ema = None
    if config.MODEL_EMA:
        model_ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY)
        logger.info(f"EMA of the weights, decay {config.MODEL_EMA_DECAY}")

    optimizer = build_optimizer(config, model)
    model_without_ddp = model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    if config.TRAIN.COMPILE:
        if config.TRAIN.COMPILE not in COMPILE_MODES:
            raise ValueError(f"TRAIN.COMPILE {config.TRAIN.COMPILE!r} is not a torch.compile mode; valid: "
                             f"{list(COMPILE_MODES)} or '' (eager)")
        # the compiled module shares its parameters with model_without_ddp, which checkpoints and the EMA use.
        # Static shapes: a new batch shape (the last evaluation batch) compiles its own graph, because inductor
        # (torch 2.14) fails on symbolic strides of the channels-last activations saved for backward.
        model = torch.compile(model, mode=config.TRAIN.COMPILE, dynamic=False)
        logger.info(f"torch.compile(mode={config.TRAIN.COMPILE!r}): the first steps of training and of evaluation "
                    "compile the model")
    grad_update = GradientUpdate(use_grad_scaler=device.type == "cuda" and config.AMP_ENABLE
                                 and config.AMP_DTYPE == "fp16")
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(loader_train) // accumulation if loader_train else None
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch) if loader_train else None
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif config.MODEL.LABEL_SMOOTHING > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    max_accuracy, max_accuracy_ema = 0.0, 0.0
    if resume_checkpoint is not None:
        max_accuracy, max_accuracy_ema = restore_checkpoint(resume_checkpoint, resume_path, config, model_without_ddp,
                                                            model_ema, optimizer, lr_scheduler, updates_per_epoch,
                                                            grad_update, logger)
        del resume_checkpoint

    if config.THROUGHPUT_MODE:
        throughput(config, loader_val, model_without_ddp, device, logger)
        return
    if config.EVAL_MODE:
        acc1, _, _ = validate(config, loader_val, model, device, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}%")
        if model_ema is not None:
            acc1_ema, _, _ = validate(config, loader_val, model_ema.module, device, logger)
            logger.info(f"Accuracy of the EMA network on the {len(dataset_val)} test images: {acc1_ema:.2f}%")
        return

    logger.info(f"total batch {total_batch} (per process {config.DATA.BATCH_SIZE} x {world_size} processes x "
                f"{accumulation} accumulation steps): lr {config.TRAIN.BASE_LR:.3g}, warm-up lr "
                f"{config.TRAIN.WARMUP_LR:.3g}, min lr {config.TRAIN.MIN_LR:.3g}")
    writer = SummaryWriter(os.path.join(config.OUTPUT, "tensorboard")) if rank == 0 else None
    nonfinite_guard = NonFiniteGuard(config.TRAIN.MAX_NONFINITE_STEPS)
    acc1 = None
    logger.info("start training")
    start_time = time.time()
    for epoch in range(config.TRAIN.START_EPOCH, config.TRAIN.EPOCHS):
        sampler_train.set_epoch(epoch)
        seed_everything(epoch_seed(config.SEED, epoch, rank))
        train_loss = train_one_epoch(config, model, criterion, loader_train, optimizer, epoch, mixup_fn, lr_scheduler,
                                     grad_update, model_ema, nonfinite_guard, device, logger, writer)

        acc1, acc5, val_loss = validate(config, loader_val, model, device, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}%")
        max_accuracy = max(max_accuracy, acc1)
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        scalars = {"train/epoch_loss": train_loss, "val/acc1": acc1, "val/acc5": acc5, "val/loss": val_loss}
        if model_ema is not None:
            acc1_ema, acc5_ema, _ = validate(config, loader_val, model_ema.module, device, logger)
            logger.info(f"Accuracy of the EMA network on the {len(dataset_val)} test images: {acc1_ema:.2f}%")
            max_accuracy_ema = max(max_accuracy_ema, acc1_ema)
            logger.info(f"Max EMA accuracy: {max_accuracy_ema:.2f}%")
            scalars.update({"val/ema_acc1": acc1_ema, "val/ema_acc5": acc5_ema})
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, epoch)
            writer.flush()
        if rank == 0 and (epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1):
            save_checkpoint(config, epoch, model_without_ddp, model_ema, max_accuracy, max_accuracy_ema, optimizer,
                            lr_scheduler, updates_per_epoch, grad_update, logger)

    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if acc1 is None:  # the resumed checkpoint had already finished the schedule
        logger.info(f"nothing left to train: {resume_path} completed all {config.TRAIN.EPOCHS} epochs")
        acc1, _, _ = validate(config, loader_val, model, device, logger)
    # DDP keeps parameters identical on every rank (buffers such as BatchNorm statistics may differ)
    logger.info(f"parameters sha256 {tensors_hash(dict(model_without_ddp.named_parameters()))} (rank {rank})")
    logger.info(f"Final validation accuracy: top-1 {acc1:.2f}% (best {max_accuracy:.2f}%)")
    if writer is not None:
        writer.close()
    if is_distributed():
        dist.barrier()  # let rank 0 finish its last checkpoint before the group goes away
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as error:
        sys.exit(f"error: {error}")
