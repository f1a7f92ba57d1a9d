"""The results tables (plain text, Markdown-compatible: `python -m bench` and bench.gpu) and the machine description."""

from __future__ import annotations

import os
import platform
import statistics


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import importlib.metadata as md

        info["deepspeed"] = md.version("deepspeed")
    except Exception:  # noqa: BLE001 - optional
        pass
    return info


def _fmt_ratio(entry: dict, target: dict | None) -> str:
    mark = "" if not target else (" ok" if target["met"] else " MISS")
    return f"{entry['ratio']:.3f} [{entry['ratio_min']:.3f}-{entry['ratio_max']:.3f}]{mark}"


def table(report: dict) -> str:
    """One row per cell: each side's medians, and the paired ratios dist_train / hand-written
    (median [min-max] over pairs; `ok`/`MISS` against the targets at world size 2). CPU/step is the
    busiest rank's CPU time per step (all threads): the noise-robust view of the same overhead."""
    header = (
        "| workload | ranks | strategy | step ms (dist_train / hand) | step ratio | CPU/step ratio | samples/s (dt / hand) "
        "| first step s (dt / hand) | first-step ratio | peak RSS MB/rank (dt / hand) | RSS ratio |"
    )
    lines = [header, "|" + " --- |" * 11]
    for cell in report["cells"]:
        s, t = cell["summary"], cell["targets"]
        strategy = f"deepspeed z{cell['zero_stage']}" if cell["strategy"] == "deepspeed" else cell["strategy"]
        if not s.get("ok"):
            lines.append(f"| {cell['workload']} | {cell['world_size']} | {strategy} | failed |" + " |" * 7)
            continue
        st, sp, ft, rss = s["step_time_s"], s["samples_per_s"], s["time_to_first_step_s"], s["peak_rss_mb"]
        lines.append(
            f"| {cell['workload']} | {cell['world_size']} | {strategy} "
            f"| {st['dist_train'] * 1e3:.1f} / {st['hand'] * 1e3:.1f} | {_fmt_ratio(st, t.get('step_time_s'))} "
            f"| {_fmt_ratio(s['cpu_per_step_s'], None)} | {sp['dist_train']:.0f} / {sp['hand']:.0f} "
            f"| {ft['dist_train']:.2f} / {ft['hand']:.2f} | {_fmt_ratio(ft, t.get('time_to_first_step_s'))} "
            f"| {rss['dist_train']:.0f} / {rss['hand']:.0f} | {_fmt_ratio(rss, t.get('peak_rss_mb'))} |"
        )
    m = report["machine"]
    pooled = report.get("pooled") or {}
    if pooled:
        lines += [
            "",
            "pooled over the cells at 2 ranks: geometric mean of the paired step ratios [95% bootstrap interval]",
        ]
        lines += [
            f"  {k:<10} {v['ratio']:.3f} [{v['low']:.3f}-{v['high']:.3f}] over {v['pairs']} pairs"
            for k, v in pooled.items()
        ]
    lines.append("")
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; threads per rank "
        f"{report['settings']['threads']}; {report['settings']['repeats']} pair(s) per cell; "
        f"load average {report['load_average']['before'][0]:.1f} -> {report['load_average']['after'][0]:.1f}; "
        f"{report['elapsed_s'] / 60:.1f} min"
    )
    noise = [c["summary"]["hand_step_spread"] for c in report["cells"] if c["summary"].get("ok")]
    if noise:
        lines.append(
            f"noise: hand-written step time varies by up to {max(noise):.1%} between its own repeats "
            f"(median {sorted(noise)[len(noise) // 2]:.1%})"
        )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def gpu_table(report: dict) -> str:
    s = report["summary"]
    if not s.get("ok"):
        return "all runs failed"
    sides = ("dist_train",) if s.get("dist_train_only") else ("dist_train", "hand")
    ok = [r for r in report["runs"] if all(record["ok"] for record in r)]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    step = {side: median(r[i]["step_time_s"] for r in ok) for i, side in enumerate(sides)}
    tokens = {side: median(r[i]["tokens_per_s"] for r in ok) for i, side in enumerate(sides)}
    mfu = {side: median(r[i]["mfu"] for r in ok) for i, side in enumerate(sides)}
    first = {side: median(r[i]["time_to_first_step_s"] for r in ok) for i, side in enumerate(sides)}
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    w = report["workload"]
    rows = [
        ("step ms", {side: f"{v * 1e3:.1f}" for side, v in step.items()}, "step_time_s"),
        ("tokens/s", {side: f"{v:.0f}" for side, v in tokens.items()}, "samples_per_s"),
        ("MFU", {side: fmt(v) for side, v in mfu.items()}, None),
        ("time to first step s", {side: f"{v:.1f}" for side, v in first.items()}, "time_to_first_step_s"),
    ]
    lines = [
        f"{w['name']}: {w['model_kwargs']}, micro-batch {w['micro_batch_size']} x {w['grad_accum_steps']} micro-steps, "
        f"{w['precision']}, {w['strategy']}, compile {w['compile'] and w['compile_mode']}, "
        f"device {report['gpu'] or 'cpu'} (peak {report['peak_bf16_tflops'] or 'n/a'} TFLOP/s), options {report['options']}",
        "| | "
        + " | ".join("hand-written" if side == "hand" else side for side in sides)
        + ("" if len(sides) == 1 else " | ratio")
        + " |",
        "| --- " * (len(sides) + 1 + (len(sides) > 1)) + "|",
    ]
    for label, cells, key in rows:
        ratio = "" if len(sides) == 1 else f" | {s[key]['ratio']:.3f}" if key else " | "
        lines.append(f"| {label} | " + " | ".join(cells[side] for side in sides) + ratio + " |")
    logged = median(r[0].get("logged_mfu") for r in ok)
    if logged is not None:
        lines.append(f"dist_train's own logged mfu (metrics.jsonl): {logged:.1%}")
    return "\n".join(lines)
