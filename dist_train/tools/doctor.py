"""`dist-train doctor`: is this machine (and every node of this job) ready to train?

Alone it reports one process; under torchrun or srun every rank joins the process group through
`init_distributed` and takes part, and rank 0 prints: versions, devices, the launcher environment,
free disk in the output folder, which ranks run on which host, a per-rank matmul speed (a slow or
throttled device stands out) and an all-reduce bandwidth test (bus bandwidth as nccl-tests defines
it: busbw = algbw x 2(n-1)/n, https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md).
Exit 1 when it finds a problem (wrong all-reduce result, mismatched versions across ranks) or when
not every rank joins within --timeout-s (one line), else 0; a rank whose LOCAL_RANK has no visible GPU
stops before joining, with one `dist_train: error:` line (2).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import ArgParser
from ..config.checks import check_timeout
from ..distributed import DistContext, JoinError, detect_launcher, init_distributed, teardown
from ..errors import UserError
from .report import human_bytes, key_values, size_label, table

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NNODES",
    "SLURM_JOB_NODELIST",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
)
OTHER_VARS = ("CUDA_VISIBLE_DEVICES", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "OMP_NUM_THREADS")
MAX_BYTES = 256 * 2**20
WARMUP_ITERS = 2


def _parser() -> ArgParser:
    parser = ArgParser(prog="dist-train doctor", description="Check versions, devices, disk and all-reduce bandwidth.")
    parser.add_argument("--output-dir", default=".", help="folder whose free disk space to report (default: cwd)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="largest all-reduce message (default 256 MB)")
    parser.add_argument("--iters", type=int, default=10, help="timed all-reduces per message size (default 10)")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto", help="process-group backend")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout in seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _version(dist_name: str) -> str:
    """An installed package's version without importing it (deepspeed takes seconds and may fail)."""
    if importlib.util.find_spec(dist_name) is None:
        return "not installed"
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "importable, version unknown"


def versions() -> dict[str, str]:
    cuda = torch.cuda.is_available()
    nccl = "n/a"
    if cuda and dist.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    from .. import __version__

    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "n/a",
        "nccl": nccl,
        "gloo": "available" if dist.is_gloo_available() else "missing",
        "deepspeed": _version("deepspeed"),
        "dist_train": __version__,
    }


def devices() -> dict:
    import psutil

    memory = psutil.virtual_memory()
    info = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram": f"{human_bytes(memory.total)} ({human_bytes(memory.available)} available)",
        "cuda_devices": [],
    }
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        info["cuda_devices"].append(
            f"cuda:{index} {props.name}, {human_bytes(props.total_memory)}, compute {props.major}.{props.minor}"
        )
    return info


def launcher_env() -> dict:
    """The launcher and its variables as the launcher set them (read before `init_distributed`,
    which fills in RANK/WORLD_SIZE/MASTER_* from SLURM's variables under srun)."""
    env = os.environ
    return {
        "launcher": detect_launcher(),
        "torchrun": {k: env[k] for k in TORCHRUN_VARS if k in env},
        "slurm": {k: env[k] for k in SLURM_VARS if k in env},
        "other": {k: env[k] for k in OTHER_VARS if k in env},
    }


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except PermissionError:  # inside a folder this user may not enter: measured at that folder
        return False


def disk(output_dir: str) -> dict:
    """Free space where the output folder is (or would be created: its nearest existing parent)."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if _exists(p))
    usage = shutil.disk_usage(existing)
    return {
        "path": str(path),
        "exists": existing == path,
        "measured_at": str(existing),
        "free": usage.free,
        "total": usage.total,
    }


def _sync(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def matmul_flops(ctx: DistContext, iters: int = 5) -> float:
    """This rank's dense matmul throughput (FLOP/s): bf16 4096^2 on a GPU, fp32 512^2 on a CPU."""
    size, dtype = (4096, torch.bfloat16) if ctx.device.type == "cuda" else (512, torch.float32)
    a = torch.randn(size, size, device=ctx.device, dtype=dtype)
    b = torch.randn(size, size, device=ctx.device, dtype=dtype)
    a @ b  # warm-up (kernel selection, allocation)
    _sync(ctx)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(ctx)
    return 2 * size**3 * iters / (time.perf_counter() - start)


def allreduce_bandwidth(ctx: DistContext, max_bytes: int, iters: int) -> list[dict]:
    """Sum-all-reduce of float32 messages from 1 KB up to `max_bytes` (x4 each row).

    Each size is first checked for the right result (rank r contributes r + 1), then timed over
    `iters` calls after a warm-up; the time is the slowest rank's, as the job would see it.
    """
    n, rows = ctx.world_size, []
    size = 1024
    while size <= max_bytes:
        tensor = torch.full((size // 4,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(tensor)
        expected = n * (n + 1) / 2
        correct = torch.all(tensor == expected)
        tensor.zero_()  # time on zeros: repeated sums cannot overflow
        for _ in range(WARMUP_ITERS):
            dist.all_reduce(tensor)
        _sync(ctx)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(tensor)
        _sync(ctx)
        elapsed = torch.tensor([(time.perf_counter() - start) / iters, float(not correct)], device=ctx.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds, wrong = elapsed.tolist()
        algbw = size / seconds / 1e9
        rows.append(
            {"bytes": size, "time_us": seconds * 1e6, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (n - 1) / n}
        )
        rows[-1]["correct"] = not wrong
        size *= 4
    return rows


def rank_info(ctx: DistContext, output_dir: str) -> dict:
    return {
        "rank": ctx.rank,
        "host": socket.gethostname(),
        "local_rank": ctx.local_rank,
        "device": str(ctx.device),
        "versions": {k: v for k, v in versions().items() if k in ("torch", "cuda", "nccl", "deepspeed")},
        "disk_free": disk(output_dir)["free"],
    }


def find_problems(report: dict) -> list[str]:
    problems = []
    for row in report.get("allreduce", []):
        if not row["correct"]:
            problems.append(f"all-reduce of {size_label(row['bytes'])} returned a wrong sum on some rank")
    ranks = report["ranks"]
    for key in ("torch", "cuda", "nccl", "deepspeed"):
        seen = {r["versions"][key] for r in ranks}
        if len(seen) > 1:
            problems.append(f"ranks run different {key} versions: {', '.join(sorted(seen))}")
    return problems


def check_gpu_binding(backend: str) -> None:
    """Before joining: a rank whose LOCAL_RANK has no GPU would fail inside NCCL's set-up; say why instead."""
    if backend == "gloo" or not torch.cuda.is_available():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"{socket.gethostname()}: local rank {local_rank} but only {torch.cuda.device_count()} visible GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one rank per "
            "GPU or use --backend gloo"
        )


def collect(args, ctx: DistContext, environment: dict) -> dict | None:
    """Every rank measures; rank 0 returns the report (None elsewhere)."""
    info = rank_info(ctx, args.output_dir)
    flops = matmul_flops(ctx)
    allreduce = allreduce_bandwidth(ctx, args.max_bytes, args.iters) if ctx.is_distributed else []
    per_rank = [(info, flops)]
    if ctx.is_distributed:
        per_rank = [None] * ctx.world_size
        dist.all_gather_object(per_rank, (info, flops))
    if not ctx.is_rank_zero:
        return None
    report = {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "versions": versions(),
        "devices": devices(),
        "environment": environment,
        "disk": disk(args.output_dir),
        "ranks": [r for r, _ in per_rank],
        "matmul_flops": [f for _, f in per_rank],
        "allreduce": allreduce,
    }
    report["problems"] = find_problems(report)
    return report


def _hosts(ranks: list[dict]) -> list[list[str]]:
    by_host: dict[str, list[dict]] = {}
    for r in ranks:
        by_host.setdefault(r["host"], []).append(r)
    rows = []
    for host, members in by_host.items():
        ids = [m["rank"] for m in members]
        span = (
            f"{min(ids)}-{max(ids)}"
            if ids == list(range(min(ids), max(ids) + 1)) and len(ids) > 1
            else ",".join(map(str, ids))
        )
        devs = sorted({m["device"] for m in members})
        free = human_bytes(min(m["disk_free"] for m in members))
        rows.append([host, span, str(len(ids)), free, ", ".join(devs[:4]) + (" ..." if len(devs) > 4 else "")])
    return rows


def _gbps(value: float) -> str:
    return f"{value:.3f}" if value >= 0.01 or value == 0 else f"{value:.2e}"  # small messages: latency-bound


def render(report: dict) -> str:
    env, dev, disk_info = report["environment"], report["devices"], report["disk"]
    lines = [f"dist-train doctor: {report['world_size']} rank(s), launcher {env['launcher']}", "", "Versions"]
    lines.append(key_values(list(report["versions"].items())))
    lines += ["", "Devices (rank 0)"]
    lines.append(key_values([("cpus", dev["cpus"]), ("ram", dev["ram"]), ("cuda", len(dev["cuda_devices"]) or "none")]))
    lines += [f"    {d}" for d in dev["cuda_devices"]]
    lines += ["", "Launcher environment (rank 0)"]
    for group in ("torchrun", "slurm", "other"):
        values = env[group]
        lines.append(f"  {group}: " + (" ".join(f"{k}={v}" for k, v in values.items()) if values else "not set"))
    lines += [
        "",
        "Disk",
        f"  {disk_info['path']}: {human_bytes(disk_info['free'])} free of {human_bytes(disk_info['total'])}"
        + ("" if disk_info["exists"] else f" (does not exist yet: measured at {disk_info['measured_at']})"),
    ]
    lines += [
        "",
        "Ranks",
        table(["host", "ranks", "count", "free disk", "devices"], _hosts(report["ranks"]), align="lrrrl"),
    ]
    flops = report["matmul_flops"]
    slow = min(range(len(flops)), key=flops.__getitem__)
    lines += [
        "",
        "Matmul per rank",
        f"  fastest {max(flops) / 1e9:.1f} GFLOP/s, slowest {flops[slow] / 1e9:.1f} GFLOP/s "
        f"(rank {slow} on {report['ranks'][slow]['host']})",
    ]
    if report["allreduce"]:
        lines += [
            "",
            f"All-reduce ({report['backend']}, {report['world_size']} ranks, float32 sum, slowest rank's time)",
        ]
        header = ["size", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "result"]
        rows = [
            [
                size_label(r["bytes"]),
                f"{r['time_us']:.1f}",
                _gbps(r["algbw_gbps"]),
                _gbps(r["busbw_gbps"]),
                "ok" if r["correct"] else "WRONG",
            ]
            for r in report["allreduce"]
        ]
        lines.append(table(header, rows, align="rrrrr"))
    else:
        lines += ["", "All-reduce: single process, nothing to measure (run it under torchrun or srun with N ranks)"]
    lines += ["", "Problems:" if report["problems"] else "No problems found."]
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_bytes < 1024 or args.iters < 1:
        raise UserError("--max-bytes must be >= 1024 and --iters >= 1")
    check_timeout(args.timeout_s, "--timeout-s")  # 0 made every rank's store connection time out: a traceback
    check_gpu_binding(args.backend)
    ctx, environment = None, launcher_env()
    try:
        ctx = init_distributed(args.backend, args.timeout_s, "--timeout-s")
        report = collect(args, ctx, environment)
        if ctx.is_distributed:
            dist.barrier()
    except JoinError as err:  # a peer that never came: one line, as a training rank says it
        print(f"dist-train doctor: {err}", file=sys.stderr)
        return 1
    finally:
        teardown(ctx)
    if report is None:
        return 0
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    return 1 if report["problems"] else 0
