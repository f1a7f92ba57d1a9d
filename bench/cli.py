"""`python -m bench`: dist_train against hand-written loops, side by side, in one invocation.

    python -m bench                      # default: both workloads, world sizes 1 and 2, every registered strategy
    python -m bench --quick              # fewer steps and repeats (about 3 minutes)
    python -m bench --json bench.json --workloads transformer_lm --world-sizes 2 --strategies ddp,deepspeed

Each cell (workload x world size x strategy) is run `--repeats` times as a pair of dist_train and the
hand-written loop, which side goes first alternating from pair to pair (A B, B A, ...); cells are
interleaved round by round so slow drift in machine load hits both sides alike. An unmeasured warm-up
launch of each strategy's two sides first fills the caches a first launch pays for (DeepSpeed's JIT
extension check, the page cache). Reported: the median over pairs of each side's steady-state median step time,
samples/s, time to first optimizer step, peak RSS, and the median of the paired ratios; then, pooled
over the cells at 2 ranks, the geometric mean of every paired step ratio with a bootstrap interval
(one cell's few pairs cannot resolve 1-2% on a noisy machine; all of them together can).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from dist_train.host_memory import MMAP_THRESHOLD, TRIM_THRESHOLD

from .harness import HAND_LOOPS, SIDES, Cell, pooled_step_ratios, run_pair, run_side, stop_on_sigterm, summarise_cell
from .report import machine_info, table
from .workloads import WORKLOADS, quick, smoke

# dist_train / hand-written targets on 2 CPU ranks (gloo); step time per strategy
TARGETS = {
    "step_time_s": {"ddp": 1.01, "deepspeed": 1.02, "fsdp": 1.02},
    "time_to_first_step_s": 1.2,
    "peak_rss_mb": 1.05,
}


def registered_strategies() -> list[str]:
    from dist_train.strategies import REGISTRY

    return list(REGISTRY)


def build_cells(args: argparse.Namespace) -> tuple[list[Cell], list[str]]:
    notes = []
    available = registered_strategies()
    cells = []
    for strategy in args.strategies:
        if strategy not in available:
            notes.append(f"{strategy}: not registered in dist_train.strategies.REGISTRY yet, skipped")
            continue
        if strategy == "deepspeed" and not _importable("deepspeed"):
            notes.append("deepspeed: package not installed, skipped")
            continue
        stages = args.zero_stages if strategy == "deepspeed" else [0]
        # Sharded strategies are measured where they shard: at world size 2 (see --sharded-world-sizes).
        world_sizes = args.world_sizes if strategy == "ddp" else args.sharded_world_sizes
        workloads = args.workloads if strategy == "ddp" else args.sharded_workloads
        for name in workloads:
            workload = WORKLOADS[name]
            workload = smoke(workload) if args.smoke else quick(workload) if args.quick else workload
            for world_size in world_sizes:
                for stage in stages:
                    cells.append(Cell(workload, world_size, strategy, stage))
    return cells, notes


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    csv = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    ints = lambda text: [int(t) for t in csv(text)]  # noqa: E731
    parser.add_argument(
        "--quick", action="store_true", help="a third of the steps per run (at least 20), 2 pairs per cell"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, 8 steps, 1 pair (tests the harness)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--workloads", type=csv, default=list(WORKLOADS), help="of the DDP cells (default: all; deepspeed/fsdp: below)"
    )
    parser.add_argument("--world-sizes", type=ints, default=[1, 2], help="of the DDP cells (deepspeed/fsdp: below)")
    parser.add_argument("--strategies", type=csv, default=["ddp", "deepspeed", "fsdp"])
    parser.add_argument("--zero-stages", type=ints, default=[1, 2, 3])
    parser.add_argument("--sharded-workloads", type=csv, default=["transformer_lm"], help="for deepspeed/fsdp")
    parser.add_argument("--sharded-world-sizes", type=ints, default=[2], help="for deepspeed/fsdp")
    parser.add_argument("--repeats", type=int, default=None, help="pairs per cell (default 5; --quick 2; --smoke 1)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up launches")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    parser.add_argument(
        "--order",
        choices=("ab", "abba"),
        default="abba",
        help="within each pair: dist_train first (ab), or alternate which side runs first (abba: cancels order effects)",
    )
    parser.add_argument(
        "--same-heap",
        action="store_true",
        help="give the hand-written loops dist_train's glibc heap thresholds too (MALLOC_*_ variables on both "
        "sides; dist_train then leaves them): the ratios measure the loop alone, without that tuning's gain",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder (logs, metrics) here")
    args = parser.parse_args(argv)
    unknown = set(args.workloads + args.sharded_workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)} (known: {', '.join(WORKLOADS)})")
    unknown = set(args.strategies) - set(HAND_LOOPS)  # no hand-written loop to compare with
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)} (known: {', '.join(HAND_LOOPS)})")
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 2 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    cells, notes = build_cells(args)
    for note in notes:
        print(f"note: {note}", flush=True)
    started = time.time()
    load_before = os.getloadavg()
    if args.same_heap:  # read by glibc at each run's start; run_env passes this environment on
        os.environ.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dist_train_bench_"))
    pairs: dict[int, list] = {i: [] for i in range(len(cells))}
    try:
        if not args.no_warmup:
            warm_up(cells, root / "warmup", args)
        for repeat in range(args.repeats):
            for index, cell in enumerate(cells):
                pair = {}
                cell_dir = root / f"{index:02d}-{cell.label.replace(' ', '_')}"
                # abba: the first side alternates from pair to pair and from cell to cell, so over a
                # run each side goes first equally often (an odd number of pairs leaves one cell 3:2)
                hand_first = args.order == "abba" and (repeat + index) % 2 == 1
                for record in run_pair(cell, repeat, cell_dir, args.threads, args.timeout, hand_first):
                    status = f"{record['step_time_s'] * 1e3:7.1f} ms/step" if record["ok"] else "FAILED"
                    print(f"[{repeat + 1}/{args.repeats}] {cell.label:<32} {record['side']:<10} {status}", flush=True)
                    if not record["ok"]:
                        print(record.get("log_tail", ""), flush=True)
                    pair[record["side"]] = record
                pairs[index].append((pair["dist_train"], pair["hand"]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    results = []
    for index, cell in enumerate(cells):
        summary = summarise_cell(pairs[index])
        results.append(
            {
                "label": cell.label,
                "workload": cell.workload.name,
                "world_size": cell.world_size,
                "strategy": cell.strategy,
                "zero_stage": cell.zero_stage,
                "global_batch": cell.workload.global_batch(cell.world_size),
                "steps": cell.workload.steps,
                "warmup_steps": cell.workload.warmup_steps,
                "summary": summary,
                "targets": _targets(cell, summary),
                "runs": [list(p) for p in pairs[index]],
            }
        )
    report = {
        "pooled": pooled_step_ratios(results),
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_s": time.time() - started,
        "notes": notes,
        "cells": results,
    }
    print()
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # as --keep: no traceback once the runs are done
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    # a cell whose pairs did not all run: its figures cover fewer pairs than asked, or none
    failed = [
        f"{r['label']} ({len(r['runs']) - r['summary'].get('pairs', 0)} of {len(r['runs'])} pairs)"
        for r in results
        if r["summary"].get("pairs", 0) < len(r["runs"]) or not r["summary"].get("ok")
    ]
    if failed:
        print(f"failed runs: {', '.join(failed)}")
        return 1
    return 0


def warm_up(cells: list[Cell], root: Path, args: argparse.Namespace) -> None:
    """One unmeasured launch of each strategy's two sides (tiny model), before the measured rounds."""
    first: dict[str, Cell] = {}
    for cell in cells:
        first.setdefault(cell.strategy, cell)
    for label, cell in first.items():
        tiny = dataclasses.replace(cell, workload=smoke(cell.workload))
        for side in SIDES:
            record = run_side(tiny, side, root / f"{label}-{side}", args.threads, args.timeout)
            print(f"[warm-up] {label:<15} {side:<10} {'done' if record['ok'] else 'FAILED'}", flush=True)


def _targets(cell: Cell, summary: dict) -> dict:
    """Which targets hold (2 CPU ranks is where they are defined; other world sizes are reported only)."""
    if not summary.get("ok") or cell.world_size != 2:
        return {}
    limits = {
        "step_time_s": TARGETS["step_time_s"][cell.strategy],
        "time_to_first_step_s": TARGETS["time_to_first_step_s"],
        "peak_rss_mb": TARGETS["peak_rss_mb"],
    }
    return {key: {"limit": limit, "met": summary[key]["ratio"] <= limit} for key, limit in limits.items()}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
