"""Single-GPU GPT-2-small benchmark: dist_train against the hand-written loop, tokens/s and MFU.

    python -m bench.gpu                      # GPT-2 small (124M), bf16, torch.compile, SDPA attention
    python -m bench.gpu --json gpu.json --repeats 3 --coordinate-descent
    python -m bench.gpu --residual fp32      # nanoGPT's fp32 residual stream under autocast
    python -m bench.gpu --tiny --device cpu  # smoke test of the harness on a CPU (tiny model, numbers meaningless)

Both sides build `transformer_lm(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12,
n_heads=12, low_precision_residual=True)` (causal `F.scaled_dot_product_attention`: torch's kernel
choice, cuDNN's on an H100 with torch 2.11; the residual stream in bf16, `--residual fp32` for fp32)
from the same seed, train it at GPT-2's batch (512 sequences per optimizer step,
8 micro-steps of 64) on `synthetic_tokens` with fused AdamW under bf16 autocast, the model compiled
in place (`model.compile()`) and the fp32 cross-entropy compiled too, in fresh processes,
alternating dist_train / hand-written. Tokens/s comes from the steady-state step time, timed from
one host read of the loss to another (optimizer steps 6-20: CUDA steps are queued ahead of the GPU);
MFU = tokens/s x FLOPs per token (dist_train.flops) / the GPU's bf16 dense peak. dist_train's own
logged `mfu` (metrics.jsonl) is shown as a cross-check. `python -m bench.gpu_profile` shows where
the GPU time of such a step goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .gpu_variants import stacked_options, variant_options
from .harness import SIDES, Cell, run_pair, run_side, stop_on_sigterm, summarise_cell
from .report import gpu_table, machine_info
from .workloads import CUDA_GRAPH_MODES, Workload

GPT2_SMALL = Workload(
    name="gpt2_small",
    model_factory="dist_train.models.transformer_lm:transformer_lm",
    model_name="transformer_lm",
    model_kwargs={"vocab_size": 50304, "seq_len": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12},
    data_factory="dist_train.data.synthetic:synthetic_tokens",
    data_name="synthetic_tokens",
    data_kwargs={"vocab_size": 50304, "seq_len": 1024, "num_samples": 10240, "eval_samples": 0},  # one epoch
    # GPT-2's own batch: 512 sequences of 1024 tokens, 64 per micro-step (an H100, accumulation 1: 41.1% MFU
    # at 64 against 40.4% at 32 and 38.6% at 16, bench/gpu_session.sh 2026-11-26/27), 8 micro-steps each
    micro_batch_size=64,
    grad_accum_steps=8,
    steps=20,
    warmup_steps=5,  # compilation and allocator warm-up stay out of the statistics
    log_every=5,  # three timed windows of 5 optimizer steps (40 micro-steps) each
    lr=6e-4,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    precision="bf16",
    compile=True,
    step_time="window",  # CUDA steps are queued ahead: time from one host read of the loss to another
)

TINY = GPT2_SMALL.scaled(
    name="gpt2_tiny",
    model_kwargs={"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 2},
    data_kwargs={"vocab_size": 256, "seq_len": 64, "num_samples": 512, "eval_samples": 0},
    micro_batch_size=4,
    grad_accum_steps=1,
    steps=8,
    warmup_steps=4,
    log_every=4,
)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode on both sides")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode on both sides (dist_train: train.compile_mode)",
    )
    parser.add_argument(
        "--coordinate-descent",
        action="store_true",
        help="Inductor tunes each generated kernel's block sizes (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1)",
    )
    parser.add_argument(
        "--sdpa-backend",
        choices=("torch", "cudnn", "flash", "efficient", "math"),
        default="torch",
        help="attention kernel tried first on both sides (dist_train: train.sdpa_backend)",
    )
    parser.add_argument(
        "--fused-loss",
        action="store_true",
        help="the output projection and cross-entropy in one, a chunk of tokens at a time, on both sides "
        "(dist_train: train.fused_loss; the hand-written loop calls model(inputs, targets=targets))",
    )
    parser.add_argument(
        "--residual",
        choices=("bf16", "fp32"),
        default="bf16",
        help="dtype of the model's residual stream under autocast, on both sides (transformer_lm's "
        "low_precision_residual; fp32: nanoGPT's). bf16: 44.8 %% MFU against 42.4 %% on an H100",
    )
    parser.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="fsdp: FSDP2 on one GPU under torchrun on both sides (bf16 parameters for compute, fp32 "
        "master weights; no resharding after forward)",
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-step (default 64; tiny 4)")
    parser.add_argument(
        "--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 8; tiny 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; tiny 8)")
    parser.add_argument("--repeats", type=int, default=2, help="dist_train / hand-written pairs")
    parser.add_argument(
        "--dist-train-only",
        action="store_true",
        help="run dist_train alone (tokens/s and MFU of a variant; no hand-written side, no ratios)",
    )
    parser.add_argument(
        "--no-warmup-pair",
        action="store_true",
        help="skip the unmeasured first pair that fills the compile caches (else the first side measured pays it)",
    )
    parser.add_argument(
        "--stack",
        nargs="+",
        type=Path,
        metavar="JSON",
        default=None,
        help="a baseline report then variant reports: run once more with the change of every variant that "
        "beat the baseline's dist_train tokens/s by more than 0.5 %% (per changed option, the best one); "
        "without --dist-train-only the pair runs even when none did (or no report exists), with these options",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder here")
    args = parser.parse_args(argv)
    every = (TINY if args.tiny else GPT2_SMALL).log_every
    if args.steps is not None and (args.steps < 2 * every or args.steps % every):
        parser.error(
            f"--steps must be a multiple of {every} and at least {2 * every}: the timed window runs from one "
            f"host read of the loss (every {every} steps) to another"
        )
    if args.grad_accum is not None and args.grad_accum < 1:
        parser.error("--grad-accum must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.strategy == "fsdp" and args.compile_mode in CUDA_GRAPH_MODES:
        parser.error(f"--strategy fsdp with --compile-mode {args.compile_mode}: FSDP2 does not replay as CUDA graphs")
    return args


def gpu_peak_tflops() -> tuple[str, float | None]:
    import torch

    from dist_train.flops import peak_tflops

    name = torch.cuda.get_device_name(0)
    return name, peak_tflops(name)


def model_kwargs(workload: Workload, residual: str) -> dict:
    """The workload's transformer_lm arguments with the residual stream's dtype (--residual)."""
    return {**workload.model_kwargs, "low_precision_residual": residual == "bf16"}


def flops_per_token(workload: Workload) -> float:
    import torch

    from dist_train.flops import model_flops_per_token
    from dist_train.models.transformer_lm import transformer_lm

    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = transformer_lm(**workload.model_kwargs)
    return model_flops_per_token(model, workload.tokens_per_sample())


def last_logged(run_dir: str, key: str) -> float | None:
    """The last value of `key` in a dist_train run's metrics.jsonl (None when never logged)."""
    rows = Path(run_dir, "out", "metrics.jsonl")
    if not rows.is_file():
        return None
    values = [json.loads(line).get(key) for line in rows.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a machine with a GPU, "
            "or smoke-test the harness on the CPU: python -m bench.gpu --tiny --device cpu",
            file=sys.stderr,
        )
        return 2
    if args.stack:
        baseline, *variants = args.stack
        if not baseline.is_file() and args.dist_train_only:
            print(f"bench.gpu --stack: no baseline report at {baseline}; nothing to run")
            return 0
        variants = [json.loads(path.read_text()) for path in variants if path.is_file()]
        stacked = stacked_options(json.loads(baseline.read_text()), variants) if baseline.is_file() else {}
        if not stacked and args.dist_train_only:
            print(f"bench.gpu --stack: no variant in {len(variants)} report(s) beat the baseline; nothing to run")
            return 0
        if stacked:
            print(f"bench.gpu --stack: {stacked}", flush=True)
        else:  # the pair still runs, with the baseline's options
            print(
                f"bench.gpu --stack: no variant in {len(variants)} report(s) beat the baseline; its options", flush=True
            )
        for key, value in stacked.items():
            setattr(args, key, value)
    cell = build_cell(args)
    workload = cell.workload
    per_token = flops_per_token(workload)
    gpu, peak = gpu_peak_tflops() if args.device == "cuda" else (None, None)
    sides = SIDES[:1] if args.dist_train_only else SIDES

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dist_train_bench_gpu_"))
    started = time.time()
    runs = []
    try:
        if workload.compile and not args.no_warmup_pair:
            print("warm-up (compile caches; not measured) ...", flush=True)
            for side in sides:
                run_side(cell, side, root / f"warmup-{side}", threads=0, timeout=args.timeout)
        for repeat in range(args.repeats):
            if args.dist_train_only:
                records = [run_side(cell, "dist_train", root / f"{repeat}-dist_train", threads=0, timeout=args.timeout)]
            else:
                records = run_pair(cell, repeat, root, threads=0, timeout=args.timeout, hand_first=repeat % 2 == 1)
            by_side = {}
            for record in records:
                by_side[record["side"]] = record
                measure(record, per_token, peak)
                print(f"[{repeat + 1}/{args.repeats}] {describe(record)}", flush=True)
            runs.append([by_side[side] for side in sides])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    if args.dist_train_only:
        summary = {"ok": any(r[0]["ok"] for r in runs), "dist_train_only": True}
    else:
        summary = summarise_cell([tuple(r) for r in runs])
    report = {
        "machine": machine_info(),
        "gpu": gpu,
        "peak_bf16_tflops": peak,
        "options": variant_options(args),
        "workload": workload.spec(cell.strategy),
        "flops_per_token": per_token,
        "elapsed_s": time.time() - started,
        "summary": summary,
        "runs": runs,
    }
    print(gpu_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # as --keep: no traceback once the runs are done
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    failed = sum(not record["ok"] for r in runs for record in r)
    if failed:
        print(f"failed runs: {failed} of {len(runs) * len(sides)}")
    return 0 if summary.get("ok") and not failed else 1


def build_cell(args: argparse.Namespace) -> Cell:
    """The workload and launcher the options ask for."""
    workload = TINY if args.tiny else GPT2_SMALL
    changes = {"device": args.device}
    if args.grad_accum:
        changes["grad_accum_steps"] = args.grad_accum
    if args.no_compile:
        changes["compile"] = False
    elif args.compile_mode != "default":
        changes["compile_mode"] = args.compile_mode
    if args.micro_batch:
        changes["micro_batch_size"] = args.micro_batch
    if args.sdpa_backend != "torch":
        changes["sdpa_backend"] = args.sdpa_backend
    if args.fused_loss:
        changes["fused_loss"] = True
    changes["model_kwargs"] = model_kwargs(workload, args.residual)
    if args.steps:
        changes["steps"] = args.steps
        every = workload.log_every  # the window starts and ends at a read of the loss (Workload.step_time)
        changes["warmup_steps"] = max(every, min(workload.warmup_steps, args.steps // 3 // every * every))
    if args.coordinate_descent:  # Inductor reads it at import, in each run's process (run_env copies os.environ)
        os.environ["TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"] = "1"
    if args.strategy == "fsdp":  # FSDP2 needs a process group: torchrun, one rank; one GPU gains nothing by resharding
        changes["strategy_options"] = {"reshard_after_forward": False}
        return Cell(workload.scaled(**changes), world_size=1, strategy="fsdp", launcher="torchrun")
    return Cell(workload.scaled(**changes), world_size=1, launcher="single")


def measure(record: dict, per_token: float, peak: float | None) -> None:
    """Add MFU (and dist_train's own logged MFU) to a finished run's record."""
    if not record["ok"]:
        return
    record["mfu"] = record["tokens_per_s"] * per_token / (peak * 1e12) if peak else None
    if record["side"] == "dist_train":  # its own MFU, and its last loss: a variant must train as the baseline
        record["logged_mfu"] = last_logged(record["run_dir"], "mfu")
        record["logged_loss"] = last_logged(record["run_dir"], "loss")


def describe(record: dict) -> str:
    if not record["ok"]:
        return f"{record['side']:<10} FAILED\n{record.get('log_tail', '')}"
    mfu = f"  MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
    loss = record.get("logged_loss")  # a float, or "nan"/"inf" as metrics.jsonl writes them
    shown = "" if loss is None else f"  last loss {loss:.4f}" if isinstance(loss, float) else f"  last loss {loss}"
    return f"{record['side']:<10} {record['tokens_per_s']:10.0f} tokens/s{mfu}{shown}"


if __name__ == "__main__":
    sys.exit(main())
