"""Distributed setup, seeding, gradient updates with AMP, and checkpoint files for the trainer."""
import glob
import hashlib
import os
import random
import resource

import numpy as np
import torch
import torch.distributed as dist

from classification.models.checkpoint import torch_load_cpu

CHECKPOINT_GLOB = "ckpt_epoch_*.pth"


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint, reported before any GPU work starts."""


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer updates in a row had non-finite gradients."""


# ----------------------------------------------------------------------------- processes
def distributed_env(local_rank_arg=None):
    """(rank, world_size, local_rank) as set by torchrun / torch.distributed.launch.

    Plain ``python main.py`` gives (0, 1, 0). LOCAL_RANK (not RANK) picks the device, so several
    nodes with a few GPUs each work. The legacy launcher's ``--local-rank`` is used only when the
    environment does not say.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    return rank, world_size, local_rank


def setup_device(rank, world_size, local_rank):
    """Pick cuda:LOCAL_RANK (or the CPU) and join the process group (NCCL on GPU, gloo on CPU)."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(base_seed, epoch, rank):
    """The seed of (epoch, rank): every epoch restarts its random streams (augmentation, Mixup,
    drop-path, loader workers) from this, so a run resumed at an epoch boundary repeats them."""
    return (base_seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def memory_used_mb(device):
    """Peak memory: CUDA allocator peak on GPU, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensors_hash(tensors):
    """sha256 of the names and bytes of a {name: tensor} dict: equal hashes mean bit-identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- updates
class GradientUpdate:
    """Backward, unscale, clip, step: with a GradScaler for fp16, plainly for fp32 and bf16.

    Returns the gradient norm (before clipping) when an update was due, else None. An update whose
    gradients are not finite is skipped, so a NaN/inf never reaches the weights or the AdamW state:
    GradScaler does that itself for fp16 (and lowers the loss scale); without it we do it here.
    The norm is computed after the DDP all-reduce, so every rank takes the same decision.
    """

    def __init__(self, use_grad_scaler):
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_grad_scaler)

    def __call__(self, loss, optimizer, parameters, clip_grad, update):
        self.scaler.scale(loss).backward()
        if not update:
            return None
        self.scaler.unscale_(optimizer)
        parameters = [p for p in parameters if p.grad is not None]
        if clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
        elif torch.isfinite(grad_norm):
            optimizer.step()
        return grad_norm

    def loss_scale(self):
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict):
        if state_dict:  # empty when the checkpoint was written without a GradScaler
            self.scaler.load_state_dict(state_dict)


class NonFiniteGuard:
    """Counts skipped (non-finite) updates in a row; raises once ``limit`` are reached."""

    def __init__(self, limit):
        self.limit = limit
        self.in_a_row = 0

    def record(self, finite, where):
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} optimizer updates in a row had non-finite gradients (last at {where}); "
                f"stopping (TRAIN.MAX_NONFINITE_STEPS={self.limit}). Lower the learning rate, check the "
                f"data, or try --amp-dtype bf16 / --disable_amp.")


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint_atomic(state, path):
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one:
    write a temporary file in the same directory, flush it to disk, then rename it over ``path``."""
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_checkpoint(path):
    """Load a checkpoint on the CPU, with a clear CheckpointError if it is missing or unreadable.

    Loads through ``torch_load_cpu`` (the authors' checkpoints also pickle their yacs config object).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch_load_cpu(path)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path!r} is unreadable (truncated or not a PyTorch file): "
                              f"{type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"checkpoint {path!r} has no 'model' entry; is it a training checkpoint?")
    return checkpoint


def checkpoint_candidates(output_dir):
    """Auto-resume candidates: every ``ckpt_epoch_*.pth`` in ``output_dir`` or in a sibling directory
    (another --tag of the same model under the same --output), newest modification time first."""
    parent = os.path.dirname(os.path.normpath(output_dir))
    candidates = glob.glob(os.path.join(output_dir, CHECKPOINT_GLOB)) + glob.glob(
        os.path.join(parent, "*", CHECKPOINT_GLOB))
    return sorted(set(candidates), key=os.path.getmtime, reverse=True)
