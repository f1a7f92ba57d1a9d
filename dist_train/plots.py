"""`metrics.png`: loss and eval loss, learning rate, grad norm and throughput against step.

Drawn with matplotlib's object API (no pyplot, so no global backend switch and no GUI). Resumed
runs are plotted as one curve: after a `resumed_from` row the steps past the checkpoint, logged
again by the resumed run, replace the ones the interrupted run had logged (and a run started again
before its first checkpoint, logging from step 1 again, replaces the earlier attempt's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import UserError

log = logging.getLogger("dist_train")

PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("lr",)),
    ("grad norm (pre-clip)", ("grad_norm",)),
    ("throughput (samples/s)", ("samples_per_s",)),
)
FIGSIZE, DPI = (11, 7), 100  # metrics.png is 1100 x 700 pixels


PLOTTABLE = 1e300  # the largest magnitude plotted


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn line (a crash mid-write: cut short, garbage bytes) is skipped."""
    rows = []
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
                rows.append(row)
            else:  # torn, or JSON that is not a row (`[1, 2]`, no integer step: an error in series())
                log.warning("metrics.jsonl: skipping a malformed line")
    return rows


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric; a resume drops the interrupted run's points past its checkpoint."""
    points: list[tuple[int, float]] = []
    for row in rows:
        if "resumed_from" in row:
            points = [p for p in points if p[0] <= row["step"]]
            continue
        value = row.get(key)
        # values past +-1e300 (finite, but their axis range overflows matplotlib's arithmetic) left out, as inf is
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= PLOTTABLE:
            if points and row["step"] <= points[-1][0]:  # started again before its first checkpoint: from here
                points = [p for p in points if p[0] < row["step"]]  # on, the new attempt's points replace the old
            points.append((row["step"], float(value)))
    return points


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the plot; returns its path, or None when matplotlib is missing (the run does not fail)."""
    run_dir = Path(run_dir)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: skipping metrics.png (pip install 'dist-train[plot]')")
        return None
    try:
        rows = read_metrics(run_dir)
    except OSError as err:  # another user's run this one may not read
        raise UserError(f"cannot read {run_dir / 'metrics.jsonl'} ({err.strerror})") from None
    fig = Figure(figsize=FIGSIZE)
    axes = fig.subplots(2, 2)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = series(rows, key)
            if points:
                steps, values = zip(*points)
                sparse = key.startswith("eval") or len(points) < 20
                ax.plot(steps, values, marker="o" if sparse else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    try:
        fig.savefig(out, dpi=DPI, format=None if out.suffix else "png")  # matplotlib would write FILE.png
    except (OSError, ValueError) as err:  # a folder that is not there, an image type matplotlib does not write
        raise UserError(f"cannot write the plot to {out}: {err}") from None
    return out
