"""Single-GPU GPT-2-small benchmark: dist_train against the hand-written loop, tokens/s and MFU.

    python -m bench.gpu                      # GPT-2 small (124M), bf16, torch.compile, SDPA flash attention
    python -m bench.gpu --json gpu.json --repeats 3 --micro-batch 16
    python -m bench.gpu --tiny --device cpu  # smoke test of the harness on a CPU (tiny model, numbers meaningless)

Both sides build `transformer_lm(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12,
n_heads=12)` (causal `F.scaled_dot_product_attention`: flash attention on CUDA in bf16) from the
same seed, train it on `synthetic_tokens` with fused AdamW under bf16 autocast, the model compiled
in place (`model.compile()`) and the fp32 cross-entropy compiled too, in fresh processes,
alternating dist_train / hand-written. Tokens/s comes from the steady-state median step time;
MFU = tokens/s x FLOPs per token (dist_train.flops) / the GPU's bf16 dense peak. dist_train's own
logged `mfu` (metrics.jsonl) is shown as a cross-check. `python -m bench.gpu_profile` shows where
the GPU time of such a step goes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .harness import SIDES, Cell, run_pair, run_side, summarise_cell
from .report import machine_info
from .workloads import Workload

GPT2_SMALL = Workload(
    name="gpt2_small",
    model_factory="dist_train.models.transformer_lm:transformer_lm",
    model_name="transformer_lm",
    model_kwargs={"vocab_size": 50304, "seq_len": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12},
    data_factory="dist_train.data.synthetic:synthetic_tokens",
    data_name="synthetic_tokens",
    data_kwargs={"vocab_size": 50304, "seq_len": 1024, "num_samples": 2048, "eval_samples": 0},
    micro_batch_size=32,  # 41% MFU on an H100 against 39% at 16 (bench/gpu_session.sh, 2026-11-26)
    grad_accum_steps=1,
    steps=60,
    warmup_steps=20,  # compilation and allocator warm-up stay out of the statistics
    lr=6e-4,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    precision="bf16",
    compile=True,
)

TINY = GPT2_SMALL.scaled(
    name="gpt2_tiny",
    model_kwargs={"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 2},
    data_kwargs={"vocab_size": 256, "seq_len": 64, "num_samples": 512, "eval_samples": 0},
    micro_batch_size=4,
    steps=8,
    warmup_steps=3,
    log_every=4,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode on both sides")
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        default="default",
        help="torch.compile mode on both sides (dist_train: train.compile_mode)",
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 32; tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; tiny 8)")
    parser.add_argument("--repeats", type=int, default=2, help="dist_train / hand-written pairs")
    parser.add_argument(
        "--no-warmup-pair",
        action="store_true",
        help="skip the unmeasured first pair that fills the compile caches (else the first side measured pays it)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder here")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 3:
        parser.error("--steps must be at least 3: one warm-up step and two timed ones")
    return args


def gpu_peak_tflops() -> tuple[str, float | None]:
    import torch

    from dist_train.flops import peak_tflops

    name = torch.cuda.get_device_name(0)
    return name, peak_tflops(name)


def flops_per_token(workload: Workload) -> float:
    import torch

    from dist_train.flops import model_flops_per_token
    from dist_train.models.transformer_lm import transformer_lm

    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = transformer_lm(**workload.model_kwargs)
    return model_flops_per_token(model, workload.tokens_per_sample())


def logged_mfu(run_dir: str) -> float | None:
    rows = Path(run_dir, "out", "metrics.jsonl")
    if not rows.is_file():
        return None
    values = [json.loads(line).get("mfu") for line in rows.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a machine with a GPU, "
            "or smoke-test the harness on the CPU: python -m bench.gpu --tiny --device cpu",
            file=sys.stderr,
        )
        return 2
    workload = TINY if args.tiny else GPT2_SMALL
    changes = {"device": args.device}
    if args.no_compile:
        changes["compile"] = False
    elif args.compile_mode != "default":
        changes["compile_mode"] = args.compile_mode
    if args.micro_batch:
        changes["micro_batch_size"] = args.micro_batch
    if args.steps:
        changes["steps"] = args.steps
        changes["warmup_steps"] = max(1, min(workload.warmup_steps, args.steps // 3))
    workload = workload.scaled(**changes)
    cell = Cell(workload, world_size=1, launcher="single")
    per_token = flops_per_token(workload)
    gpu, peak = gpu_peak_tflops() if args.device == "cuda" else (None, None)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dist_train_bench_gpu_"))
    started = time.time()
    pairs = []
    try:
        if workload.compile and not args.no_warmup_pair:
            print("warm-up pair (compile caches; not measured) ...", flush=True)
            for side in SIDES:
                run_side(cell, side, root / f"warmup-{side}", threads=0, timeout=args.timeout)
        for repeat in range(args.repeats):
            pair = {}
            for record in run_pair(cell, repeat, root, threads=0, timeout=args.timeout, hand_first=repeat % 2 == 1):
                side = record["side"]
                if record["ok"]:
                    record["mfu"] = record["tokens_per_s"] * per_token / (peak * 1e12) if peak else None
                    if side == "dist_train":
                        record["logged_mfu"] = logged_mfu(record["run_dir"])
                    print(
                        f"[{repeat + 1}/{args.repeats}] {side:<10} {record['tokens_per_s']:10.0f} tokens/s"
                        + (f"  MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""),
                        flush=True,
                    )
                else:
                    print(f"[{repeat + 1}/{args.repeats}] {side:<10} FAILED\n{record.get('log_tail', '')}", flush=True)
                pair[side] = record
            pairs.append((pair["dist_train"], pair["hand"]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    summary = summarise_cell(pairs)
    report = {
        "machine": machine_info(),
        "gpu": gpu,
        "peak_bf16_tflops": peak,
        "workload": workload.spec(),
        "flops_per_token": per_token,
        "elapsed_s": time.time() - started,
        "summary": summary,
        "runs": [list(p) for p in pairs],
    }
    print(gpu_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0 if summary.get("ok") else 1


def gpu_table(report: dict) -> str:
    s = report["summary"]
    if not s.get("ok"):
        return "all runs failed"
    ok = [(a, b) for a, b in report["runs"] if a["ok"] and b["ok"]]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    tokens = {side: median(r[i]["tokens_per_s"] for r in ok) for i, side in enumerate(("dist_train", "hand"))}
    mfu = {side: median(r[i]["mfu"] for r in ok) for i, side in enumerate(("dist_train", "hand"))}
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    w = report["workload"]
    lines = [
        f"{w['name']}: {w['model_kwargs']}, micro-batch {w['micro_batch_size']}, {w['precision']}, "
        f"compile {w['compile'] and w['compile_mode']}, device {report['gpu'] or 'cpu'} (peak {report['peak_bf16_tflops'] or 'n/a'} TFLOP/s)",
        "| | dist_train | hand-written | ratio |",
        "| --- | --- | --- | --- |",
        f"| step ms | {s['step_time_s']['dist_train'] * 1e3:.1f} | {s['step_time_s']['hand'] * 1e3:.1f} "
        f"| {s['step_time_s']['ratio']:.3f} |",
        f"| tokens/s | {tokens['dist_train']:.0f} | {tokens['hand']:.0f} | {tokens['dist_train'] / tokens['hand']:.3f} |",
        f"| MFU | {fmt(mfu['dist_train'])} | {fmt(mfu['hand'])} | |",
        f"| time to first step s | {s['time_to_first_step_s']['dist_train']:.1f} "
        f"| {s['time_to_first_step_s']['hand']:.1f} | {s['time_to_first_step_s']['ratio']:.3f} |",
    ]
    logged = median(a.get("logged_mfu") for a, _ in ok)
    if logged is not None:
        lines.append(f"dist_train's own logged mfu (metrics.jsonl): {logged:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
