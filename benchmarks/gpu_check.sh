#!/usr/bin/env bash
# Checks an installed VMamba on one GPU (or N, where TRAIN_GPUS / MM_GPUS say): the CUDA tests, then the
# measurements behind BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh [PART ...]        (default: all)
#   TRAIN_GPUS=8 MM_GPUS=8 bash benchmarks/gpu_check.sh train mm      (the multi-GPU checks, on 8 GPUs)
#
#   tests    every `cuda`-marked test (pytest -m cuda tests)
#   kernels  benchmarks/bench_scan.py; benchmarks/bench_ss2d.py at the 224 px stage shapes (ssm_ratio 1, then
#            stage 1 at ssm_ratio 2), at the maps of a detection-size input (batch 2, 800x1333) and at Vanilla
#            VMamba-T's stage shapes (d_state 16)
#   models   benchmarks/bench_model.py (224 px, batch 128), again for VMamba-T/S and Vanilla-T with
#            SELECTIVE_SCAN_NO_EXTENSION=1 (the Triton kernels), then benchmarks/host_cost.py
#   scaleup  analyze/tp.py: VMamba-T, Swin-T and ConvNeXt-T at batch 32, 224..1024 px (CSV and scaleup.png)
#   train    classification/main.py with VMamba-T's full recipe on generated ImageFolder data (img/s, fp16
#            stability: non-finite losses, skipped updates). With TRAIN_GPUS=N > 1 also the N-GPU torchrun run
#            (scaling efficiency) and the kill / resume check: a 2-epoch N-GPU run with one rank killed by
#            kill -9 during epoch 1, resumed by the same command and compared with the uninterrupted run, and
#            its epoch-0 checkpoint resumed on 1 GPU, whose learning rate must follow its own schedule
#            (benchmarks/resume_check.py prints the verdict)
#   mm       Mask R-CNN and UperNet, VMamba-T against Swin-T backbones, trained from scratch on generated
#            shapes (box / mask AP and mIoU at each evaluation, img/s). With MM_GPUS=N > 1 the VMamba-T runs also
#            train with dist_train.sh on N GPUs, and their 1-GPU checkpoints are evaluated with test.py on 1 GPU
#            and dist_test.sh on N (UperNet with --tta): the two rows should agree
#   all      all of the above, in this order
# Each part fits in 10 minutes on one H100; the multi-GPU additions take a few minutes more.
#
# The project must be installed first, with the selective-scan extension built for this GPU (it needs a CUDA
# toolkit and a CUDA build of torch): `./dev.sh setup` (then PYTHON=.venv/bin/python), or
#   pip install --no-build-isolation ./kernels/selective_scan && pip install -e .
# The mm part also needs mmcv (with its ops), mmdet and mmseg at the versions requirements.txt pins. This
# script installs and builds nothing.
#
# Environment:
#   PYTHON       interpreter of the installed project (default python3)
#   OUT          where logs, JSON and CSV go, one folder per part (default ./gpu_check_out)
#   TRAIN_STEPS  training steps per run (default 300); TRAIN_BATCH images per GPU (default 128);
#   TRAIN_CFG    classification config (default classification/configs/vssm/vmambav2v_tiny_224.yaml);
#   TRAIN_GPUS   1 (default), or N > 1 to add the N-GPU torchrun run, the scaling efficiency and the kill /
#                resume check (TRAIN_RESUME_STEPS steps per GPU and epoch, default 40)
#   MM_ITERS     iterations per detection / segmentation run (default 300; evaluation every third of them)
#   MM_GPUS      1 (default), or N > 1 to add the dist_train.sh / dist_test.sh runs on N GPUs
#
# The first line printed describes the machine (GPU, driver, torch, CUDA, the extension's build, the host's
# time per tiny CUDA op, which launch-bound models follow). Each part ends with its duration; the exit status
# is non-zero if any part failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
TRAIN_CONFIG=${TRAIN_CFG:-classification/configs/vssm/vmambav2v_tiny_224.yaml}
OUT=$(mkdir -p "${OUT:-gpu_check_out}" && cd "${OUT:-gpu_check_out}" && pwd)
PARTS=(tests kernels models scaleup train mm)
export PYTHONUNBUFFERED=1

# step LOG COMMAND...: runs COMMAND, showing its output and keeping it in LOG; returns COMMAND's status.
step() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

environment() {
  "$PY" - <<'EOF'
import subprocess
import sys

import torch

import selective_scan

if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to torch {torch.__version__}")
if not selective_scan.cuda_available():
    sys.exit(f"the selective-scan CUDA kernels are not available ({selective_scan.build_info()}): install the "
             "project as the header of benchmarks/gpu_check.sh says")
sys.path.insert(0, "benchmarks")
from host_cost import tiny_op_us

try:
    driver = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    driver = "unknown"
print(f"GPU {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), driver {driver} | "
      f"torch {torch.__version__}, CUDA {torch.version.cuda} | {selective_scan.build_info()} | "
      f"host {tiny_op_us():.2f} us per tiny CUDA op")
EOF
}

part_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -m cuda --tb=short tests >"$OUT/tests/pytest.log" 2>&1
  local status=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests/pytest.log" | head -n 30
  tail -n 1 "$OUT/tests/pytest.log"
  return $status
}

part_kernels() {
  local dir=$OUT/kernels status=0
  step "$dir/bench_scan.log" "$PY" benchmarks/bench_scan.py --json "$dir/bench_scan.json" || status=1
  step "$dir/ss2d_stages.log" "$PY" benchmarks/bench_ss2d.py --stages 1 2 3 4 --json "$dir/ss2d_stages.json" ||
    status=1
  step "$dir/ss2d_ssm_ratio_2.log" "$PY" benchmarks/bench_ss2d.py --stages 1 --ssm-ratio 2 \
    --json "$dir/ss2d_ssm_ratio_2.json" || status=1
  step "$dir/ss2d_detection.log" "$PY" benchmarks/bench_ss2d.py --batch 2 --image 800 1333 --stages 1 2 3 4 \
    --json "$dir/ss2d_detection.json" || status=1
  step "$dir/ss2d_d_state_16.log" "$PY" benchmarks/bench_ss2d.py --stages 1 2 3 4 --ssm-ratio 2 --d-state 16 \
    --json "$dir/ss2d_d_state_16.json" || status=1
  return $status
}

part_models() {
  local dir=$OUT/models status=0
  step "$dir/bench_model.log" "$PY" benchmarks/bench_model.py --no-op --json "$dir/bench_model.json" || status=1
  # the same VMamba models without the extension: the Triton kernels (what an installation without nvcc runs)
  SELECTIVE_SCAN_NO_EXTENSION=1 step "$dir/bench_model_triton.log" "$PY" benchmarks/bench_model.py --no-op \
    --models vmamba_tiny_s1l8 vmamba_small_s2l15 vanilla_vmamba_tiny --json "$dir/bench_model_triton.json" || status=1
  step "$dir/host_cost.log" "$PY" benchmarks/host_cost.py || status=1
  return $status
}

part_scaleup() {
  step "$OUT/scaleup/tp.log" "$PY" analyze/tp.py \
    --model vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 convnext_tiny --batch-size 32 \
    --sizes 224 384 512 768 1024 --warmup 20 --iters 30 --modes infer_fp32 infer_amp --device cuda \
    --out "$OUT/scaleup"
}

# train_data IMAGES: prints the root of an ImageFolder whose train/ holds IMAGES links to the built-in digits
# written once as 224 px JPEGs (val/: the digits' own split), so that a run is one epoch of exactly the steps
# asked for, with no validation or checkpoint inside the timed steps.
train_data() {
  local root=$OUT/train/data_$1
  [ -d "$root/train" ] || "$PY" - "$root" "$1" "$OUT/train/digits224" >&2 <<'EOF' || return 1
import os
import sys
from pathlib import Path

from PIL import Image

from classification.data import prepare_digits

root, images, jpegs = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
if not jpegs.is_dir():
    digits = prepare_digits()
    for png in sorted(digits.glob("*/*/*.png")):
        target = jpegs / png.relative_to(digits).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").resize((224, 224), Image.BICUBIC).save(target, quality=90)
staging = root.with_name(root.name + ".tmp")
sources = sorted((jpegs / "train").glob("*/*.jpg"))
for index in range(images):
    source = sources[index % len(sources)]
    link = staging / "train" / source.parent.name / f"{index:07d}.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), link)
os.symlink((jpegs / "val").resolve(), staging / "val")
os.rename(staging, root)
EOF
  echo "$root"
}

# loader_workers GPUS: data-loader workers per process, the host's cores shared among GPUS processes, 8 at most.
loader_workers() {
  echo $(( $(nproc) / $1 < 8 ? $(nproc) / $1 : 8 ))
}

# train_run NAME GPUS: one epoch of TRAIN_STEPS steps on GPUS processes, output under $OUT/train/NAME.
train_run() {
  local name=$1 gpus=$2 data
  local steps=${TRAIN_STEPS:-300} batch=${TRAIN_BATCH:-128}
  local launcher=("$PY")
  [ "$gpus" -gt 1 ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus")
  data=$(train_data $(( steps * batch * gpus ))) || return 1
  rm -rf "${OUT:?}/train/$name"
  echo "--- $name: $gpus GPU(s), $steps steps of $batch images per GPU"
  "${launcher[@]}" classification/main.py --cfg "$TRAIN_CONFIG" \
    --data-path "$data" --batch-size "$batch" --output "$OUT/train/$name" --model_ema \
    --opts TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 20 DATA.NUM_WORKERS "$(loader_workers "$gpus")" \
    TRAIN.AUTO_RESUME False >"$OUT/train/$name.log" 2>&1
  local status=$?
  tail -n 4 "$OUT/train/$name.log"
  return $status
}

# train_resume GPUS: 2 epochs of TRAIN_RESUME_STEPS steps on GPUS processes, run three ways: uninterrupted; killed
# (kill -9 of the last rank once epoch 1 has begun; the launcher must end the run), then the same command again
# (auto-resume from ckpt_epoch_0.pth); and resumed from that checkpoint on 1 GPU, which makes GPUS times the
# updates per epoch and must continue its own learning-rate schedule at epoch 1. Prints the comparison.
train_resume() {
  local gpus=$1 steps=${TRAIN_RESUME_STEPS:-40} batch=${TRAIN_BATCH:-128}
  local dir=$OUT/train/resume last=$(( $1 - 1 )) data launcher pid run_dir
  data=$(train_data $(( steps * batch * gpus ))) || return 1
  rm -rf "${dir:?}"
  mkdir -p "$dir"
  local args=(classification/main.py --cfg "$TRAIN_CONFIG" --data-path "$data" --batch-size "$batch" --model_ema
              --opts TRAIN.EPOCHS 2 TRAIN.WARMUP_EPOCHS 1 PRINT_FREQ 10 DATA.NUM_WORKERS "$(loader_workers "$gpus")")
  local torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus")
  echo "--- resume: $gpus GPUs, 2 epochs of $steps steps of $batch images per GPU; kill -9 of rank $last in epoch 1"
  "${torchrun[@]}" "${args[@]}" --output "$dir/uninterrupted" >"$dir/uninterrupted.log" 2>&1 ||
    { tail -n 20 "$dir/uninterrupted.log"; return 1; }
  "${torchrun[@]}" "${args[@]}" --output "$dir/killed" >"$dir/killed.log" 2>&1 &
  launcher=$!
  until grep -qs "Train: \[1/2\]" "$dir"/killed/*/default/log_rank$last.txt; do
    kill -0 "$launcher" 2>/dev/null || { tail -n 20 "$dir/killed.log"; echo "the run ended before epoch 1"; return 1; }
    sleep 0.2
  done
  pid=$(grep -o "rank $last/$gpus, local rank $last, pid [0-9]*" "$dir"/killed/*/default/log_rank$last.txt)
  kill -9 "${pid##* }"
  if wait "$launcher"; then
    echo "the launcher exited with status 0 after rank $last was killed"
    return 1
  fi
  run_dir=$(cd "$dir"/killed/*/default && pwd)
  ls "$run_dir" | grep ckpt_epoch_ | sed 's/^/after the kill: /'
  mkdir -p "$dir/one_gpu/${run_dir#"$dir/killed/"}"
  cp "$run_dir/ckpt_epoch_0.pth" "$dir/one_gpu/${run_dir#"$dir/killed/"}/"
  "${torchrun[@]}" "${args[@]}" --output "$dir/killed" >"$dir/resumed.log" 2>&1 ||
    { tail -n 20 "$dir/resumed.log"; return 1; }
  "$PY" "${args[@]}" --output "$dir/one_gpu" >"$dir/one_gpu.log" 2>&1 || { tail -n 20 "$dir/one_gpu.log"; return 1; }
  "$PY" benchmarks/resume_check.py "$dir" "${args[@]}"
}

part_train() {
  local gpus=${TRAIN_GPUS:-1} status=0 runs=(one_gpu)
  "$PY" -c "import sys, torch; n = torch.cuda.device_count()
sys.exit(0 if n >= $gpus else f'TRAIN_GPUS=$gpus but {n} GPU(s) visible')" || return 1
  train_run one_gpu 1 || status=1
  if [ "$gpus" -gt 1 ]; then
    train_run "gpus_$gpus" "$gpus" || status=1
    runs+=("gpus_$gpus")
  fi
  "$PY" - "$OUT/train" "${runs[@]}" <<'EOF' || status=1
import glob
import re
import statistics
import sys

out, runs = sys.argv[1], sys.argv[2:]
print("| run | GPUs | train img/s (median of 20-step windows) | non-finite losses | skipped updates | peak mem MB |"
      " finished |")
print("| --- | --- | --- | --- | --- | --- | --- |")
per_gpu = {}
for run in runs:
    logs = glob.glob(f"{out}/{run}/*/*/log_rank0.txt")
    if not logs:
        print(f"| {run} | no log | | | | | |")
        continue
    log = open(logs[0]).read()
    world = int(re.search(r"rank 0/(\d+)", log).group(1))
    windows = [float(x) for x in re.findall(r"Train: \[0/1\].*\t([\d.]+) img/s", log)]
    img_s = statistics.median(windows[2:] or windows) if windows else float("nan")  # the first two warm up
    memory = (re.findall(r"mem (\d+)MB", log) or ["?"])[-1]
    per_gpu[world] = img_s / world
    print(f"| {run} | {world} | {img_s:.1f} | {log.count('non-finite loss')} | {log.count('update skipped')} "
          f"| {memory} | {'Final validation accuracy' in log} |")
if len(per_gpu) > 1:
    gpus = max(per_gpu)
    print(f"scaling efficiency ({gpus} GPUs against 1): {per_gpu[gpus] / per_gpu[1]:.3f}")
print("skipped updates under fp16 are GradScaler overflows (expected in the first steps); non-finite losses "
      "should be 0")
EOF
  return $status
}

# mm_train CONFIG NAME GPUS ITERS: trains CONFIG for ITERS iterations (evaluations every third, one checkpoint at
# the end) with train.py on one GPU or dist_train.sh on GPUS, work dir and log $OUT/mm/NAME[.log].
mm_train() {
  local config=$1 name=$2 gpus=$3 iters=$4 start=$SECONDS
  local options=(--work-dir "$OUT/mm/$name" --cfg-options "train_cfg.max_iters=$iters"
                 "train_cfg.val_interval=$(( iters / 3 > 0 ? iters / 3 : 1 ))" "default_hooks.checkpoint.interval=$iters")
  if [ "$gpus" -gt 1 ]; then
    PYTHON=$PY bash "${config%%/*}/tools/dist_train.sh" "$config" "$gpus" "${options[@]}"
  else
    "$PY" "${config%%/*}/tools/train.py" "$config" "${options[@]}"
  fi >"$OUT/mm/$name.log" 2>&1
  local status=$?
  [ $status -eq 0 ] || { tail -n 30 "$OUT/mm/$name.log"; echo "--- $name failed"; }
  echo "--- $name: $iters iterations on $gpus GPU(s) in $(( SECONDS - start )) s, log $OUT/mm/$name.log"
  return $status
}

# mm_test CONFIG CHECKPOINT GPUS NAME [test.py args]: evaluates CHECKPOINT with test.py on one GPU or dist_test.sh
# on GPUS, log $OUT/mm/NAME.log.
mm_test() {
  local config=$1 checkpoint=$2 gpus=$3 name=$4
  shift 4
  if [ "$gpus" -gt 1 ]; then
    PYTHON=$PY bash "${config%%/*}/tools/dist_test.sh" "$config" "$checkpoint" "$gpus" --work-dir "$OUT/mm/$name" "$@"
  else
    "$PY" "${config%%/*}/tools/test.py" "$config" "$checkpoint" --work-dir "$OUT/mm/$name" "$@"
  fi >"$OUT/mm/$name.log" 2>&1 || { tail -n 30 "$OUT/mm/$name.log"; echo "--- $name failed"; return 1; }
}

part_mm() {
  local dir=$OUT/mm iters=${MM_ITERS:-300} gpus=${MM_GPUS:-1} status=0 config name n runs=() tests=()
  local configs=(detection/configs/demo/mask_rcnn_vssm_fpn_synthetic_tiny.py
                 detection/configs/demo/mask_rcnn_swin_fpn_synthetic_tiny.py
                 segmentation/configs/demo/upernet_vssm_synthetic_tiny.py
                 segmentation/configs/demo/upernet_swin_synthetic_tiny.py)
  local vmamba_configs=("${configs[0]}" "${configs[2]}")
  "$PY" -c "import sys, torch; n = torch.cuda.device_count()
sys.exit(0 if n >= $gpus else f'MM_GPUS=$gpus but {n} GPU(s) visible')" || return 1
  "$PY" -c 'import mmcv, mmdet, mmseg; print("mmcv", mmcv.__version__, "| mmdet", mmdet.__version__,
    "| mmseg", mmseg.__version__)' || return 1
  export VMAMBA_DEMO_DATA=$dir/data
  if [ ! -f "$VMAMBA_DEMO_DATA/coco/annotations/instances_val.json" ]; then
    "$PY" -m vmamba_mm.synthetic "$VMAMBA_DEMO_DATA" --size 512 --num-train 400 --num-val 50 || return 1
  fi
  for config in "${configs[@]}"; do
    name=$(basename "$config" .py)
    mm_train "$config" "$name" 1 "$iters" || status=1
    runs+=("$name:1")
  done
  if [ "$gpus" -gt 1 ]; then
    # the same training on GPUS processes, then the 1-GPU checkpoint evaluated on 1 GPU and on GPUS processes
    # (segmentation with --tta): the two evaluations should agree
    for config in "${vmamba_configs[@]}"; do
      name=$(basename "$config" .py)
      mm_train "$config" "${name}_gpus_$gpus" "$gpus" "$iters" || status=1
      runs+=("${name}_gpus_$gpus:$gpus")
      local tta=()
      [ "${config%%/*}" = segmentation ] && tta=(--tta)
      for n in 1 "$gpus"; do
        mm_test "$config" "$dir/$name/iter_$iters.pth" "$n" "${name}_test_gpus_$n" "${tta[@]}" || status=1
        tests+=("${name}_test_gpus_$n:$n")
      done
    done
  fi
  "$PY" - "$dir" "${runs[@]}" -- "${tests[@]}" <<'EOF' || status=1
import glob
import json
import re
import statistics
import sys

out, entries = sys.argv[1], sys.argv[2:]
runs, tests = entries[:entries.index("--")], entries[entries.index("--") + 1:]


def metric_keys(name):
    return ("coco/bbox_mAP", "coco/segm_mAP") if name.startswith("mask_rcnn") else ("mIoU",)


print("| run | GPUs | metric | at each evaluation | train loss (first -> last log) | train img/s |")
print("| --- | --- | --- | --- | --- | --- |")
for run in runs:
    name, gpus = run.rsplit(":", 1)
    files = sorted(glob.glob(f"{out}/{name}/*/vis_data/scalars.json"))
    if not files:
        print(f"| {name} | {gpus} | no log | | | |")
        continue
    entries = [json.loads(line) for line in open(files[-1])]
    train = [e for e in entries if "loss" in e and "time" in e]
    times = [e["time"] for e in train[1:]] or [e["time"] for e in train]  # the first window warms up
    # the demo configs' 2 images per GPU and iteration
    img_s = 2 * int(gpus) / statistics.median(times) if times else float("nan")
    keys = metric_keys(name)
    evaluations = " -> ".join("/".join(f"{e[k]:.3f}" if k.startswith("coco") else f"{e[k]:.2f}" for k in keys)
                              for e in entries if keys[0] in e)
    loss = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else ""
    metric = "/".join(key.split("/")[-1] for key in keys)
    print(f"| {name} | {gpus} | {metric} | {evaluations} | {loss} | {img_s:.1f} |")
if tests:
    print("\n| 1-GPU checkpoint evaluated | GPUs | metrics of test.py / dist_test.sh |")
    print("| --- | --- | --- |")
for test in tests:
    name, gpus = test.rsplit(":", 1)
    finals = re.findall(r"Iter\(test\) \[(\d+)/\1\]\s+(.*)", open(f"{out}/{name}.log").read())
    # the overall metrics: COCO's AP by object size left out
    metrics = {k: v for k, v in re.findall(r"(\S+): (-?[\d.]+)", finals[-1][1] if finals else "")
               if "time" not in k and not re.search(r"_mAP_(75|s|m|l)$", k)}
    print(f"| {name.rsplit('_test_', 1)[0]} | {gpus} | "
          + (", ".join(f"{k} {v}" for k, v in metrics.items()) or "no result") + " |")
EOF
  return $status
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
selected=()
for part in "${parts[@]}"; do
  case " all ${PARTS[*]} " in
    *" $part "*) ;;
    *) echo "unknown part '$part': one of all ${PARTS[*]}" >&2; exit 2 ;;
  esac
  if [ "$part" = all ]; then selected+=("${PARTS[@]}"); else selected+=("$part"); fi
done

environment | tee "$OUT/environment.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
failed=()
for part in "${selected[@]}"; do
  mkdir -p "$OUT/$part"
  echo "=== $part"
  start=$SECONDS
  "part_$part" || failed+=("$part")
  echo "=== $part: $(( SECONDS - start )) s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (logs under $OUT)"
  exit 1
fi
echo "all passed (logs under $OUT)"
