"""The verdict of gpu_check.sh's multi-GPU kill / resume check (its train_resume function ran the trainer).

    python benchmarks/resume_check.py OUT classification/main.py args...

OUT holds three outputs of one 2-epoch run: uninterrupted/, killed/ (one rank killed during epoch 1, then the
same command again, which auto-resumed) and one_gpu/ (the epoch-0 checkpoint of killed/ resumed on 1 GPU). The
resumed run must end at the uninterrupted run's epoch, update count and learning rates; its weights are printed
beside the uninterrupted ones (bit-identical where the kernels are deterministic). The 1-GPU run must continue its
own schedule (its updates per epoch, its scaled learning rate) at epoch 1. Exit status 1 on a failed check.
"""
import glob
import re
import sys

import torch

from classification.main import parse_option
from classification.optim import build_scheduler, scale_learning_rates
from classification.utils import read_checkpoint


def run_folder(out, run):
    return glob.glob(f"{out}/{run}/*/default")[0]


def compare_resumed(out):
    """Failures of the multi-GPU resume against the uninterrupted run; prints how far the weights are apart."""
    reference, resumed = (read_checkpoint(f"{run_folder(out, run)}/ckpt_epoch_1.pth")
                          for run in ("uninterrupted", "killed"))
    failures = [f"{key} differs" for key in ("epoch", "updates_per_epoch", "lr_scheduler")
                if reference[key] != resumed[key]]
    if reference["optimizer"]["param_groups"] != resumed["optimizer"]["param_groups"]:
        failures.append("the optimizer's learning rates differ")
    steps = [{state["step"].item() for state in checkpoint["optimizer"]["state"].values()}
             for checkpoint in (reference, resumed)]
    if steps[0] != steps[1]:
        failures.append(f"optimizer update counts differ: uninterrupted {steps[0]}, resumed {steps[1]}")
    for key in ("model", "model_ema"):
        if all(torch.equal(reference[key][name], resumed[key][name]) for name in reference[key]):
            print(f"{key} after epoch 1, resumed against uninterrupted: bit-identical")
        else:
            diff = max((reference[key][name].float() - resumed[key][name].float()).abs().max().item()
                       for name in reference[key])
            print(f"{key} after epoch 1, resumed against uninterrupted: max |diff| {diff:.3g}")
    return failures


def check_one_gpu_schedule(out, trainer_args):
    """Failures of the 1-GPU resume: its logged lr at epoch 1 must be its own schedule's there."""
    log = open(f"{run_folder(out, 'one_gpu')}/log_rank0.txt").read()
    print("1-GPU resume:", *re.findall(r"the checkpoint was written at .*|learning-rate schedule continues .*", log),
          sep="\n  ")
    found = re.search(r"continues at epoch 1: update (\d+) of \d+ \((\d+) per epoch\), lr (\S+)", log)
    if found is None:
        return ["the 1-GPU resume logged no learning-rate schedule line"]
    update, updates_per_epoch, logged_lr = int(found.group(1)), int(found.group(2)), found.group(3)
    _, config = parse_option(trainer_args)
    scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    build_scheduler(config, optimizer, updates_per_epoch).step_update(update)
    expected_lr = f"{optimizer.param_groups[0]['lr']:.6e}"
    print(f"  its schedule's lr at update {update}: {expected_lr}")
    failures = [] if logged_lr == expected_lr else [f"the 1-GPU resume's lr {logged_lr} is not {expected_lr}"]
    if "Final validation accuracy" not in log:
        failures.append("the 1-GPU resume did not finish")
    return failures


def main():
    out, trainer_args = sys.argv[1], sys.argv[3:]  # argv[2] is classification/main.py
    failures = compare_resumed(out) + check_one_gpu_schedule(out, trainer_args)
    print("resume check: " + ("; ".join(failures) if failures else "passed"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
