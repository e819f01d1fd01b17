"""Optimizer (AdamW with a no-decay group), learning-rate scaling and per-iteration schedules."""
import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler

# SS2D parameters that are not weights in the weight-decay sense: the state matrix (log), the skip
# gain and the dt bias. The authors mark A_logs/Ds with `_no_weight_decay` but their optimizer never
# reads the mark, and dt_projs_bias escapes the ".bias" rule by its name, so both 2-D ones get decayed.
SSM_PARAMETER_NAMES = ("A_logs", "Ds", "dt_projs_bias")


def scale_learning_rates(config, world_size):
    """Scale BASE_LR, WARMUP_LR and MIN_LR by total batch / 512, as Swin and VMamba do.

    The total batch counts every process and every accumulation step. Mutates ``config``.
    """
    total_batch = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS
    factor = total_batch / 512.0
    config.TRAIN.BASE_LR = config.TRAIN.BASE_LR * factor
    config.TRAIN.WARMUP_LR = config.TRAIN.WARMUP_LR * factor
    config.TRAIN.MIN_LR = config.TRAIN.MIN_LR * factor
    return total_batch


def _is_ssm_parameter(name, param):
    return getattr(param, "_no_weight_decay", False) or name.rsplit(".", 1)[-1] in SSM_PARAMETER_NAMES


def parameter_groups(model, weight_decay, decay_ssm_params=False):
    """Two AdamW groups: decayed weights, and everything that should not be decayed.

    No decay for 1-D parameters (norms), biases, names listed by ``model.no_weight_decay()`` or
    containing a keyword of ``model.no_weight_decay_keywords()``, and the SSM parameters above.
    ``decay_ssm_params=True`` reproduces the authors' optimizer for the SSM parameters: they are
    decayed unless 1-D (so A_logs and dt_projs_bias are, Ds is not).
    """
    skip_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    skip_keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if decay_ssm_params and _is_ssm_parameter(name, param):
            skip = param.ndim <= 1
        else:
            skip = (param.ndim <= 1 or name.endswith(".bias") or name in skip_names
                    or any(keyword in name for keyword in skip_keywords) or _is_ssm_parameter(name, param))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config, model):
    groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.DECAY_SSM_PARAMS)
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                                 eps=config.TRAIN.OPTIMIZER.EPS)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=config.TRAIN.OPTIMIZER.MOMENTUM,
                               nesterov=True)
    raise ValueError(f"TRAIN.OPTIMIZER.NAME {config.TRAIN.OPTIMIZER.NAME!r}: expected 'adamw' or 'sgd'")


def build_scheduler(config, optimizer, updates_per_epoch):
    """A timm scheduler counted in optimizer updates (call ``step_update(n)`` after update n)."""
    total = int(config.TRAIN.EPOCHS * updates_per_epoch)
    warmup = int(config.TRAIN.WARMUP_EPOCHS * updates_per_epoch)
    common = dict(warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup, t_in_epochs=False)
    name = config.TRAIN.LR_SCHEDULER.NAME
    if name == "cosine":
        prefix = config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup if prefix else total),
                                 lr_min=config.TRAIN.MIN_LR, cycle_limit=1, warmup_prefix=prefix, **common)
    if name == "step":
        return StepLRScheduler(optimizer, decay_t=int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch),
                               decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, **common)
    if name == "multistep":
        return MultiStepLRScheduler(optimizer, decay_t=[int(e * updates_per_epoch)
                                                        for e in config.TRAIN.LR_SCHEDULER.MULTISTEPS],
                                    decay_rate=config.TRAIN.LR_SCHEDULER.GAMMA, **common)
    raise ValueError(f"TRAIN.LR_SCHEDULER.NAME {name!r}: expected 'cosine', 'step' or 'multistep'")
