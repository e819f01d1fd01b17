"""The classification trainer (classification/main.py) on the CPU: real runs on a tiny ImageFolder.

Covers the launch modes (plain python, torchrun, the legacy torch.distributed.launch, two-"node"
torchrun) with real DDP over gloo, kill -9 and resume (of the single process, and of one rank of two, resumed
on two processes or on one), --eval of a checkpoint, non-finite losses, bad inputs, the optimizer's no-decay
set, the LR schedule, and the shipped configs.
"""
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import classification
from classification import main as trainer
from classification.config import load_config
from classification.data import DataError, ZipImageFolder, prepare_digits
from classification.models import build_model
from classification.optim import build_scheduler, parameter_groups, scale_learning_rates
from classification.utils import (CheckpointError, GradientUpdate, NonFiniteGuard, NonFiniteTrainingError,
                                  read_checkpoint)

PACKAGE = Path(classification.__file__).resolve().parent
MAIN = str(PACKAGE / "main.py")
DEMO_CFG = str(PACKAGE / "configs" / "demo" / "vmamba_digits.yaml")
# The demo VMamba made even smaller, on 2 classes of 32 px images, one process-local loader.
TINY = ["--cfg", DEMO_CFG, "--opts", "MODEL.VSSM.EMBED_DIM", "16", "MODEL.VSSM.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.NUM_CLASSES", "2", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
        "TRAIN.WARMUP_EPOCHS", "1", "MODEL.DROP_PATH_RATE", "0.1"]
SUBPROCESS_TIMEOUT = 300


def make_image_folder(root, train_per_class=8, val_per_class=4, size=32):
    """Two learnable classes (a red or a blue cast over noise), PNG files, ImageFolder layout."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(2):
            folder = Path(root) / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 100, (size, size, 3)).astype(np.uint8)
                image[..., 2 * label] += 120
                Image.fromarray(image).save(folder / f"{i}.png")
    return Path(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def train_args(data, output, epochs, batch_size, *extra_opts, flags=()):
    return ["--data-path", str(data), "--output", str(output), "--batch-size", str(batch_size), *flags,
            *TINY, "TRAIN.EPOCHS", str(epochs), *extra_opts]


def log_text(output, rank=0, tag="default"):
    return (Path(output) / "vmamba_digits" / tag / f"log_rank{rank}.txt").read_text()


def parameters_hash(log):
    hashes = re.findall(r"parameters sha256 ([0-9a-f]{64})", log)
    assert len(hashes) == 1, "the run must end with one parameters hash"
    return hashes[0]


def accuracies(log, ema=False):
    kind = "EMA network" if ema else "network"
    return [float(a) for a in re.findall(rf"Accuracy of the {kind} on the \d+ test images: ([\d.]+)%", log)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


EMA = ["--model_ema", "--model_ema_decay", "0.5"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", MAIN]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """A plain single-process run of 2 epochs with EMA: the reference for resume and --eval."""
    output = tmp_path_factory.mktemp("uninterrupted")
    run([sys.executable, MAIN, *train_args(tiny_data, output, 2, 2, flags=EMA)])
    return output / "vmamba_digits" / "default"


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_data, tmp_path_factory):
    """The same run on 2 processes (torchrun, gloo), 2 images per process: the reference for DDP resume."""
    output = tmp_path_factory.mktemp("uninterrupted_ddp")
    run([*TORCHRUN_2, *train_args(tiny_data, output, 2, 2, flags=EMA)])
    return output


# ----------------------------------------------------------------------------- plain run
@pytest.mark.slow
def test_plain_run_logs_checkpoints_and_tensorboard(uninterrupted):
    log = (uninterrupted / "log_rank0.txt").read_text()
    assert "no process group" in log and "trains and evaluates in fp32" in log
    for field in ("lr ", "loss ", "grad_norm ", "loss_scale ", "img/s", "eta ", "mem "):
        assert re.search(rf"Train: \[1/2\]\[7/8\].*{field}", log), field
    assert "number of params:" in log and ("FLOPs at 32px" in log or "FLOPs: unavailable (" in log)
    assert sorted(p.name for p in uninterrupted.glob("ckpt_epoch_*.pth")) == [f"ckpt_epoch_{e}.pth" for e in range(2)]
    assert not list(uninterrupted.glob("*.tmp*")), "atomic saves leave no temporary files behind"
    assert load_config(str(uninterrupted / "config.yaml")).TRAIN.EPOCHS == 2
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = read_checkpoint(str(uninterrupted / "ckpt_epoch_1.pth"))
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy",
            "max_accuracy_ema", "config"} <= set(checkpoint)
    assert checkpoint["epoch"] == 1
    assert checkpoint["max_accuracy"] == max(accuracies(log))
    assert checkpoint["max_accuracy_ema"] == max(accuracies(log, ema=True))


# ----------------------------------------------------------------------------- resume
def assert_same_state(expected, actual):
    for key in ("epoch", "max_accuracy", "max_accuracy_ema", "scaler"):
        assert expected[key] == actual[key], key
    for key in ("model", "model_ema"):
        for name, tensor in expected[key].items():
            assert torch.equal(tensor, actual[key][name]), f"{key}.{name} differs"
    assert expected["lr_scheduler"] == actual["lr_scheduler"]
    assert expected["optimizer"]["param_groups"] == actual["optimizer"]["param_groups"]
    for index, state in expected["optimizer"]["state"].items():
        other = actual["optimizer"]["state"][index]
        assert torch.equal(state["step"], other["step"]), "optimizer step count differs"
        assert torch.equal(state["exp_avg"], other["exp_avg"]) and torch.equal(state["exp_avg_sq"], other["exp_avg_sq"])


@pytest.mark.slow
def test_kill_during_epoch_then_resume_matches_uninterrupted_run(tiny_data, uninterrupted, tmp_path):
    args = train_args(tiny_data, tmp_path, 2, 2, flags=EMA)
    log_file = tmp_path / "vmamba_digits" / "default" / "log_rank0.txt"
    process = subprocess.Popen([sys.executable, MAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while not (log_file.exists() and "Train: [1/2][0/8]" in log_file.read_text()):
        assert process.poll() is None and time.time() < deadline, "the run ended before epoch 1 started"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = tmp_path / "vmamba_digits" / "default"
    assert (first / "ckpt_epoch_0.pth").exists() and not (first / "ckpt_epoch_1.pth").exists(), \
        "the kill must land inside epoch 1"

    # rerun under another tag: auto-resume finds the checkpoint in the sibling folder
    run([sys.executable, MAIN, *args, "--tag", "rerun"])
    rerun_log = log_text(tmp_path, tag="rerun")
    assert re.search(r"resuming from .*default/ckpt_epoch_0\.pth", rerun_log)
    assert "Train: [0/2]" not in rerun_log and "Train: [1/2][0/8]" in rerun_log
    assert_same_state(read_checkpoint(str(uninterrupted / "ckpt_epoch_1.pth")),
                      read_checkpoint(str(tmp_path / "vmamba_digits" / "rerun" / "ckpt_epoch_1.pth")))


@pytest.mark.slow
def test_eval_of_a_checkpoint_reproduces_the_logged_accuracy(tiny_data, uninterrupted, tmp_path):
    run([sys.executable, MAIN, "--data-path", str(tiny_data), "--output", str(tmp_path), *TINY,
         "--eval", "--resume", str(uninterrupted / "ckpt_epoch_1.pth"), "--model_ema"])
    logged = (uninterrupted / "log_rank0.txt").read_text()
    evaluated = log_text(tmp_path)
    assert accuracies(evaluated) == accuracies(logged)[-1:]
    assert accuracies(evaluated, ema=True) == accuracies(logged, ema=True)[-1:]
    assert "Train:" not in evaluated


@pytest.mark.slow
def test_rerunning_a_finished_run_only_reports_its_accuracy(tiny_data, uninterrupted, tmp_path, capsys):
    shutil.copytree(uninterrupted, tmp_path / "vmamba_digits" / "default")
    trainer.main(train_args(tiny_data, tmp_path, 2, 2, flags=EMA))
    printed = capsys.readouterr().out
    assert "nothing left to train" in printed and "Train:" not in printed
    final = re.findall(r"Final validation accuracy: top-1 ([\d.]+)%", printed)
    assert [float(a) for a in final] == accuracies((uninterrupted / "log_rank0.txt").read_text())[-1:]


@pytest.mark.slow
def test_auto_resume_skips_an_unreadable_newest_checkpoint(uninterrupted, tmp_path):
    output = tmp_path / "vmamba_digits" / "default"
    output.mkdir(parents=True)
    shutil.copy(uninterrupted / "ckpt_epoch_0.pth", output / "ckpt_epoch_0.pth")
    (output / "ckpt_epoch_1.pth").write_bytes((uninterrupted / "ckpt_epoch_1.pth").read_bytes()[:5000])
    os.utime(output / "ckpt_epoch_0.pth", (0, 0))  # older than the damaged one
    config = load_config(DEMO_CFG)
    config.OUTPUT = str(output)
    path, checkpoint = trainer.find_resume_checkpoint(config)
    assert path.endswith("ckpt_epoch_0.pth") and checkpoint["epoch"] == 0


def test_gradient_accumulation_updates_every_second_step(tiny_data, tmp_path):
    trainer.main(train_args(tiny_data, tmp_path, 1, 2, flags=["--accumulation-steps", "2"]))
    log = log_text(tmp_path)
    assert "total batch 4 (per process 2 x 1 processes x 2 accumulation steps)" in log
    checkpoint = read_checkpoint(str(tmp_path / "vmamba_digits" / "default" / "ckpt_epoch_0.pth"))
    assert {state["step"].item() for state in checkpoint["optimizer"]["state"].values()} == {4.0}, \
        "8 batches of 2, accumulated in pairs: 4 optimizer updates"


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, tmp_path):
    """--compile trains the torch.compile'd model (checkpoints and EMA from the uncompiled one it shares its
    parameters with): one epoch ends where the eager run does, up to compiled-kernel rounding."""
    losses = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        output = tmp_path / name
        trainer.main(train_args(tiny_data, output, 1, 4, "MODEL.DROP_PATH_RATE", "0.0", flags=flags))
        log = log_text(output)
        losses[name] = [float(v) for v in re.findall(r"loss ([\d.]+) \(", log)]
        assert losses[name], log
    assert "torch.compile(mode='default')" in log_text(tmp_path / "compiled")
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="TRAIN.COMPILE 'fast' is not a torch.compile mode"):
        trainer.main(train_args(tiny_data, tmp_path / "bad", 1, 4, "TRAIN.COMPILE", "fast"))


@pytest.mark.slow
def test_pretrained_with_a_new_head_then_throughput_on_cpu(tiny_data, uninterrupted, tmp_path):
    trainer.main(["--data-path", str(tiny_data), "--output", str(tmp_path), *TINY, "MODEL.NUM_CLASSES", "3",
                  "--pretrained", str(uninterrupted / "ckpt_epoch_1.pth"), "--throughput"])
    log = log_text(tmp_path)
    assert "pretrained classifier head ('classifier.head.weight', 'classifier.head.bias') does not fit" in log
    assert re.search(r"pretrained weights from .*ckpt_epoch_1\.pth: loaded", log)
    assert re.search(r"throughput: batch \d+, 2 warm-up \+ 5 timed forwards on cpu: [\d.]+ img/s", log)


def test_timm_baseline_trains_with_the_full_recipe(tiny_data, tmp_path):
    # ConvNeXt-T from timm with Mixup/CutMix, RandAugment and random erasing, at 32 px to stay cheap
    trainer.main(["--data-path", str(tiny_data), "--output", str(tmp_path), "--batch-size", "4",
                  "--cfg", str(PACKAGE / "configs" / "baselines" / "convnext_tiny.yaml"), "--opts",
                  "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "2", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0",
                  "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1"])
    log = (tmp_path / "convnext_tiny" / "default" / "log_rank0.txt").read_text()
    assert "creating model timm/convnext_tiny" in log and "Final validation accuracy" in log
    assert re.search(r"Train: \[0/1\]\[3/4\].*loss \d", log) and "non-finite" not in log


# ----------------------------------------------------------------------------- bad inputs
def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        trainer.main(["--data-path", str(tmp_path / "nowhere"), "--output", str(tmp_path), *TINY])
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has no train/ directory"):
        trainer.main(["--data-path", str(tmp_path / "flat"), "--output", str(tmp_path), *TINY])
    with pytest.raises(DataError, match="has 2 classes but MODEL.NUM_CLASSES is 1"):
        trainer.main(["--data-path", str(make_image_folder(tmp_path / "two")), "--output", str(tmp_path), *TINY,
                      "MODEL.NUM_CLASSES", "1"])
    result = subprocess.run([sys.executable, MAIN, "--data-path", str(tmp_path / "nowhere"), *TINY],
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: data path")


@pytest.mark.slow
def test_corrupt_or_missing_checkpoint_is_a_clear_error(tiny_data, uninterrupted, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((uninterrupted / "ckpt_epoch_1.pth").read_bytes()[:10000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    common = ["--data-path", str(tiny_data), "--output", str(tmp_path), *TINY]
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match="unreadable"):
            trainer.main(["--resume", str(bad), *common])
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.main(["--resume", str(tmp_path / "missing.pth"), *common])
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.main(["--pretrained", str(tmp_path / "missing.pth"), *common])


# ----------------------------------------------------------------------------- non-finite losses
def _train_with_nan_batches(nan_batches, limit, caplog):
    """One epoch of train_one_epoch on a linear model, 4 batches of 2, some of them NaN images."""
    config = load_config(None, ["TRAIN.MAX_NONFINITE_STEPS", str(limit), "TRAIN.EPOCHS", "2",
                                "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"])
    config.freeze()
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 4, 4), torch.tensor([0, 1] * 4)
    for batch in nan_batches:
        images[2 * batch: 2 * batch + 2] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(config, optimizer, len(loader))
    caplog.set_level(logging.INFO, logger="nonfinite-test")
    error = None
    try:
        trainer.train_one_epoch(config, model, torch.nn.CrossEntropyLoss(), loader, optimizer, 0, None, scheduler,
                                GradientUpdate(use_grad_scaler=False), None, NonFiniteGuard(limit),
                                torch.device("cpu"), logging.getLogger("nonfinite-test"))
    except NonFiniteTrainingError as raised:
        error = raised
    return model, initial, optimizer, error


def test_a_nonfinite_loss_is_reported_and_its_update_skipped(caplog):
    model, initial, optimizer, error = _train_with_nan_batches([1], limit=3, caplog=caplog)
    assert error is None
    assert "non-finite loss nan at epoch 0 step 1" in caplog.text
    assert "update skipped at epoch 0 step 1" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial))
    assert all(state["step"].item() == 3 for state in optimizer.state.values()), "3 of 4 updates applied"


def test_persistent_nonfinite_losses_stop_training_without_touching_the_weights(caplog):
    model, initial, optimizer, error = _train_with_nan_batches([0, 1, 2, 3], limit=3, caplog=caplog)
    assert isinstance(error, NonFiniteTrainingError)
    assert "3 optimizer updates in a row" in str(error) and "epoch 0 step 2" in str(error)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial))
    assert not optimizer.state


# ----------------------------------------------------------------------------- DDP over gloo
def _assert_ranks_agree(output, epochs):
    logs = [log_text(output, rank) for rank in (0, 1)]
    for rank, log in enumerate(logs):
        assert f"rank {rank}/2" in log and "process group gloo" in log
        assert f"Train: [{epochs - 1}/{epochs}]" in log
    assert parameters_hash(logs[0]) == parameters_hash(logs[1])
    assert accuracies(logs[0]) == accuracies(logs[1]), "validation is all-reduced: both ranks report the same"
    assert (Path(output) / "vmamba_digits" / "default" / f"ckpt_epoch_{epochs - 1}.pth").exists()
    return logs


@pytest.mark.slow
def test_ddp_torchrun_two_processes(uninterrupted_ddp):
    logs = _assert_ranks_agree(uninterrupted_ddp, 2)
    assert "local rank 1" in logs[1]
    assert "total batch 4 (per process 2 x 2 processes" in logs[0]
    # rank 0 alone writes the checkpoints, each through a temporary file renamed over the final name
    assert "ckpt_epoch_1.pth saved" in logs[0] and " saved" not in logs[1]
    assert not list((uninterrupted_ddp / "vmamba_digits" / "default").glob("*.tmp*"))


def _kill_rank_1_during_epoch_1(args, output):
    """Starts a 2-process torchrun run, kills rank 1 with SIGKILL once epoch 1 has begun, and checks that the
    launcher ends the run (rank 0 included) and that only the whole checkpoint of epoch 0 is left."""
    folder = output / "vmamba_digits" / "default"
    launcher = subprocess.Popen([*TORCHRUN_2, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + SUBPROCESS_TIMEOUT
    # rank 1 logs its first step of epoch 1 after that step's gradient all-reduce, which rank 0 joins only
    # once ckpt_epoch_0.pth is written
    while not ((folder / "log_rank1.txt").exists() and "Train: [1/2][0/4]" in log_text(output, 1)):
        assert launcher.poll() is None and time.time() < deadline, "the run ended before epoch 1 started"
        time.sleep(0.02)
    pids = [int(re.search(rf"rank {rank}/2, local rank {rank}, pid (\d+)", log_text(output, rank)).group(1))
            for rank in (0, 1)]
    os.kill(pids[1], signal.SIGKILL)
    launcher_output, _ = launcher.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert launcher.returncode != 0 and "SIGKILL" in launcher_output, launcher_output[-4000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the launcher stopped the surviving rank
    assert sorted(p.name for p in folder.glob("ckpt_epoch_*")) == ["ckpt_epoch_0.pth"], \
        "the kill must land inside epoch 1, and leave no partial file"


@pytest.mark.slow
def test_ddp_kill_of_one_rank_then_resume_on_two_or_one_processes(tiny_data, uninterrupted_ddp, tmp_path):
    """kill -9 of rank 1 in the middle of epoch 1; auto-resume from ckpt_epoch_0.pth (a) on 2 processes ends
    bit-identical to the uninterrupted 2-process run (weights, EMA, optimizer, schedule); (b) on 1 process,
    with twice the updates per epoch, continues this run's schedule at epoch 1."""
    args = train_args(tiny_data, tmp_path / "two", 2, 2, flags=EMA)
    _kill_rank_1_during_epoch_1(args, tmp_path / "two")
    one = tmp_path / "one" / "vmamba_digits" / "default"
    one.mkdir(parents=True)
    shutil.copy(tmp_path / "two" / "vmamba_digits" / "default" / "ckpt_epoch_0.pth", one)

    run([*TORCHRUN_2, *args])  # (a): the same command again
    for rank in (0, 1):
        resumed = log_text(tmp_path / "two", rank).split("resuming from")[-1]
        assert "ckpt_epoch_0.pth" in resumed.splitlines()[0] and "Train: [0/2]" not in resumed
        assert "learning-rate schedule continues at epoch 1: update 4 of 8 (4 per epoch)" in resumed
    assert_same_state(read_checkpoint(str(uninterrupted_ddp / "vmamba_digits" / "default" / "ckpt_epoch_1.pth")),
                      read_checkpoint(str(tmp_path / "two" / "vmamba_digits" / "default" / "ckpt_epoch_1.pth")))

    one_args = train_args(tiny_data, tmp_path / "one", 2, 2, flags=EMA)
    run([sys.executable, MAIN, *one_args])  # (b)
    log = log_text(tmp_path / "one")
    assert "written at 4 optimizer updates per epoch, this run makes 8" in log and "Train: [0/2]" not in log
    _, config = trainer.parse_option(one_args)
    scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedule = build_scheduler(config, optimizer, updates_per_epoch=8)

    def lr_after(update):
        schedule.step_update(update)
        return optimizer.param_groups[0]["lr"]

    assert f"continues at epoch 1: update 8 of 16 (8 per epoch), lr {lr_after(8):.6e}" in log
    logged = re.findall(r"Train: \[1/2\]\[\d/8\].*? lr ([\d.]+)", log)
    assert logged == [f"{lr_after(8 + step):.6f}" for step in range(1, 9)]
    # Swin's resume (the checkpoint's scheduler state at this run's update count) is past its 2-process
    # schedule's end: the minimum lr, not the warm learning rate this run's schedule gives at epoch 1
    swin_schedule = build_scheduler(config, optimizer, updates_per_epoch=8)
    swin_schedule.load_state_dict(read_checkpoint(str(one / "ckpt_epoch_0.pth"))["lr_scheduler"])
    swin_schedule.step_update(9)
    assert optimizer.param_groups[0]["lr"] < float(logged[0]) / 5
    final = read_checkpoint(str(one / "ckpt_epoch_1.pth"))
    assert final["epoch"] == 1 and final["updates_per_epoch"] == 8
    assert {state["step"].item() for state in final["optimizer"]["state"].values()} == {4.0 + 8.0}


@pytest.mark.slow
def test_ddp_legacy_launcher_passes_local_rank(tiny_data, tmp_path):
    run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
         str(free_port()), MAIN, *train_args(tiny_data, tmp_path, 2, 4)])
    logs = _assert_ranks_agree(tmp_path, 2)
    assert "local rank 1" in logs[1]


@pytest.mark.slow
def test_ddp_torchrun_two_nodes_use_local_rank(tiny_data, tmp_path):
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               port, MAIN, *train_args(tiny_data, tmp_path, 1, 4)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    for node in nodes:
        output, _ = node.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert node.returncode == 0, output[-4000:]
    logs = _assert_ranks_agree(tmp_path, 1)
    assert "rank 1/2, local rank 0" in logs[1], "the second node's process has global rank 1, local rank 0"


# ----------------------------------------------------------------------------- pieces
def test_no_weight_decay_set_honours_ssm_parameters():
    config = load_config(DEMO_CFG, ["MODEL.VSSM.EMBED_DIM", "16", "MODEL.VSSM.DEPTHS", "[1, 1, 1, 1]"])
    model = build_model(config)
    names = {id(p): n for n, p in model.named_parameters()}

    def no_decay_names(decay_ssm_params):
        groups = parameter_groups(model, 0.05, decay_ssm_params)
        assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
        return {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]}, \
               {names[id(p)].rsplit(".", 1)[-1] for p in groups[0]["params"]}

    skipped, decayed = no_decay_names(False)
    assert {"A_logs", "Ds", "dt_projs_bias", "bias"} <= skipped
    assert not {"A_logs", "Ds", "dt_projs_bias"} & decayed
    assert {"x_proj_weight", "dt_projs_weight"} <= decayed
    skipped, decayed = no_decay_names(True)  # the authors' optimizer
    assert {"A_logs", "dt_projs_bias"} <= decayed and "Ds" in skipped


def test_learning_rate_scaling_and_per_iteration_warmup_cosine():
    config = load_config(None, ["DATA.BATCH_SIZE", "128", "TRAIN.ACCUMULATION_STEPS", "2",
                                "TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2"])
    assert scale_learning_rates(config, world_size=4) == 1024
    assert config.TRAIN.BASE_LR == pytest.approx(1e-3)
    assert config.TRAIN.WARMUP_LR == pytest.approx(1e-6) and config.TRAIN.MIN_LR == pytest.approx(1e-5)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch=100)
    lrs = []
    for update in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(update + 1)
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[100] == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-2), "linear warm-up over 200 updates"
    assert lrs[200] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[200:], lrs[201:])), "cosine decays every update"
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-2)


def test_shipped_configs_load_and_name_real_models():
    import timm
    for path in sorted((PACKAGE / "configs" / "baselines").glob("*.yaml")):
        config = load_config(str(path))
        assert config.MODEL.TYPE == "timm" and timm.is_model(config.MODEL.NAME), path
        assert config.AUG.MIXUP == 0.8 and config.TRAIN.EPOCHS == 300, "the same recipe as VMamba"
    names = {load_config(str(p)).MODEL.NAME for p in (PACKAGE / "configs" / "baselines").glob("*.yaml")}
    assert {"mambaout_tiny", "mambaout_small", "mambaout_base", "swin_tiny_patch4_window7_224",
            "convnext_tiny"} <= names
    config = load_config(DEMO_CFG)
    assert config.MODEL.NUM_CLASSES == 10 and config.DATA.DATA_PATH == ""


def test_digits_are_written_once(tmp_path):
    root = prepare_digits(tmp_path / "digits")
    train = list((root / "train").glob("*/*.png"))
    val = list((root / "val").glob("*/*.png"))
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(p.name for p in (root / "val").iterdir()) == [str(d) for d in range(10)]
    stamp = val[0].stat().st_mtime_ns
    assert prepare_digits(tmp_path / "digits") == root and val[0].stat().st_mtime_ns == stamp


def test_zip_mode_reads_the_same_images(tiny_data, tmp_path):
    with zipfile.ZipFile(tmp_path / "val.zip", "w") as archive:
        for path in sorted((tiny_data / "val").glob("*/*.png")):
            archive.write(path, path.relative_to(tiny_data / "val"))
    from torchvision import datasets
    folder = datasets.ImageFolder(tiny_data / "val")
    zipped = ZipImageFolder(tmp_path / "val.zip")
    assert zipped.classes == folder.classes and len(zipped) == len(folder)
    assert np.array_equal(np.asarray(zipped[3][0]), np.asarray(folder[3][0])) and zipped[3][1] == folder[3][1]


# ----------------------------------------------------------------------------- GPU (skipped without one)
@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype, precision", [("fp16", "AMP fp16 autocast with a GradScaler"),
                                                  ("bf16", "AMP bf16 autocast, no GradScaler")])
def test_cuda_amp_training_then_eval(tiny_data, tmp_path, amp_dtype, precision):
    run([sys.executable, MAIN, *train_args(tiny_data, tmp_path, 2, 4, flags=["--amp-dtype", amp_dtype])])
    log = log_text(tmp_path)
    assert precision in log and "device cuda:0" in log and "non-finite" not in log
    assert "FLOPs at 32px" in log
    checkpoint = tmp_path / "vmamba_digits" / "default" / "ckpt_epoch_1.pth"
    run([sys.executable, MAIN, "--data-path", str(tiny_data), "--output", str(tmp_path / "eval"), *TINY,
         "--amp-dtype", amp_dtype, "--eval", "--resume", str(checkpoint)])
    assert accuracies(log_text(tmp_path / "eval")) == accuracies(log)[-1:]
