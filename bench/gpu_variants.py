"""bench.gpu's variants: what one may change, and how the ones that beat the baseline stack.

`bash bench/gpu_session.sh` runs dist_train alone with one change each (`--dist-train-only`), then
`python -m bench.gpu --stack BASELINE.json VARIANT.json...` once with every change that helped.
"""

from __future__ import annotations

import argparse
import statistics

from .workloads import CUDA_GRAPH_MODES

# What a variant may change (bench/gpu_session.sh tries each alone, then stacks the ones that helped)
VARIANT_KEYS = (
    "strategy",
    "grad_accum",
    "micro_batch",
    "compile_mode",
    "coordinate_descent",
    "sdpa_backend",
    "fused_loss",
    "residual",
)


def variant_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in VARIANT_KEYS}


def dist_train_tokens_per_s(report: dict) -> float | None:
    values = [runs[0]["tokens_per_s"] for runs in report.get("runs", []) if runs[0]["ok"]]
    return statistics.median(values) if values else None


def stacked_options(baseline: dict, variants: list[dict], margin: float = 0.005) -> dict:
    """The options of every variant that beat the baseline's dist_train tokens/s by more than `margin`:
    for each option, the value of the fastest such variant. {} when none did.

    Compile modes stack as torch defines them: tuned kernels (max-autotune-no-cudagraphs) and CUDA
    graphs (reduce-overhead) both winning make max-autotune; FSDP2 and CUDA graphs do not mix, so
    the faster of the two stays (with tuned kernels if they won too)."""
    base_rate, base = dist_train_tokens_per_s(baseline), baseline["options"]
    best: dict[str, tuple[float, object]] = {}
    modes: dict[str, float] = {}
    for variant in variants:
        rate = dist_train_tokens_per_s(variant)
        if base_rate is None or rate is None or rate <= base_rate * (1 + margin):
            continue
        modes[variant["options"]["compile_mode"]] = rate
        for key, value in variant["options"].items():
            if value != base.get(key) and (key not in best or rate > best[key][0]):
                best[key] = (rate, value)
    stacked = {key: value for key, (_, value) in best.items()}
    tuned = "max-autotune-no-cudagraphs" in modes
    if tuned and "reduce-overhead" in modes:
        stacked["compile_mode"] = "max-autotune"
    if stacked.get("strategy") == "fsdp" and stacked.get("compile_mode") in CUDA_GRAPH_MODES:
        if best["strategy"][0] >= max(modes.get(mode, 0.0) for mode in CUDA_GRAPH_MODES):
            stacked["compile_mode"] = "max-autotune-no-cudagraphs" if tuned else base["compile_mode"]
        else:
            stacked["strategy"] = base["strategy"]
    return {key: value for key, value in stacked.items() if value != base.get(key)}
