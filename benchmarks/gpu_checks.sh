#!/usr/bin/env bash
# The acceptance run for a GPU machine (benchmarks/gpu_checks.py): every CUDA-only path checked, the layer and
# trainer figures measured, one summary table; exit 1 on any failure. Logs and summary.json go to $OUT.
#
#   bash benchmarks/gpu_checks.sh                 # ~6-8 min on one H100/H200
#   bash benchmarks/gpu_checks.sh --dry-run       # the checks it would run
#   G2_DATA_DIR=/path/to/data bash benchmarks/gpu_checks.sh --only layers,ptb-medium
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
exec "${PYTHON:-python3}" benchmarks/gpu_checks.py --out "$out" "$@"
