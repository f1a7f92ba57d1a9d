"""`metrics.png`: loss and eval loss, learning rate, grad norm and throughput against step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("dist_train")

PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("lr",)),
    ("grad norm (pre-clip)", ("grad_norm",)),
    ("throughput (samples/s)", ("samples_per_s",)),
)


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the plot; returns its path, or None when matplotlib is missing (the run does not fail)."""
    run_dir = Path(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping metrics.png (pip install 'dist-train[plot]')")
        return None
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = [
                (r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "resumed_from" not in r
            ]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
