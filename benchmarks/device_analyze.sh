#!/usr/bin/env bash
# Throughput table and scale-up study (issue 7) on one GPU, with analyze/tp.py.
#
#   bash benchmarks/device_analyze.sh OUT_DIR [table|scaleup|all]      (default: all)
#
# table:   VMamba-T/S/B beside Swin-T, ConvNeXt-T and MambaOut-T at 224 px, batch 128, the paper's
#          protocol (50 warm-up + 30 timed): fp32 and AMP inference, AMP training -> OUT_DIR/table/
# scaleup: the same families at 224..1024 px, batch 32, fp32 and AMP inference (the modes of SPEC
#          section 7's scale-up anchors), 20 warm-up + 30 timed -> OUT_DIR/scaleup/ with scaleup.png
# The tables are printed again at the end. Each part fits in one 10-minute device command.
#
# Environment: PYTHON (default python3); TABLE_MODELS / SCALEUP_MODELS / SIZES to override the lists;
# ALLOW_TORCH_SCAN=1 to measure even when the selective-scan CUDA kernel is not built (the numbers
# are then those of the pure-torch scan, not comparable with the anchors).
set -euo pipefail

OUT="${1:?usage: bash benchmarks/device_analyze.sh OUT_DIR [table|scaleup|all]}"
PART="${2:-all}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TABLE_MODELS="${TABLE_MODELS:-vmamba_tiny_s1l8 vmamba_small_s2l15 vmamba_base_s2l15 swin_tiny_patch4_window7_224 convnext_tiny mambaout_tiny}"
SCALEUP_MODELS="${SCALEUP_MODELS:-vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 convnext_tiny mambaout_tiny}"
SIZES="${SIZES:-224 288 384 512 640 768 1024}"

case "$PART" in table|scaleup|all) ;; *) echo "unknown part '$PART': table, scaleup or all" >&2; exit 2 ;; esac

# Without `pip install -e .` the project and the kernel package are found from the source tree;
# an installed selective_scan (with its built extension) is left in front.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import selective_scan" 2>/dev/null; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/kernels/selective_scan"
fi
cd "$ROOT"
mkdir -p "$OUT"

"$PY" - <<'PYEOF'
import os, sys, torch, timm, selective_scan
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}")
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("selective_scan:", selective_scan.build_info())
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible")
if not selective_scan.cuda_available() and os.environ.get("ALLOW_TORCH_SCAN") != "1":
    sys.exit("the selective-scan CUDA kernel is not available (set ALLOW_TORCH_SCAN=1 to measure anyway)")
PYEOF

if [ "$PART" = table ] || [ "$PART" = all ]; then
  # shellcheck disable=SC2086  (the model lists are meant to split into words)
  "$PY" analyze/tp.py --model $TABLE_MODELS --batch-size 128 --sizes 224 --warmup 50 --iters 30 \
    --device cuda --out "$OUT/table"
fi
if [ "$PART" = scaleup ] || [ "$PART" = all ]; then
  # shellcheck disable=SC2086
  "$PY" analyze/tp.py --model $SCALEUP_MODELS --batch-size 32 --sizes $SIZES --warmup 20 --iters 30 \
    --modes infer_fp32 infer_amp --device cuda --out "$OUT/scaleup"
fi

echo
echo "=== summary (img/s; peak memory in GiB; FLOPs per image)"
"$PY" - "$OUT" <<'PYEOF'
import csv, sys
from pathlib import Path
from analyze.common import format_table

def number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

for part in ("table", "scaleup"):
    path = Path(sys.argv[1]) / part / "tp.csv"
    if path.is_file():
        with open(path) as handle:
            reader = csv.DictReader(handle)
            rows = [{key: number(value) for key, value in row.items()} for row in reader]
        print(f"\n{part} ({path}):")
        print(format_table(rows, [c for c in reader.fieldnames if not c.endswith("_batch")]))
PYEOF
