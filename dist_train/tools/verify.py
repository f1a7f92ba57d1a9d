"""`dist-train verify CONFIG [--world-size N] [--steps K] [KEY=VALUE ...]`: check the framework's
guarantees on your own model and data, in short runs in a temporary folder.

Four runs of K steps, launched as subprocesses (`launch/spawn.py`, or torchrun on loopback when the
package is installed without the launch folder), with b = train.micro_batch_size and
A = train.grad_accum_steps from the config:

    reference  1 rank  x micro-batch N*b x accumulation A
    ranks      N ranks x micro-batch b   x accumulation A   (checkpoint at step K/2)
    accum      1 rank  x micro-batch b   x accumulation N*A
    resumed    N ranks x micro-batch b   x accumulation A, started from `ranks`' step-K/2 checkpoint

and three comparisons of the final `model.safetensors` (max abs difference over every tensor):
ranks vs reference and accum vs reference within max(1e-5, 0.01 x train.lr) (`--tol`), resumed
vs ranks exactly (0). Exit 1 when a comparison fails, with the usual cause for this model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from ..cli import ArgParser
from ..config import Config, load_config
from ..distributed import detect_launcher
from ..errors import UserError
from .check import split_config_args
from .report import table

PARITY_TOL = 1e-5
# Rounding differences (another summation order) grow with the LR: Adam turns a near-zero gradient's
# rounding into an update of up to +-lr. Measured on the quickstart model over 10 steps: max |diff|
# about 0.004 x lr (4e-7 at lr 1e-4, 1.2e-5 at lr 3e-3), while dropout gives about 4 x lr.
PARITY_TOL_PER_LR = 0.01
CHECKS = {  # label, run, reference run; parity checks use the parity tolerance, resume must be exact
    "ranks": ("{n} ranks vs 1 rank", "ranks", "reference"),
    "accum": ("accumulation vs micro-batch", "accum", "reference"),
    "resume": ("resume vs uninterrupted", "resumed", "ranks"),
}
RUNS_NEEDED = {"ranks": ("reference", "ranks"), "accum": ("reference", "accum"), "resume": ("ranks", "resumed")}
# variables through which a child would think it is one rank of *our* launch
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_TASK_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "DIST_TRAIN_LAUNCHER")
SPAWN = Path(__file__).resolve().parents[2] / "launch" / "spawn.py"


def _parser() -> ArgParser:
    parser = ArgParser(prog="dist-train verify", description="Check parity and exact resume on your model and data.")
    parser.add_argument("args", nargs="*", metavar="CONFIG [KEY=VALUE ...]", help="config file, then overrides")
    parser.add_argument("--config", help="config file (instead of the first positional argument)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks of the multi-rank runs (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    parser.add_argument("--checks", default="ranks,accum,resume", help="comma-separated subset of ranks,accum,resume")
    parser.add_argument(
        "--tol", type=float, default=None, help="parity tolerance (default: max(1e-5, 0.01 x train.lr))"
    )
    parser.add_argument("--work-dir", default=None, help="keep the runs in this folder (default: temporary)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit per run in seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


@dataclass
class Run:
    name: str
    nproc: int
    micro_batch_size: int
    grad_accum_steps: int
    extra: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def shape(self) -> str:
        ranks = f"{self.nproc} ranks" if self.nproc > 1 else "1 rank"
        return f"{ranks} x {self.micro_batch_size} x accum {self.grad_accum_steps}"


def plan_runs(cfg: Config, world_size: int, steps: int, work: Path) -> dict[str, Run]:
    b, a, n, half = cfg.train.micro_batch_size, cfg.train.grad_accum_steps, world_size, steps // 2
    return {
        "reference": Run("reference", 1, n * b, a),
        "ranks": Run("ranks", n, b, a, [f"checkpoint.every_steps={half}", f"checkpoint.keep_last={steps}"]),
        "accum": Run("accum", 1, b, n * a),
        "resumed": Run(
            "resumed", n, b, a, [f"checkpoint.resume={_quoted(work / 'ranks' / 'checkpoints' / f'step-{half:08d}')}"]
        ),
    }


def _quoted(path: Path) -> str:
    """A path as a YAML single-quoted scalar: overrides are read as YAML, which cuts `work #1` at the `#`."""
    return "'" + str(path).replace("'", "''") + "'"


def _common_overrides(run: Run, work: Path, steps: int, evaluate: bool) -> list[str]:
    """Short, quiet runs whose trajectory is the config's: no eval (unless the LR depends on it: the
    plateau schedule), no plots, nothing resumed by accident."""
    return [
        f"run.output_dir={_quoted(work / run.name)}",
        f"train.max_steps={steps}",
        "train.epochs=null",
        f"train.micro_batch_size={run.micro_batch_size}",
        f"train.grad_accum_steps={run.grad_accum_steps}",
        *([] if evaluate else ["eval.every_steps=null"]),
        "eval.at_end=false",
        "eval.early_stopping_patience=null",
        "checkpoint.every_steps=null",
        "checkpoint.keep_every=null",
        "checkpoint.at_end=false",
        "checkpoint.resume=never",
        "log.plot=false",
        "log.tensorboard=false",
        "log.progress=lines",
        f"log.every_steps={steps}",
    ]


def _command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dist_train"]
    if SPAWN.is_file():
        return [sys.executable, str(SPAWN), "--nproc_per_node", str(nproc)]
    with socket.socket() as sock:  # torchrun on loopback only
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "dist_train"]  # fmt: skip


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + SLURM_TASK_VARS}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def launch(
    run: Run, config_path: str, overrides: list[str], work: Path, steps: int, timeout: float, evaluate: bool = False
) -> None:
    common = _common_overrides(run, work, steps, evaluate)
    cmd = [*_command(run.nproc), "--config", config_path, *overrides, *common, *run.extra]
    shutil.rmtree(work / run.name, ignore_errors=True)  # a kept --work-dir from an earlier verify
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"run `{run.name}` ({run.shape}) took longer than --timeout-s {timeout:g}") from None
    run.seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dist_train: error:")]
    if proc.returncode == 2 and errors:
        raise UserError(f"verify: run `{run.name}` ({run.shape}): {errors[-1].removeprefix('dist_train: error: ')}")
    tail = "\n".join(proc.stderr.splitlines()[-25:])
    raise RunFailed(f"run `{run.name}` ({run.shape}) exited with status {proc.returncode}:\n{tail}")


class RunFailed(RuntimeError):
    """A verification run crashed (not a parity difference)."""


def resumed_from(run_dir: Path) -> str | None:
    """The checkpoint a run says it resumed from (its first metrics.jsonl row), if any."""
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return json.loads(f.readline() or "{}").get("resumed_from")
    except (OSError, ValueError):
        return None


def max_abs_diff(a_dir: Path, b_dir: Path, floating_only: bool) -> float:
    """Max abs difference over the exported tensors (inf when names or shapes differ).

    `floating_only` leaves out integer buffers (BatchNorm's num_batches_tracked counts forward
    calls, which accumulation changes by design); the exact resume check compares them too.
    """
    from ..safetensors_io import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    keys = [k for k in a if a[k].numel() and (a[k].is_floating_point() or not floating_only)]
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in keys), default=0.0)


def model_traits(cfg: Config) -> dict:
    """What in the model typically breaks a guarantee: dropout, BatchNorm, QAT's observers."""
    from .memory import build_for_inspection

    model, _ = build_for_inspection(cfg)
    dropout = max(
        [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        + [v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)],
        default=0.0,
    )
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {
        "dropout": dropout,
        "batchnorm": batchnorm,
        "sync_batchnorm": cfg.train.sync_batchnorm,
        "qat": cfg.compress.qat,
    }


def explain(check: str, traits: dict, cfg: Config, excess: float) -> str:
    """The usual cause of a failed check for this model; `excess` is the difference over the tolerance."""
    causes = []
    if check in ("ranks", "accum") and traits["dropout"] > 0:
        causes.append(
            f"the model uses dropout (p={traits['dropout']:g}): dropout masks depend on each rank's random stream "
            "and on the micro-batch shape, so they differ between these runs; set its dropout to 0 (model.dropout=0 "
            "for the zoo) to verify the rest. With dropout on, training is still correct, only not comparable"
        )
    if check == "ranks" and traits["batchnorm"] and not traits["sync_batchnorm"]:
        causes.append(
            "BatchNorm without train.sync_batchnorm normalises over each rank's micro-batch; "
            "set train.sync_batchnorm=true"
        )
    if check == "accum" and traits["batchnorm"]:
        causes.append("BatchNorm normalises over each micro-batch, so accumulation cannot equal a bigger micro-batch")
    if check in ("ranks", "accum") and cfg.train.precision != "fp32":
        causes.append(
            f"train.precision {cfg.train.precision}: each product rounds to "
            f"{ {'bf16': 8, 'fp16': 11}[cfg.train.precision] } significant bits, and these runs split the batch "
            "differently, so their roundings differ by far more than the fp32 tolerance; verify the parity in "
            "fp32 (train.precision=fp32): the loop is the same"
        )
    if check in ("ranks", "accum") and traits.get("qat"):
        causes.append(
            "compress.qat: the activation observers set the fake-quant ranges from each forward's micro-batch "
            "(on N ranks rank 0's, which DDP broadcasts), so these runs quantize differently; verify the rest "
            "with compress.qat=false"
        )
    if check == "resume":
        causes.append(
            "a non-deterministic op (CUDA atomics, some scatter/index kernels: try "
            "torch.use_deterministic_algorithms(True)), randomness outside the RNGs the checkpoint saves (your own "
            "torch.Generator), or state outside the model and optimizer (a stateful loss, an unregistered buffer)"
        )
    if not causes and excess < 10:
        causes.append(
            "a difference just above the tolerance is usually float rounding (the runs sum in another order) "
            "that Adam amplifies over the steps; confirm with fewer --steps or a looser --tol"
        )
    if not causes:
        causes.append(
            "a non-deterministic op, data that depend on the rank or on the batch shape, a loss that is not a "
            "per-element sum/mean of the batch, or a layer that mixes samples across a micro-batch"
        )
    return "; ".join(causes)


def verify(args, cfg: Config, config_path: str, overrides: list[str], work: Path) -> dict:
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise UserError(f"--checks: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(CHECKS)}")
    runs = plan_runs(cfg, args.world_size, args.steps, work)
    needed = [name for name in runs if any(name in RUNS_NEEDED[c] for c in checks)]
    for name in needed:
        launch(runs[name], config_path, overrides, work, args.steps, args.timeout_s, cfg.schedule.name == "plateau")
    traits = model_traits(cfg)
    parity_tol = args.tol if args.tol is not None else max(PARITY_TOL, PARITY_TOL_PER_LR * cfg.train.lr)
    results = []
    for check in checks:
        label, run, reference = CHECKS[check]
        tol = 0.0 if check == "resume" else parity_tol
        diff = max_abs_diff(work / run, work / reference, floating_only=check != "resume")
        passed = diff <= tol
        explanation = None if passed else explain(check, traits, cfg, diff / max(tol, 1e-30))
        if check == "resume" and resumed_from(work / run) != f"step-{args.steps // 2:08d}":
            # identical weights prove nothing if the second run silently started from scratch
            passed, explanation = False, "the second run did not resume from the checkpoint (see its metrics.jsonl)"
        results.append(
            {
                "check": check,
                "label": label.format(n=args.world_size),
                "compared": f"{runs[run].shape} vs {runs[reference].shape}"
                if check != "resume"
                else f"{runs[run].shape}, resumed at step {args.steps // 2} vs uninterrupted",
                "max_abs_diff": diff,
                "tolerance": tol,
                "passed": passed,
                "explanation": explanation,
            }
        )
    return {
        "world_size": args.world_size,
        "steps": args.steps,
        "global_batch": args.world_size * cfg.train.micro_batch_size * cfg.train.grad_accum_steps,
        "runs": {name: asdict(runs[name]) for name in needed},
        "checks": results,
        "passed": all(r["passed"] for r in results),
    }


def render(report: dict, config_path: str, kept: str | None) -> str:
    lines = [
        f"dist-train verify {config_path}: {report['world_size']} ranks, {report['steps']} steps, "
        f"global batch {report['global_batch']}",
        "",
    ]
    rows = [
        [r["label"], r["compared"], f"{r['max_abs_diff']:.3g}", f"{r['tolerance']:g}" + (" (exact)" if not r["tolerance"] else ""),
         "pass" if r["passed"] else "FAIL"]
        for r in report["checks"]
    ]  # fmt: skip
    lines.append(table(["check", "runs compared", "max |diff|", "tolerance", "verdict"], rows, align="llrrl"))
    seconds = sum(r["seconds"] for r in report["runs"].values())
    where = f"kept in {kept}" if kept else "deleted; keep them with --work-dir"
    lines += ["", f"{len(report['runs'])} runs in {seconds:.1f} s ({where})"]
    failed = [r for r in report["checks"] if not r["passed"]]
    if failed:
        lines += ["", "Why a check fails:"] + [f"  - {r['label']}: {r['explanation']}" for r in failed]
    else:
        lines.append("All checks pass.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    config_path, overrides = split_config_args(args.config, args.args, "verify")
    if args.world_size < 2:
        raise UserError(f"--world-size must be >= 2 to compare against 1 rank, got {args.world_size}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 (resume is checked from step steps/2), got {args.steps}")
    if args.tol is not None and not args.tol >= 0:  # NaN included: no difference would pass
        raise UserError(f"--tol must be >= 0, got {args.tol}")
    if not args.timeout_s > 0:
        raise UserError(f"--timeout-s must be > 0, got {args.timeout_s}")
    if detect_launcher() != "single":
        raise UserError("run verify as one process (not under torchrun/srun): it launches its own ranks")
    cfg = load_config(config_path, overrides)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dist-train-verify-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, a read-only place
        raise UserError(f"--work-dir {work}: cannot create the folder ({err.strerror or err})") from None
    try:
        report = verify(args, cfg, config_path, overrides, work.absolute())
    except RunFailed as err:
        print(f"dist-train verify: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else render(report, config_path, args.work_dir))
    return 0 if report["passed"] else 1
