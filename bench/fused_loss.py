"""The output projection and cross-entropy fused (`train.fused_loss`) against the two apart, side by side.

    python -m bench.fused_loss                                   # GPT-2 small's head on a GPU, bf16, compiled
    python -m bench.fused_loss --device cpu --tokens 8192 --width 256 --no-compile   # on a CPU

One forward and backward of a language model's head alone: hidden states (tokens, width) through the
tied (vocabulary, width) projection to the loss summed over the tokens, as dist_train trains it
(`dist_train.fused_loss.linear_cross_entropy`, or logits then torch's `cross_entropy` on their fp32
upcast). Each side runs in a fresh process of its own, alternating unfused / fused, and reports the
median time of a forward and backward after warm-up and its peak memory over the timed steps above
what it held after warm-up (CUDA: max allocated; CPU: peak RSS, Linux). The defaults are GPT-2 small's micro-batch of
64 x 1024 tokens, vocabulary 50,304 and width 768, in bf16 autocast under torch.compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("unfused", "fused")
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fused_loss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokens", type=int, default=64 * 1024, help="tokens per micro-batch (default 65,536)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="eager on both sides")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="unfused / fused pairs, each side a fresh process")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # one side, in its process
    parser.add_argument("--json", default=None, help="write the report here")
    return parser.parse_args(argv)


def run_side(args: argparse.Namespace) -> dict:
    """One side in this process: {"ms": median ms per forward + backward, "peak_mb": peak memory above the warm start}."""
    import torch
    import torch.nn.functional as F

    from dist_train.fused_loss import linear_cross_entropy

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.width, device=device, generator=gen, requires_grad=True)
    weight = (torch.randn(args.vocab, args.width, device=device, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(args.vocab, (args.tokens,), device=device, generator=gen)

    def unfused(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = h @ w.t()
        return F.cross_entropy(logits.float(), t, reduction="sum")

    loss_of = linear_cross_entropy if args.side == "fused" else unfused
    if not args.no_compile:
        loss_of = torch.compile(loss_of)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = loss_of(hidden, weight, targets)
        loss.backward()
        hidden.grad = weight.grad = None

    for _ in range(args.warmup):  # compiling and the allocator's first requests stay out of the figures
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
    else:
        start_mem = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")
    return {"side": args.side, "ms": statistics.median(times) * 1e3, "peak_mb": (peak - start_mem) / 2**20}


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: its peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Start the peak RSS (VmHWM) afresh from the current RSS (Linux: clear_refs 5), and return that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return 0
    records: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
            command = [sys.executable, "-m", "bench.fused_loss", *child_args(args), "--side", side]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode:
                print(f"{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            record = json.loads(done.stdout.strip().splitlines()[-1])
            records[side].append(record)
            print(f"[{repeat + 1}/{args.repeats}] {side:<8} {record['ms']:9.2f} ms  {record['peak_mb']:9.1f} MB")
    med = {side: {key: statistics.median(r[key] for r in records[side]) for key in ("ms", "peak_mb")} for side in SIDES}
    shape = f"{args.tokens} tokens x vocabulary {args.vocab} x width {args.width}, {args.precision}"
    print(f"\nhead forward + backward, {shape}, {'eager' if args.no_compile else 'compiled'}, {args.device}")
    print("| | unfused | fused | fused / unfused |\n| --- | --- | --- | --- |")
    for key, label in (("ms", "ms per forward + backward"), ("peak_mb", "peak memory above the warm start, MB")):
        ratio = med["fused"][key] / med["unfused"][key] if med["unfused"][key] else float("nan")
        print(f"| {label} | {med['unfused'][key]:.1f} | {med['fused'][key]:.1f} | {ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median": med, "runs": records}, f, indent=1)
    return 0


def child_args(args: argparse.Namespace) -> list[str]:
    """The options a side's process gets: the parent's, less --json and --repeats."""
    out = ["--device", args.device, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    out += ["--width", str(args.width), "--precision", args.precision]
    out += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    return out + (["--no-compile"] if args.no_compile else [])


if __name__ == "__main__":
    sys.exit(main())
