#!/usr/bin/env bash
# The GPU checks and figures of DESIGN §8 in one go, for one call on a lent GPU machine: the `gpu` tests
# (fused path and CUDA graphs against the reference, compiled kernels), the layer benchmark at the AWD,
# `medium` and NMT shapes, and the trainers' tokens/s. Outputs (JSON for the benchmarks) land in $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh              # ~10 min on an H100
#   G2_DATA_DIR=/path/to/data bash benchmarks/gpu_checks.sh
#
# The trainers' benchmark reads PTB and Multi30k from $G2_DATA_DIR (or ../shared/data); copy them beside the
# checkout first where the machine has no such folder. Every step runs even if an earlier one fails.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
python=${PYTHON:-python3}
status=0

step() {   # step NAME COMMAND...: run it, stdout to NAME.out, stderr to NAME.err, say how it ended
    local name=$1
    shift
    local start=$SECONDS
    "$@" >"$out/$name.out" 2>"$out/$name.err"
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - start)) s ($out/$name.out)"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$out/gpu.txt" 2>&1
step gpu-tests "$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_g2lstm_kernels.py tests/test_graphs.py
for shape in awd medium nmt; do
    step "bench-$shape" "$python" benchmarks/bench_g2lstm.py --device cuda --shape "$shape" --repeats 50 --json
done
step bench-trainers "$python" benchmarks/bench_trainers.py --device cuda --lm-preset medium --nmt-preset default \
    --batches 50 --json
exit $status
