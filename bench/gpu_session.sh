#!/usr/bin/env bash
# Every GPU check in one or two commands, for a session that is lent a GPU machine (no install step:
# that machine's python3 already holds torch with CUDA, pyyaml, psutil, tqdm, pytest and pytest-timeout).
#
#   bash bench/gpu_session.sh [OUT_DIR] [all|mfu|tests]   # OUT_DIR defaults to $OUT, else ./gpu-session
#
# OUT_DIR gets two files, refreshed after every stage (a device tool that returns a few files gets
# everything, also from a run stopped at its limit): session.log, the whole console output, and
# results.tar.gz, each stage's own output (NAME.txt, and NAME.json for the benchmark runs).
# Each stage starts only while time is left and is stopped at its deadline (seconds since the start):
# the variants start until GPU_SESSION_VARIANTS_S (default 240) and stop at GPU_SESSION_VARIANTS_END_S
# (470), the pair starts until GPU_SESSION_PAIR_S (480), the rest until GPU_SESSION_BUDGET_S (500), and
# everything stops at GPU_SESSION_LIMIT_S (580). Stages, in order:
#   gpu                  the GPU, driver, torch and CUDA versions
# tests:
#   pytest-gpu           the CUDA-path tests (tests/test_gpu.py; GPU_SESSION_TESTS_K: a pytest -k filter)
# mfu (what issue 7 still needs a GPU for):
#   baseline             dist_train alone (GPT-2 small, GPT-2's batch: 8 micro-steps of 64, bf16 with the
#                        residual stream in bf16, torch.compile): tokens/s, MFU
#   variant-NAME         dist_train alone with one change each, in GPU_SESSION_VARIANTS order (default:
#                        fused-loss, train.fused_loss: the output projection and cross-entropy a chunk of
#                        tokens at a time, 5.8 % slower than the unfused loss on an H100 before its
#                        compiled form stopped writing an fp32 gradient per chunk, not re-measured since);
#                        also defined: coordinate-descent (Inductor's block-size tuning of its generated
#                        kernels: +2.3 % with an fp32 residual stream, +0.25 % or nothing with bf16, after
#                        over 150 s of tuning), fp32-residual (nanoGPT's fp32 residual stream: 42.4 %
#                        against 44.8 %), max-autotune-no-cudagraphs (tuned matrix-product kernels and
#                        coordinate descent: minutes of compiling), mb32 (micro-batch 32), accum1 (no
#                        accumulation), cudnn (cuDNN attention first), flash, reduce-overhead (CUDA
#                        graphs), fsdp
#   pair                 bench.gpu: dist_train vs hand-written side by side, one pair, with every variant's
#                        change that beat the baseline (bench.gpu --stack), the compile caches already warm
#   profile              bench.gpu_profile's GPU time per kernel kind, one micro-step and the update
# GPU_SESSION_PAIR_ARGS go to the pair's bench.gpu besides the stacked changes (a stacked change wins where
# both set one): say --coordinate-descent --timeout 340 (tuning from nothing needs more than the pair's
# 240 s per run, and about 300 s in all: it fits an `mfu` run, not an `all` one).
# BENCH_GPU_ARGS go to every bench.gpu and bench.gpu_profile command: "--tiny --device cpu" smoke-tests
# this script on a machine without a GPU (PYTHON names the interpreter, default python3).
# With one 15-minute device budget run `all` once (timeout_s 595) with GPU_SESSION_TESTS_K="fused_loss or
# logs_mfu": on one H100 (2026-11-28) the baseline took 76 s (compiling included), a variant about 80 s,
# the pair 90 s with warm caches and 295 s when it tuned kernels from nothing; the fused-loss test took
# over 90 s (three compiled runs), the whole test file about 3 minutes.
# Exit status: 0 when what ran passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-session}}
what=${2:-all}
variants_until=${GPU_SESSION_VARIANTS_S:-240}
variants_end=${GPU_SESSION_VARIANTS_END_S:-470}
pair_until=${GPU_SESSION_PAIR_S:-480}
budget=${GPU_SESSION_BUDGET_S:-500}
limit=${GPU_SESSION_LIMIT_S:-580}
read -r -a variants <<<"${GPU_SESSION_VARIANTS:-fused-loss}"
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

# stage NAME [START_BY [END_BY]] COMMAND...: run COMMAND into NAME.txt unless START_BY seconds (default:
# the budget) have passed, stopped at END_BY (default: the limit); a {json} in COMMAND becomes NAME.json
stage() {
    local name=$1 until=$budget end=$limit rc=0
    shift
    if [[ $1 =~ ^[0-9]+$ ]]; then
        until=$1
        shift
        if [[ $1 =~ ^[0-9]+$ ]]; then
            end=$1
            shift
        fi
    fi
    [ "$end" -le "$limit" ] || end=$limit
    [ "$until" -lt "$end" ] || until=$end
    if [ "$SECONDS" -ge "$until" ]; then
        echo "$name skipped: ${SECONDS}s spent, past ${until}s" | tee "$work/$name.txt"
        bundle
        return 0
    fi
    local args=("${@//\{json\}/$work/$name.json}")
    echo "== $name (at ${SECONDS}s, stopped at ${end}s): ${args[*]}"
    timeout --kill-after=15 "$((end - SECONDS))" "${args[@]}" 2>&1 | tee "$work/$name.txt" || rc=$?
    [ "$rc" -ne 124 ] || echo "$name stopped at ${end}s"
    bundle
    return "$rc"
}

# the options of each variant: one change against the baseline
declare -A variant_args=(
    [fused-loss]="--fused-loss"
    [fp32-residual]="--residual fp32"
    [coordinate-descent]="--coordinate-descent"
    [max-autotune-no-cudagraphs]="--compile-mode max-autotune-no-cudagraphs"
    [mb32]="--micro-batch 32"
    [accum1]="--grad-accum 1"
    [cudnn]="--sdpa-backend cudnn"
    [flash]="--sdpa-backend flash"
    [reduce-overhead]="--compile-mode reduce-overhead"
    [fsdp]="--strategy fsdp"
)

session() {
    stage gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
        2>&1 | tee -a "$work/gpu.txt"

    if [ "$what" != mfu ]; then
        local filter=()
        [ -z "${GPU_SESSION_TESTS_K:-}" ] || filter=(-k "$GPU_SESSION_TESTS_K")
        stage pytest-gpu "$python" -m pytest -m gpu -q -p no:cacheprovider --timeout 240 "${filter[@]}" \
            tests/test_gpu.py || status=1
    fi
    if [ "$what" != tests ]; then
        # dist_train alone, timed after 5 optimizer steps (compiling stays out)
        one=("$python" -m bench.gpu "${extra[@]}" --dist-train-only --repeats 1 --no-warmup-pair --timeout 240)
        stage baseline "${one[@]}" --json {json} || status=1
        for name in "${variants[@]}"; do
            if [ -z "${variant_args[$name]:-}" ]; then
                echo "unknown variant $name (GPU_SESSION_VARIANTS): one of ${!variant_args[*]}"
                status=1
                continue
            fi
            read -r -a options <<<"${variant_args[$name]}"
            stage "variant-$name" "$variants_until" "$variants_end" "${one[@]}" "${options[@]}" --json {json}
        done
        # both sides with what helped; the variants filled the compile caches (a missing report: left out)
        shopt -s nullglob
        measured=("$work"/variant-*.json)
        read -r -a pair_extra <<<"${GPU_SESSION_PAIR_ARGS:-}"
        stage pair "$pair_until" "$python" -m bench.gpu "${extra[@]}" --repeats 1 --no-warmup-pair --timeout 240 \
            --stack "$work/baseline.json" "${measured[@]}" "${pair_extra[@]}" --json {json} || status=1
        stage profile "$python" -m bench.gpu_profile "${extra[@]}"
    fi
    echo "gpu_session $what: exit $status, ${SECONDS}s"
    return "$status"
}

session 2>&1 | tee -a "$out/session.log"
exit "${PIPESTATUS[0]}"
