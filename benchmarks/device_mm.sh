#!/usr/bin/env bash
# Mask R-CNN and UperNet on the GPU box: VMamba-T vs Swin-T backbones, same data/pipeline/schedule.
#
# Generates the synthetic shapes (detection/synthetic.py, 512 px), trains each of
#   detection/configs/demo/mask_rcnn_{vssm,swin}_fpn_synthetic_tiny.py
#   segmentation/configs/demo/upernet_{vssm,swin}_synthetic_tiny.py
# for ITERS iterations from scratch (batch 2, one GPU), evaluating every ITERS/3 iterations with the
# real CocoMetric / IoUMetric, and prints a table last: box/mask AP or mIoU at each evaluation
# (should rise) and the training speed in img/s (median of the logged iteration times after the
# first logging window). Run from the repository root:
#   bash benchmarks/device_mm.sh                 # ITERS=300 OUT=/tmp/device_mm AMP=0
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
ITERS=${ITERS:-300}
OUT=${OUT:-/tmp/device_mm}
VAL=$(( ITERS / 3 ))
# the configs' custom_imports need the project importable; use the checkout if it is not installed
if ! "$PY" -c 'import detection, segmentation' 2>/dev/null; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import torch, mmcv, mmdet, mmseg; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  "| mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
"$PY" -c 'import selective_scan as s; print(s.build_info())' || echo "selective_scan: not importable"

export VMAMBA_DEMO_DATA=$OUT/data
[ -f "$VMAMBA_DEMO_DATA/coco/annotations/instances_val.json" ] ||
  "$PY" -m detection.synthetic "$VMAMBA_DEMO_DATA" --size 512 --num-train 400 --num-val 50

AMP_ARGS=()
[ "${AMP:-0}" = 1 ] && AMP_ARGS=(--amp)
RUNS="detection/configs/demo/mask_rcnn_vssm_fpn_synthetic_tiny.py
detection/configs/demo/mask_rcnn_swin_fpn_synthetic_tiny.py
segmentation/configs/demo/upernet_vssm_synthetic_tiny.py
segmentation/configs/demo/upernet_swin_synthetic_tiny.py"
for config in $RUNS; do
  task=${config%%/*}
  name=$(basename "$config" .py)
  echo "=== $name ($ITERS iterations)"
  t0=$(date +%s)
  "$PY" "$task/tools/train.py" "$config" --work-dir "$OUT/$name" "${AMP_ARGS[@]}" --cfg-options \
      "train_cfg.max_iters=$ITERS" "train_cfg.val_interval=$VAL" \
      "default_hooks.checkpoint.interval=$ITERS" > "$OUT/$name.log" 2>&1 ||
    { tail -40 "$OUT/$name.log"; echo "FAILED: $name"; }
  echo "    $(( $(date +%s) - t0 )) s, log $OUT/$name.log"
done

"$PY" - "$OUT" $RUNS <<'EOF'
import glob, json, os, statistics, sys
out, configs = sys.argv[1], sys.argv[2:]
rows = []
for config in configs:
    name = os.path.basename(config)[:-3]
    files = sorted(glob.glob(f'{out}/{name}/*/vis_data/scalars.json'))
    if not files:
        rows.append((name, 'no log', '', '', ''))
        continue
    entries = [json.loads(line) for line in open(files[-1])]
    train = [e for e in entries if 'loss' in e and 'time' in e]
    times = [e['time'] for e in train[1:]] or [e['time'] for e in train]
    img_s = 2 / statistics.median(times) if times else float('nan')
    keys = ('coco/bbox_mAP', 'coco/segm_mAP') if name.startswith('mask_rcnn') else ('mIoU',)
    evals = [e for e in entries if keys[0] in e]
    metric = ' -> '.join('/'.join(f'{e[k]:.3f}' if k.startswith('coco') else f'{e[k]:.2f}' for k in keys)
                         for e in evals)
    loss = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else ''
    rows.append((name, '/'.join(k.split('/')[-1] for k in keys), metric, loss, f'{img_s:.1f}'))
print('\n| run | metric | at each evaluation | train loss (first -> last log) | train img/s |')
print('| --- | --- | --- | --- | --- |')
for row in rows:
    print('| ' + ' | '.join(row) + ' |')
EOF
