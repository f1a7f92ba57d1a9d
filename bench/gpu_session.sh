#!/usr/bin/env bash
# Every GPU check in one command, for a session that is lent a GPU machine (no install step: that
# machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu-session
#
# Writes OUT_DIR/{gpu.txt, pytest-gpu.txt, bench-gpu.txt, bench-gpu.json}: the GPU, the CUDA-path
# tests (tests/test_gpu.py) and bench.gpu's dist_train vs hand-written tokens/s and MFU (GPT-2 small,
# bf16, torch.compile, flash SDPA). About 6-8 minutes on one H100/H200. Exit status: 0 when both
# the tests and the benchmark passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    2>&1 | tee -a "$out/gpu.txt"

"$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 300 tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"
tests=$?
"$python" -m bench.gpu --json "$out/bench-gpu.json" --timeout 300 2>&1 | tee "$out/bench-gpu.txt"
bench=$?
echo "tests exit $tests, bench.gpu exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
