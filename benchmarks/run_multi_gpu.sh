#!/usr/bin/env bash
# One call on a 4-GPU machine (nvidia-h200-x4): the multi-GPU issues' runs, each bounded in time so that one
# running long cannot lose the others' results. Results land in $OUT/<run>/ (log.txt and the script's JSON).
#   1. ceilings (measured alone, cached for the rest) and `nvidia-smi topo -m`
#   2. Llama-2-70B bf16 at tp=4 on all four GPUs: batch 1 p128 g128, batch 32 p512 g32 (issue 11)
#   3. two pairs of GPUs at once:
#        GPUs 0,1: Llama-3-8B tp=2 decode against tp=1 (issue 9), then the hybrid engine with an FSDP2 trainer
#                  and inference_tp_size=2 (issue 10)
#        GPUs 2,3: the two-GPU test, tp=2 token parity (issues 9, 11), then offloaded tp=2 against tp=1 (issue 9)
#      (the pairs share the host: the offload run's PCIe traffic can slow the other pair's CPU side a little)
# Usage (device tool, kind nvidia-h200-x4, carry [".whl"] when it holds wheels the runs need):
#   [T70=s] [TPAIR=s] [SHAPES70=BxPxG,...] bash benchmarks/run_multi_gpu.sh
# Timings seen on the first call (2026-11-22): ceilings 18 s; the two 70B shapes needed more than 200 s together
# (the first finished inside them); Llama-3-8B tp=2 vs tp=1 decode ~100 s; the hybrid engine's first cycle ~11 s
# after that (inductor's on-disk cache warm from the 8B runs), 46 s for one of its three runs.
set -uo pipefail
ROOT=${OUT:-./.out}; mkdir -p "$ROOT"
source benchmarks/device_env.sh
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$ROOT/progress.txt"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$ROOT/gpu.txt"
nvidia-smi topo -m >> "$ROOT/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    >> "$ROOT/gpu.txt"
python3 -c "from zinfer.bench.ceilings import get_ceilings; import json; print(json.dumps(get_ceilings('cuda')))" \
    > "$ROOT/ceilings.json" 2>&1
stamp "ceilings done"

run() {  # run NAME SECONDS GPUS COMMAND...: one bounded step on the given GPUs; its JSON lands in $OUT/NAME
    local name=$1 secs=$2 gpus=$3; shift 3
    mkdir -p "$ROOT/$name"
    stamp "start $name"
    OUT=$ROOT/$name CUDA_VISIBLE_DEVICES=$gpus timeout "$secs" "$@" > "$ROOT/$name/log.txt" 2>&1
    stamp "end $name rc=$?"
}
TR=(python3 -m torch.distributed.run --nproc-per-node)

run tp4_70b "${T70:-260}" 0,1,2,3 "${TR[@]}" 4 --master-port 29500 \
    benchmarks/tp.py --cases decode --model llama-2-70b --shapes "${SHAPES70:-1x128x128,32x512x32}" --no-tp1 --repeats 2

pair_a() {
    run tp2_decode 170 0,1 "${TR[@]}" 2 --master-port 29510 benchmarks/tp.py --cases decode --repeats 2
    run hybrid_tp2 "$(( ${TPAIR:-300} - 170 ))" 0,1 "${TR[@]}" 2 --master-port 29520 \
        benchmarks/hybrid.py --inference-tp-size 2 --cycles 2 --no-tp1 --no-peer
}
pair_b() {
    run gpu_tests 90 2,3 python3 -m pytest -q -m gpu tests/test_tp_offload.py -p no:cacheprovider
    run tp2_parity 60 2,3 "${TR[@]}" 2 --master-port 29540 benchmarks/tp.py --cases parity
    run tp2_offload "$(( ${TPAIR:-300} - 150 ))" 2,3 "${TR[@]}" 2 --master-port 29550 \
        benchmarks/tp.py --cases offload --repeats 2
}
pair_a & pair_b & wait
stamp "all done"
