#!/usr/bin/env bash
# Every GPU check in one command, for a session that is lent a GPU machine (no install step: that
# machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu-session
#
# In order, each stage only while time is left (GPU_SESSION_BUDGET_S, default 420 s: no stage
# starts after it; GPU_SESSION_LIMIT_S, default 540 s: a running stage is stopped there):
#   gpu.txt             the GPU, driver, torch and CUDA versions
#   pytest-gpu.txt      the CUDA-path tests (tests/test_gpu.py)
#   bench-gpu.{txt,json} bench.gpu: dist_train vs hand-written tokens/s and MFU (GPT-2 small,
#                       micro-batch 32, bf16, torch.compile, flash SDPA)
#   variant-*.{txt,json} the same with one change each, one pair: train.compile_mode
#                       reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, max-autotune,
#                       and micro-batch 64
#   profile.txt         bench.gpu_profile's GPU time per kernel kind at micro-batch 32
# About 8-9 minutes on one H100/H200. Exit status: 0 when the tests and the benchmark passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
budget=${GPU_SESSION_BUDGET_S:-420}
limit=${GPU_SESSION_LIMIT_S:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

# stage NAME COMMAND...: run COMMAND into $out/NAME.txt if the budget allows, stopped at the limit
stage() {
    local name=$1
    shift
    if [ "$SECONDS" -ge "$budget" ]; then
        echo "$name skipped: ${SECONDS}s spent of a ${budget}s budget" | tee "$out/$name.txt"
        return 0
    fi
    echo "== $name (at ${SECONDS}s): $*"
    timeout "$((limit - SECONDS))" "$@" 2>&1 | tee "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    2>&1 | tee -a "$out/gpu.txt"

stage pytest-gpu "$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_gpu.py
tests=$?
stage bench-gpu "$python" -m bench.gpu --json "$out/bench-gpu.json" --timeout 240
bench=$?
one_pair=(-m bench.gpu --repeats 1 --no-warmup-pair --timeout 240)  # step time only: compiling stays out of it
for mode in reduce-overhead max-autotune-no-cudagraphs max-autotune; do
    stage "variant-$mode" "$python" "${one_pair[@]}" --compile-mode "$mode" --json "$out/variant-$mode.json"
done
stage variant-mb64 "$python" "${one_pair[@]}" --micro-batch 64 --json "$out/variant-mb64.json"
stage profile "$python" -m bench.gpu_profile --micro-batch 32
echo "bench.gpu exit $bench, tests exit $tests, ${SECONDS}s"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
