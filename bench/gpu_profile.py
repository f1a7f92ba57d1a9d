"""Where a GPT-2-small training step spends its GPU time: torch.profiler over a few steady-state steps.

    python -m bench.gpu_profile [--micro-batch 64] [--steps 5] [--no-compile-loss] [--compile-mode max-autotune]
                                [--sdpa-backend cudnn]
    python -m bench.gpu_profile --tiny --device cpu     # smoke test of the script (CPU ops, tiny model)

The step of bench.gpu's hand-written side (the same model, bf16 autocast, `model.compile()`, the
compiled fp32 cross-entropy, fused AdamW, clipping), in one process. Prints the kernels by GPU time
and the time per kind (matrix products, attention, fused elementwise, optimizer), against the wall
time of a step: what is left for MFU to gain, and where.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch

from .common import attention_preference, loss_function, micro_loss, param_groups
from .gpu import GPT2_SMALL, TINY, flops_per_token, gpu_peak_tflops, model_kwargs
from .workloads import CUDA_GRAPH_MODES

KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused (triton)", ("triton",)),
)


def kind(name: str) -> str:
    lower = name.lower()
    return next((k for k, keys in KINDS if any(key in lower for key in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 64; tiny 4)")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile-loss", action="store_true")
    parser.add_argument(
        "--fused-loss", action="store_true", help="the model computes its chunked loss (train.fused_loss)"
    )
    parser.add_argument(
        "--residual",
        choices=("bf16", "fp32"),
        default="bf16",
        help="dtype of the residual stream under autocast (transformer_lm's low_precision_residual)",
    )
    parser.add_argument(
        "--compile-mode", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    )
    parser.add_argument("--sdpa-backend", choices=("torch", "cudnn", "flash", "efficient", "math"), default="torch")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench.gpu_profile: no CUDA GPU here; smoke-test it on the CPU: --tiny --device cpu", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    spec = TINY if args.tiny else GPT2_SMALL
    spec = spec.scaled(micro_batch_size=args.micro_batch or spec.micro_batch_size)
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.manual_seed(0)
    from dist_train.models.transformer_lm import transformer_lm

    model = transformer_lm(**model_kwargs(spec, args.residual)).to(device)
    mode = args.compile_mode or "default"
    model.compile(mode=mode)
    loss_fn = loss_function({"compile": not args.no_compile_loss, "compile_mode": mode})
    graphs = cuda and mode in CUDA_GRAPH_MODES
    optimizer = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, fused=True)
    vocab, seq = spec.model_kwargs["vocab_size"], spec.model_kwargs["seq_len"]
    tokens = torch.randint(0, vocab, (spec.micro_batch_size, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        micro_loss(model, loss_fn, {"precision": "bf16", "fused_loss": args.fused_loss}, inputs, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with attention_preference({"sdpa_backend": args.sdpa_backend}):  # as train.sdpa_backend: compiling included
        for _ in range(args.warmup):
            step()
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - started) / args.steps
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
            sync()

    if cuda:
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_step = lambda e: e.self_device_time_total / 1e3 / args.steps  # noqa: E731  (ms)
    else:  # CPU ops, outermost ones excluded by self time
        events = list(prof.key_averages())
        per_step = lambda e: e.self_cpu_time_total / 1e3 / args.steps  # noqa: E731
    events.sort(key=per_step, reverse=True)
    gpu_ms = sum(per_step(e) for e in events)
    by_kind = collections.Counter()
    for e in events:
        by_kind[kind(e.key)] += per_step(e)
    _, peak = gpu_peak_tflops() if cuda else (None, None)
    achieved = spec.micro_batch_size * seq * flops_per_token(spec) / wall / 1e12
    print(
        f"micro-batch {spec.micro_batch_size}, compile mode {mode}, "
        f"loss {'fused' if args.fused_loss else 'eager' if args.no_compile_loss else 'compiled'}, "
        f"attention {args.sdpa_backend}, residual {args.residual}: "
        f"wall {wall * 1e3:.1f} ms/step, {device.type} busy {gpu_ms:.1f} ms/step, {achieved:.0f} TFLOP/s"
        + (f" = MFU {achieved / peak:.1%}" if peak else "")
    )
    for name, ms in by_kind.most_common():
        print(f"  {name:<16} {ms:7.2f} ms  {ms / gpu_ms:6.1%}")
    print(f"top {args.top} kernels (ms per step, calls per step):")
    for e in events[: args.top]:
        print(f"  {per_step(e):7.2f}  {e.count / args.steps:5.0f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
