#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the named benchmark cases. Results land in $OUT.
# Usage (device tool):  [TESTS=all|none|<-k expr>] [TEST_TIMEOUT=s] [BENCH_CASES="in_gpu offload"] [BENCH_ARGS=...]
#                        [ARGS_<case>=...] [TIMEOUT_<case>=s] bash benchmarks/run_device.sh
# ARGS_<case> (e.g. ARGS_offload="--cases mixtral-over-gpu --no-peer") replaces BENCH_ARGS for that case, and
# TIMEOUT_<case> bounds it, so one call can run several scripts with their own arguments inside its limit.
set -uo pipefail
OUT=${OUT:-./.out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-all}" != "none" ]; then
    if [ "${TESTS:-all}" = "all" ]; then sel=(); else sel=(-k "$TESTS"); fi
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -m gpu tests -p no:cacheprovider "${sel[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
for case in ${BENCH_CASES:-in_gpu offload}; do
    args_var="ARGS_$case" timeout_var="TIMEOUT_$case"
    timeout "${!timeout_var:-600}" python3 benchmarks/$case.py ${!args_var-${BENCH_ARGS:-}} 2>&1 \
        | tee "$OUT/bench_$case.log" | tail -12
done
