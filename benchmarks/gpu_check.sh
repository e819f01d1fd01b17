#!/usr/bin/env bash
# Checks an installed VMamba on one GPU: the CUDA tests, then the measurements behind BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh [PART ...]        (default: all)
#
#   tests    every `cuda`-marked test (pytest -m cuda tests)
#   kernels  benchmarks/bench_scan.py; benchmarks/bench_ss2d.py at the 224 px stage shapes (ssm_ratio 1, then
#            stage 1 at ssm_ratio 2) and at the maps of a detection-size input (batch 2, 800x1333)
#   models   benchmarks/bench_model.py (224 px, batch 128), then benchmarks/host_cost.py
#   scaleup  analyze/tp.py: VMamba-T, Swin-T and ConvNeXt-T at batch 32, 224..1024 px (CSV and scaleup.png)
#   train    classification/main.py with VMamba-T's full recipe on generated ImageFolder data (img/s, fp16
#            stability: non-finite losses, skipped updates)
#   mm       Mask R-CNN and UperNet, VMamba-T against Swin-T backbones, trained from scratch on generated
#            shapes (box / mask AP and mIoU at each evaluation, img/s)
#   all      all of the above, in this order
# Each part fits in 10 minutes on one H100.
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
#   TRAIN_GPUS   1 (default), or N > 1 to add an N-GPU torchrun run and the scaling efficiency
#   MM_ITERS     iterations per detection / segmentation run (default 300; evaluation every third of them)
#
# The first line printed describes the machine (GPU, driver, torch, CUDA, the extension's build, the host's
# time per tiny CUDA op, which launch-bound models follow). Each part ends with its duration; the exit status
# is non-zero if any part failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
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
  return $status
}

part_models() {
  local dir=$OUT/models status=0
  step "$dir/bench_model.log" "$PY" benchmarks/bench_model.py --no-op --json "$dir/bench_model.json" || status=1
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

# train_run NAME GPUS: one epoch of TRAIN_STEPS steps on GPUS processes, output under $OUT/train/NAME.
train_run() {
  local name=$1 gpus=$2 data
  local steps=${TRAIN_STEPS:-300} batch=${TRAIN_BATCH:-128}
  local workers=$(( $(nproc) / gpus < 8 ? $(nproc) / gpus : 8 ))
  local launcher=("$PY")
  [ "$gpus" -gt 1 ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus")
  data=$(train_data $(( steps * batch * gpus ))) || return 1
  rm -rf "${OUT:?}/train/$name"
  echo "--- $name: $gpus GPU(s), $steps steps of $batch images per GPU"
  "${launcher[@]}" classification/main.py --cfg "${TRAIN_CFG:-classification/configs/vssm/vmambav2v_tiny_224.yaml}" \
    --data-path "$data" --batch-size "$batch" --output "$OUT/train/$name" --model_ema \
    --opts TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 20 DATA.NUM_WORKERS "$workers" TRAIN.AUTO_RESUME False \
    >"$OUT/train/$name.log" 2>&1
  local status=$?
  tail -n 4 "$OUT/train/$name.log"
  return $status
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

part_mm() {
  local dir=$OUT/mm iters=${MM_ITERS:-300} status=0 config name
  local configs=(detection/configs/demo/mask_rcnn_vssm_fpn_synthetic_tiny.py
                 detection/configs/demo/mask_rcnn_swin_fpn_synthetic_tiny.py
                 segmentation/configs/demo/upernet_vssm_synthetic_tiny.py
                 segmentation/configs/demo/upernet_swin_synthetic_tiny.py)
  "$PY" -c 'import mmcv, mmdet, mmseg; print("mmcv", mmcv.__version__, "| mmdet", mmdet.__version__,
    "| mmseg", mmseg.__version__)' || return 1
  export VMAMBA_DEMO_DATA=$dir/data
  if [ ! -f "$VMAMBA_DEMO_DATA/coco/annotations/instances_val.json" ]; then
    "$PY" -m vmamba_mm.synthetic "$VMAMBA_DEMO_DATA" --size 512 --num-train 400 --num-val 50 || return 1
  fi
  for config in "${configs[@]}"; do
    name=$(basename "$config" .py)
    local start=$SECONDS
    "$PY" "${config%%/*}/tools/train.py" "$config" --work-dir "$dir/$name" --cfg-options \
      "train_cfg.max_iters=$iters" "train_cfg.val_interval=$(( iters / 3 > 0 ? iters / 3 : 1 ))" \
      "default_hooks.checkpoint.interval=$iters" >"$dir/$name.log" 2>&1 ||
      { tail -n 30 "$dir/$name.log"; echo "--- $name failed"; status=1; }
    echo "--- $name: $iters iterations in $(( SECONDS - start )) s, log $dir/$name.log"
  done
  "$PY" - "$dir" "${configs[@]}" <<'EOF' || status=1
import glob
import json
import os
import statistics
import sys

out, configs = sys.argv[1], sys.argv[2:]
print("| run | metric | at each evaluation | train loss (first -> last log) | train img/s |")
print("| --- | --- | --- | --- | --- |")
for config in configs:
    name = os.path.basename(config)[:-3]
    files = sorted(glob.glob(f"{out}/{name}/*/vis_data/scalars.json"))
    if not files:
        print(f"| {name} | no log | | | |")
        continue
    entries = [json.loads(line) for line in open(files[-1])]
    train = [e for e in entries if "loss" in e and "time" in e]
    times = [e["time"] for e in train[1:]] or [e["time"] for e in train]  # the first window warms up
    img_s = 2 / statistics.median(times) if times else float("nan")  # the demo configs' 2 images per iteration
    keys = ("coco/bbox_mAP", "coco/segm_mAP") if name.startswith("mask_rcnn") else ("mIoU",)
    evaluations = " -> ".join("/".join(f"{e[k]:.3f}" if k.startswith("coco") else f"{e[k]:.2f}" for k in keys)
                              for e in entries if keys[0] in e)
    loss = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else ""
    metric = "/".join(key.split("/")[-1] for key in keys)
    print(f"| {name} | {metric} | {evaluations} | {loss} | {img_s:.1f} |")
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
