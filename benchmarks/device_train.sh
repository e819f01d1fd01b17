#!/usr/bin/env bash
# Training throughput of VMamba-T (vmambav2v_tiny_224 recipe: AMP fp16, Mixup, RandAugment, EMA) on the
# GPU box, with classification/main.py exactly as users run it.
#
#   bash benchmarks/device_train.sh                # 1 GPU: img/s + fp16 stability (no non-finite loss)
#   bash benchmarks/device_train.sh --gpus 2       # also 2 GPUs through torchrun + scaling efficiency
#
# Options: --gpus N (1 or 2), --steps S (steps per run, default 400 for 1 GPU, 300 for N GPUs),
# --batch B (per GPU, default 128), --workers W (loader workers per GPU, default 10),
# --cfg FILE (default: the VMamba-T config), --out DIR (default benchmarks/out/device_train).
#
# Data: the built-in digits written once as 224 px JPEGs, then linked as many times as the run needs
# so that a run is one epoch of exactly S steps (no epoch-boundary validation or checkpoint inside the
# timing). Throughput is the median of the logged per-window img/s (PRINT_FREQ 20), skipping the
# first two windows (CUDA/cuDNN warm-up). A summary table is printed last.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=1
STEPS=""
BATCH=128
WORKERS=10
CFG=classification/configs/vssm/vmambav2v_tiny_224.yaml
OUT=benchmarks/out/device_train
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --cfg) CFG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -f "$CFG" ] || { echo "config $CFG not found" >&2; exit 2; }
mkdir -p "$OUT"
"$PYTHON" -c "import torch, sys; n = torch.cuda.device_count(); sys.exit(0 if n >= $GPUS else f'need $GPUS GPU(s), found {n}')"
"$PYTHON" -c "import selective_scan; print('selective_scan:', selective_scan.build_info())" || true

# Writes $OUT/data_<images>/{train,val}/<digit>/*.jpg: 224 px JPEGs of the digits, train linked
# round-robin up to <images> files.
make_data() {
  local images=$1 root="$OUT/data_$1"
  if [ ! -d "$root/train" ]; then
    "$PYTHON" - "$root" "$images" "$OUT/digits224" <<'EOF'
import os, sys
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
for i in range(images):
    source = sources[i % len(sources)]
    link = staging / "train" / source.parent.name / f"{i:07d}.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), link)
os.symlink((jpegs / "val").resolve(), staging / "val")
os.rename(staging, root)
EOF
  fi
  echo "$root"
}

# run_training NAME GPUS STEPS: one epoch of STEPS steps on GPUS processes, log in $OUT/NAME.
run_training() {
  local name=$1 gpus=$2 steps=$3
  local data launcher=("$PYTHON")
  data=$(make_data $((steps * BATCH * gpus)))
  rm -rf "${OUT:?}/$name"
  if [ "$gpus" -gt 1 ]; then
    launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$gpus")
  fi
  echo "=== $name: $gpus GPU(s), $steps steps of $BATCH per GPU"
  "${launcher[@]}" classification/main.py --cfg "$CFG" --data-path "$data" --batch-size "$BATCH" \
    --output "$OUT/$name" --model_ema --opts TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 20 \
    DATA.NUM_WORKERS "$WORKERS" TRAIN.AUTO_RESUME False 2>&1 | tail -n 25
}

declare -a RUNS=()
run_training one_gpu 1 "${STEPS:-400}"
RUNS+=("one_gpu")
if [ "$GPUS" -gt 1 ]; then
  run_training "gpus_$GPUS" "$GPUS" "${STEPS:-300}"
  RUNS+=("gpus_$GPUS")
fi

"$PYTHON" - "$OUT" "$BATCH" "${RUNS[@]}" <<'EOF'
import glob, re, statistics, sys
import torch

out, batch, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows, per_gpu = [], {}
for run in runs:
    log = open(glob.glob(f"{out}/{run}/*/*/log_rank0.txt")[0]).read()
    world = int(re.search(r"rank 0/(\d+)", log).group(1))
    windows = [float(x) for x in re.findall(r"Train: \[0/1\].*\t([\d.]+) img/s", log)]
    throughput = statistics.median(windows[2:] or windows)
    nonfinite_losses = log.count("non-finite loss")
    skipped = log.count("update skipped")
    memory = re.findall(r"mem (\d+)MB", log)[-1]
    finished = "Final validation accuracy" in log
    per_gpu[world] = throughput / world
    rows.append((run, world, throughput, nonfinite_losses, skipped, memory, finished))

print()
print(f"device: {torch.cuda.get_device_name(0)}, batch {batch} per GPU, AMP fp16, VMamba-T")
print("| run | GPUs | train img/s (median of windows) | non-finite losses | skipped updates | peak mem MB | finished |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for run, world, throughput, nonfinite_losses, skipped, memory, finished in rows:
    print(f"| {run} | {world} | {throughput:.1f} | {nonfinite_losses} | {skipped} | {memory} | {finished} |")
if len(per_gpu) > 1:
    gpus = max(per_gpu)
    print(f"scaling efficiency ({gpus} GPUs / ({gpus} x 1 GPU)): {per_gpu[gpus] / per_gpu[1]:.3f} (target >= 0.9)")
print("skipped updates under fp16 are GradScaler overflows (normal during the first steps); "
      "non-finite losses must be 0")
EOF
