#!/usr/bin/env bash
# Every GPU check in one or two commands, for a session that is lent a GPU machine (no install step:
# that machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR] [all|mfu|tests]   # OUT_DIR defaults to $OUT, else ./gpu-session
#
# Each stage runs only while time is left: no variant starts after GPU_SESSION_VARIANTS_S (default
# 390 s), no other stage after GPU_SESSION_BUDGET_S (default 470 s), and a running stage is stopped
# at GPU_SESSION_LIMIT_S (default 540 s). Stages, in order:
#   gpu.txt              the GPU, driver, torch and CUDA versions
# mfu (the benchmark first: it is what issue 7 still needs a GPU for):
#   bench-gpu.{txt,json} bench.gpu: dist_train vs hand-written tokens/s and MFU (GPT-2 small,
#                        micro-batch 32, bf16, torch.compile, flash SDPA), one pair after a warm-up pair
#   variant-*.{txt,json} dist_train alone with one change each, one run, the likeliest gain per
#                        second first: cuDNN attention (train.sdpa_backend=cudnn), 2 micro-steps per
#                        optimizer step, CUDA graphs (reduce-overhead), FSDP2 (bf16 parameters, fp32
#                        master weights), micro-batch 64, Inductor's coordinate-descent tuning, tuned
#                        kernels (max-autotune-no-cudagraphs: minutes of compiling)
#   stacked.{txt,json}   dist_train with every change that beat the baseline, stacked (bench.gpu --stack)
#   profile.txt          bench.gpu_profile's GPU time per kernel kind at micro-batch 32
# tests:
#   pytest-gpu.txt       the CUDA-path tests (tests/test_gpu.py)
# BENCH_GPU_ARGS go to every bench.gpu and bench.gpu_profile command: "--tiny --device cpu" smoke-tests
# this script on a machine without a GPU.
# `mfu` takes about 8-9 minutes on one H100, `tests` about 2: with one 15-minute device budget run
# `mfu` (timeout_s 560), then `tests` on the still-warm machine if time is left.
# Exit status: 0 when what ran passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
what=${2:-all}
variants_until=${GPU_SESSION_VARIANTS_S:-390}
budget=${GPU_SESSION_BUDGET_S:-470}
limit=${GPU_SESSION_LIMIT_S:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
read -r -a extra <<<"${BENCH_GPU_ARGS:-}"
status=0

# stage NAME [UNTIL] COMMAND...: run COMMAND into $out/NAME.txt unless UNTIL seconds (default: the
# budget) have passed, stopped at the limit
stage() {
    local name=$1 until=$budget
    shift
    if [[ $1 =~ ^[0-9]+$ ]]; then
        until=$1
        shift
    fi
    if [ "$SECONDS" -ge "$until" ] || [ "$SECONDS" -ge "$limit" ]; then
        echo "$name skipped: ${SECONDS}s spent, past ${until}s" | tee "$out/$name.txt"
        return 0
    fi
    echo "== $name (at ${SECONDS}s): $*"
    timeout "$((limit - SECONDS))" "$@" 2>&1 | tee "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    2>&1 | tee -a "$out/gpu.txt"

if [ "$what" != tests ]; then
    stage bench-gpu "$python" -m bench.gpu "${extra[@]}" --repeats 1 --json "$out/bench-gpu.json" --timeout 240 ||
        status=1
    one=(-m bench.gpu "${extra[@]}" --dist-train-only --repeats 1 --no-warmup-pair --timeout 240)  # step time: compiling stays out
    variant() {  # variant NAME OPTIONS...
        local name=$1
        shift
        stage "variant-$name" "$variants_until" "$python" "${one[@]}" "$@" --json "$out/variant-$name.json"
    }
    variant cudnn --sdpa-backend cudnn
    variant accum2 --grad-accum 2
    variant reduce-overhead --compile-mode reduce-overhead
    variant fsdp --strategy fsdp
    variant mb64 --micro-batch 64
    variant coordinate-descent --coordinate-descent
    variant max-autotune-no-cudagraphs --compile-mode max-autotune-no-cudagraphs
    stage stacked "$python" "${one[@]}" --stack "$out/bench-gpu.json" "$out"/variant-*.json --json "$out/stacked.json"
    stage profile "$python" -m bench.gpu_profile "${extra[@]}" --micro-batch 32
fi
if [ "$what" != mfu ]; then
    stage pytest-gpu "$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_gpu.py || status=1
fi
echo "gpu_session $what: exit $status, ${SECONDS}s"
exit "$status"
