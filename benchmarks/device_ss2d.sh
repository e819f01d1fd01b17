#!/usr/bin/env bash
# On the GPU machine: build the selective-scan extension (with the fused SS2D kernels) for the card, run the
# fused SS2D tests (CUDA and CPU) and the model's CUDA test, then benchmark fused vs unfused SS2D.
# Logs and JSON go to $OUT (or ./device_ss2d_out). tests/test_models.py needs yacs, which the GPU image lacks:
# carry .whl/ (benchmarks/stage_device_wheels.sh). SS2D_NCU=1 adds an Nsight Compute profile of the
# stage-1 kernels.
#   bash benchmarks/device_ss2d.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_ss2d_out}"
mkdir -p "$OUT"
source benchmarks/device_setup.sh
python3 -c "import selective_scan; from selective_scan import ss2d; print(selective_scan.build_info(), 'fused:', ss2d.fused_available())"

start=$(date +%s)
python3 -m pytest -q -p no:cacheprovider --tb=short --maxfail=20 -k "${1:-}" \
  tests/test_ss2d_fused.py tests/test_models.py::test_vmamba_tiny_on_cuda_matches_cpu_and_trains_under_amp \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"
echo "tests: $(( $(date +%s) - start )) s, rc=$tests_rc"

if [ "$tests_rc" != 0 ] && command -v compute-sanitizer >/dev/null; then
  # a small fused forward+backward under memcheck, to locate a bad access
  compute-sanitizer --tool memcheck --print-limit 5 python3 -c "
import torch; from selective_scan import ss2d
for d, h, w, r in [(37, 5, 7, 6), (37, 9, 11, 12), (40, 3, 29, 24)]:
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(4, r + 2, d) * d ** -0.5, torch.randn(4, d, r) * r ** -0.5, torch.rand(4, d) - 4,
         torch.rand(4 * d, 1), torch.randn(4 * d)]
    p = [t.cuda().requires_grad_() for t in p]
    x = torch.randn(2, d, h, w, device='cuda', requires_grad=True)
    y = ss2d.ss2d_core(x, *p, backend='fused')
    y.sum().backward()
torch.cuda.synchronize(); print('memcheck run done')
" 2>&1 | tail -30 | tee "$OUT/memcheck.log"
fi

python3 benchmarks/bench_ss2d.py --json "$OUT/bench_ss2d.json" ${SS2D_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc"

if [ -n "${SS2D_NCU:-}" ] && command -v ncu >/dev/null; then
  # kernel metrics of one fused forward+backward at stage 1
  timeout 150 ncu --kernel-name regex:ss2d_ --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/profile_ss2d.py >"$OUT/ncu.log" 2>&1
  grep -E "ss2d_|Duration|Throughput|Achieved Occupancy|Registers Per|Issued Warp|No Eligible|Warp Cycles Per Issued|L2 Hit" \
    "$OUT/ncu.log" | head -60
fi
