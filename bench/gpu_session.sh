#!/usr/bin/env bash
# Every GPU check in one or two commands, for a session that is lent a GPU machine (no install step:
# that machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR] [all|mfu|tests]   # OUT_DIR defaults to $OUT, else ./gpu-session
#
# OUT_DIR gets two files, refreshed after every stage (a device tool that returns a few files gets
# everything, also from a run stopped at its limit): session.log, the whole console output, and
# results.tar.gz, each stage's own output (NAME.txt, and NAME.json for the benchmark runs).
# Each stage runs only while time is left: no variant starts after GPU_SESSION_VARIANTS_S (default
# 390 s), no other stage after GPU_SESSION_BUDGET_S (default 470 s), and a running stage is stopped
# at GPU_SESSION_LIMIT_S (default 540 s). Stages, in order:
#   gpu                  the GPU, driver, torch and CUDA versions
# mfu (what issue 7 still needs a GPU for):
#   baseline             dist_train alone (GPT-2 small, micro-batch 32, bf16, torch.compile): tokens/s, MFU
#   variant-NAME         dist_train alone with one change each, in GPU_SESSION_VARIANTS order (default:
#                        the ones no GPU session has measured first): max-autotune-no-cudagraphs (tuned
#                        kernels: minutes of compiling), coordinate-descent (Inductor's block-size
#                        tuning), mb64 (micro-batch 64), accum2 (2 micro-steps per optimizer step); also
#                        defined: cudnn (cuDNN attention first), flash, reduce-overhead (CUDA graphs), fsdp
#   profile              bench.gpu_profile's GPU time per kernel kind at micro-batch 32
#   stacked              dist_train with every change that beat the baseline, stacked (bench.gpu --stack)
#   pair                 bench.gpu: dist_train vs hand-written side by side, one pair after a warm-up pair
# tests:
#   pytest-gpu           the CUDA-path tests (tests/test_gpu.py)
# BENCH_GPU_ARGS go to every bench.gpu and bench.gpu_profile command: "--tiny --device cpu" smoke-tests
# this script on a machine without a GPU (PYTHON names the interpreter, default python3).
# `mfu` takes 9 minutes on one H100, `tests` 3: with one 15-minute device budget run `mfu`
# (timeout_s 560), then `tests` on the still-warm machine.
# Exit status: 0 when what ran passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
what=${2:-all}
variants_until=${GPU_SESSION_VARIANTS_S:-390}
budget=${GPU_SESSION_BUDGET_S:-470}
limit=${GPU_SESSION_LIMIT_S:-540}
read -r -a variants <<<"${GPU_SESSION_VARIANTS:-max-autotune-no-cudagraphs coordinate-descent mb64 accum2}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
read -r -a extra <<<"${BENCH_GPU_ARGS:-}"
status=0

bundle() {
    tar -czf "$out/results.tar.gz.part" -C "$work" . && mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

# stage NAME [UNTIL] COMMAND...: run COMMAND into NAME.txt unless UNTIL seconds (default: the budget)
# have passed, stopped at the limit; a {json} in COMMAND becomes the path of NAME.json
stage() {
    local name=$1 until=$budget rc=0
    shift
    if [[ $1 =~ ^[0-9]+$ ]]; then
        until=$1
        shift
    fi
    [ "$until" -le "$limit" ] || until=$limit
    if [ "$SECONDS" -ge "$until" ]; then
        echo "$name skipped: ${SECONDS}s spent, past ${until}s" | tee "$work/$name.txt"
        bundle
        return 0
    fi
    local args=("${@//\{json\}/$work/$name.json}")
    echo "== $name (at ${SECONDS}s): ${args[*]}"
    timeout "$((limit - SECONDS))" "${args[@]}" 2>&1 | tee "$work/$name.txt" || rc=$?
    bundle
    return "$rc"
}

# the options of each variant: one change against the baseline
declare -A variant_args=(
    [max-autotune-no-cudagraphs]="--compile-mode max-autotune-no-cudagraphs"
    [coordinate-descent]="--coordinate-descent"
    [mb64]="--micro-batch 64"
    [accum2]="--grad-accum 2"
    [cudnn]="--sdpa-backend cudnn"
    [flash]="--sdpa-backend flash"
    [reduce-overhead]="--compile-mode reduce-overhead"
    [fsdp]="--strategy fsdp"
)

session() {
    stage gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
        2>&1 | tee -a "$work/gpu.txt"

    if [ "$what" != tests ]; then
        # dist_train alone, timed over steps 21-60 (compiling stays out)
        one=("$python" -m bench.gpu "${extra[@]}" --dist-train-only --repeats 1 --no-warmup-pair --timeout 240)
        stage baseline "${one[@]}" --json {json} || status=1
        for name in "${variants[@]}"; do
            if [ -z "${variant_args[$name]:-}" ]; then
                echo "unknown variant $name (GPU_SESSION_VARIANTS): one of ${!variant_args[*]}"
                status=1
                continue
            fi
            read -r -a options <<<"${variant_args[$name]}"
            stage "variant-$name" "$variants_until" "${one[@]}" "${options[@]}" --json {json}
        done
        stage profile "$python" -m bench.gpu_profile "${extra[@]}" --micro-batch 32
        shopt -s nullglob
        measured=("$work"/variant-*.json)
        if [ -f "$work/baseline.json" ] && [ "${#measured[@]}" -gt 0 ]; then
            stage stacked "${one[@]}" --stack "$work/baseline.json" "${measured[@]}" --json {json}
        fi
        stage pair "$python" -m bench.gpu "${extra[@]}" --repeats 1 --timeout 240 --json {json} || status=1
    fi
    if [ "$what" != mfu ]; then
        stage pytest-gpu "$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_gpu.py || status=1
    fi
    echo "gpu_session $what: exit $status, ${SECONDS}s"
    return "$status"
}

session 2>&1 | tee -a "$out/session.log"
exit "${PIPESTATUS[0]}"
