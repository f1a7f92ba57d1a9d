#!/usr/bin/env bash
# Every GPU check in one command, for a session that is lent a GPU machine (no install step: that
# machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu-session
#
# Writes OUT_DIR/{gpu.txt, bench-gpu.txt, bench-gpu.json, pytest-gpu.txt} and, when the first steps
# left time (GPU_SESSION_BUDGET_S, default 330 s, not yet spent), profile.txt: the GPU, bench.gpu's
# dist_train vs hand-written tokens/s and MFU (GPT-2 small, micro-batch 32, bf16, torch.compile,
# flash SDPA), the CUDA-path tests (tests/test_gpu.py), then bench.gpu_profile's GPU time per kernel
# kind at micro-batch 32 and 16. About 6-8 minutes on one H100/H200. Exit status: 0 when the tests
# and the benchmark passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
budget=${GPU_SESSION_BUDGET_S:-330}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    2>&1 | tee -a "$out/gpu.txt"

"$python" -m bench.gpu --json "$out/bench-gpu.json" --timeout 240 2>&1 | tee "$out/bench-gpu.txt"
bench=$?
"$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"
tests=$?
for micro_batch in 32 16; do  # the compile caches are warm by now
    if [ "$SECONDS" -lt "$budget" ]; then
        timeout 90 "$python" -m bench.gpu_profile --micro-batch "$micro_batch" 2>&1 | tee -a "$out/profile.txt"
    else
        echo "profile at micro-batch $micro_batch skipped: ${SECONDS}s spent of a ${budget}s budget"
    fi
done
echo "bench.gpu exit $bench, tests exit $tests, ${SECONDS}s"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
