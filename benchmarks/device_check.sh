#!/usr/bin/env bash
# What the GPU machine has to prove, from a bare machine, in parts that each fit one device call:
#
#   bash benchmarks/device_check.sh PART [PART ...]        (run from the repository root there)
#
#   cuda     every `cuda`-marked test (kernel vs torch path, Triton cross-scan, models on CUDA)
#   scan     benchmarks/bench_scan.py (stage shapes, copy bandwidth)
#   table    analyze/tp.py table: VMamba-T/S/B beside Swin-T, ConvNeXt-T, MambaOut-T, batch 128
#   scaleup  analyze/tp.py scale-up study 224..1024 at batch 32, with its PNG
#   train    classification/main.py on one GPU (img/s, fp16 stability); train2: also 2 GPUs (torchrun)
#   mm       Mask R-CNN and UperNet, VMamba-T vs Swin-T, a few hundred iterations
#   model    benchmarks/bench_model.py: VMamba-T/S/B fused and unfused SS2D beside the timm baselines
#            (+ torch.compile of VMamba-T), then the stage-1 SS2D op alone
#   profile  benchmarks/profile_model.py: VMamba-T's kernel table under AMP, inference and training
#
# It installs the carried wheels and builds the selective-scan extension for the card first (device_setup.sh). Logs and results go under $OUT (default ./device_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
source benchmarks/device_setup.sh

status=0
run_part() {
  local part=$1
  case "$part" in
    cuda)    python3 -m pytest -q -p no:cacheprovider -m cuda --tb=short tests >"$OUT/cuda_tests.log" 2>&1
             local rc=$?; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -30; tail -1 "$OUT/cuda_tests.log"
             return $rc ;;
    scan)    python3 benchmarks/bench_scan.py --json "$OUT/bench_scan.json" 2>&1 | tee "$OUT/bench_scan.log" ;;
    table)   bash benchmarks/device_analyze.sh "$OUT/analyze" table 2>&1 | tail -n 30 ;;
    scaleup) bash benchmarks/device_analyze.sh "$OUT/analyze" scaleup 2>&1 | tail -n 30 ;;
    train)   bash benchmarks/device_train.sh --out "$OUT/train" --steps "${TRAIN_STEPS:-300}" 2>&1 | tail -n 12 ;;
    train2)  bash benchmarks/device_train.sh --gpus 2 --out "$OUT/train" --steps "${TRAIN_STEPS:-300}" 2>&1 | tail -n 12 ;;
    mm)      OUT="$OUT/mm" ITERS="${MM_ITERS:-300}" bash benchmarks/device_mm.sh 2>&1 | tail -n 12 ;;
    model)   python3 benchmarks/bench_model.py --compile --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log" ;;
    profile) python3 benchmarks/profile_model.py --modes infer_amp train_amp --cpu-top 15 2>&1 | tee "$OUT/profile.log" ;;
    *)       echo "unknown part '$part'"; return 2 ;;
  esac
}
for part in "$@"; do
  start=$(date +%s)
  echo "=== part $part"
  run_part "$part" || { status=1; echo "=== part $part FAILED"; }
  echo "=== part $part: $(( $(date +%s) - start )) s"
done
exit $status
