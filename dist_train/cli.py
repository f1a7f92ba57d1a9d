"""Command line: `dist-train [train] --config FILE [KEY=VALUE ...]` and the tool sub-commands.

Every mistake a user can fix becomes one line on stderr starting `dist_train: error:` and exit
status 2, with no traceback. A failed run exits 1 (the message names the rank and step); a run
stopped by SIGTERM/SIGUSR1 after writing its checkpoint exits 75 (EXIT_PREEMPTED).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__
from .errors import UserError, on_every_rank

EXIT_USAGE = 2
# sub-command -> "module:function"; each function takes the remaining argv and returns an exit status
SUBCOMMANDS = {
    "train": "dist_train.cli:run_train",
    "plot": "dist_train.cli:run_plot",
    "check": "dist_train.tools.check:main",
    "doctor": "dist_train.tools.doctor:main",
    "verify": "dist_train.tools.verify:main",
    "slurm": "dist_train.slurm:main",
    "torchrun": "dist_train.slurm.job:torchrun_main",
}
SUBCOMMAND_HELP = """sub-commands (dist-train COMMAND --help):
  train     the default: train as configured (what `dist-train --config ...` runs)
  check     what a config will do: sizes, batch, LR schedule, memory, pitfalls
  doctor    the machine and the process group: devices, backends, collectives bandwidth
  verify    short parity runs on your config: N ranks vs 1, accumulation, resume
  plot      draw a run's metrics.jsonl to metrics.png
  torchrun  torchrun with the same arguments, passing exit statuses 2 and 75 through
  slurm     submit | torchrun | output-dir for SLURM batch jobs"""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # argparse would print usage + exit 2; we want one line
        raise UserError(f"{message} (see `{self.prog} --help`)" if " " in self.prog else message)


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = ArgParser(
        prog=prog,
        description="Train as configured; KEY=VALUE overrides use dotted YAML paths.",
        epilog=SUBCOMMAND_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dist-train {__version__}")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=3e-4 strategy.name=ddp")
    return parser


def run_train(argv: list[str]) -> int:
    # A stop signal while this rank reads its config and imports torch (seconds) waits, blocked, for
    # the stop handler below instead of being dropped (ignored, as srun.sbatch starts its ranks) or
    # killing the rank; `dist-train torchrun` starts its ranks with both blocked already.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
    from .config import load_config

    try:
        args = _train_parser("dist-train train").parse_intermixed_args(argv)
        cfg = load_config(args.config, args.overrides)
    except UserError as err:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # as it was, for a caller in this process
        raise on_every_rank(err) from None  # every rank parsed the same command line and file

    from .control import EXIT_PREEMPTED, catch_stop_signals_early

    catch_stop_signals_early()
    from .distributed import JoinError, init_distributed, teardown
    from .logging_setup import setup_logging
    from .trainer import TrainingError, train

    # for the log lines before the process group: a malformed RANK is init_distributed's one-line error
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    rank, world = (int(rank), int(world)) if rank.isdigit() and world.isdigit() else (0, 1)
    log = setup_logging(rank, world)
    ctx = None
    try:
        ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        setup_logging(ctx.rank, ctx.world_size)
        result = train(cfg, ctx)
        return EXIT_PREEMPTED if result["status"] == "preempted" else 0
    except TrainingError as err:
        log.error("%s", err, exc_info=err.__cause__ is not None)
        record_for_torchrun(str(err))
        return 1
    except JoinError as err:
        log.error("%s", err)
        record_for_torchrun(str(err))
        return 1
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - any other failure: name the rank, keep the traceback
        log.exception("rank %d failed: %s: %s", ctx.rank if ctx else rank, type(err).__name__, err)
        record_for_torchrun(f"rank {ctx.rank if ctx else rank} failed: {type(err).__name__}: {err}")
        return 1
    finally:
        teardown(ctx)


def run_plot(argv: list[str]) -> int:
    from pathlib import Path

    from .plots import plot_metrics

    parser = ArgParser(prog="dist-train plot", description="Plot a run's metrics.jsonl to metrics.png.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    metrics = Path(args.run_dir) / "metrics.jsonl"
    try:
        found = metrics.is_file()
    except PermissionError as err:  # a run in a folder this user may not enter (another user's)
        raise UserError(f"cannot read {metrics} ({err.strerror})") from None
    if not found:
        raise UserError(f"{args.run_dir} has no metrics.jsonl: give a run's output folder")
    out = plot_metrics(args.run_dir, args.out)
    if out is None:
        raise UserError("plotting needs matplotlib: pip install 'dist-train[plot]'")
    print(out)
    return 0


def record_for_torchrun(message: str) -> None:
    """Under torchrun, write why this rank failed to its TORCHELASTIC_ERROR_FILE, in the format of torch's
    own `@record`: the agent's failure summary shows the line (`traceback : dist_train: error: ...`; the
    rank's log above it has the traceback) instead of `To enable traceback see: https://pytorch.org/...`,
    and passes it on to the error file of whatever started torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as file:
            json.dump({"message": record}, file)
    except OSError:
        pass  # the summary then reads as without it


def exit_with(code: int) -> None:
    """Flush and leave without interpreter teardown.

    Background threads of c10d/gloo (and DeepSpeed) can abort at static destruction ("terminate
    called without an active exception", SIGABRT) after the process group is gone, which would turn
    a finished run's exit status into 134. Our own state is closed explicitly before this point.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_script() -> None:
    """Entry point of the `dist-train` console script."""
    exit_with(main())


def _local_rank() -> int:
    """This process's local rank, also before direct srun's variables became torchrun's (a config
    error is raised before the process group exists): one line per node, not one per task."""
    if "LOCAL_RANK" in os.environ or "SLURM_LOCALID" not in os.environ:
        local_rank = os.environ.get("LOCAL_RANK", "0")
        return int(local_rank) if local_rank.isdigit() else 0  # a malformed one is init_distributed's error
    from .distributed import detect_launcher

    return int(os.environ["SLURM_LOCALID"]) if detect_launcher() == "srun" else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            command, rest = argv[0], argv[1:]
        elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
            raise UserError(f"unknown sub-command `{argv[0]}`: choose one of {', '.join(SUBCOMMANDS)} (see --help)")
        else:
            command, rest = "train", argv
        from .imports import import_object

        return import_object(SUBCOMMANDS[command], "sub-command")(rest)
    except UserError as err:
        if not err.same_on_every_rank or _local_rank() == 0:
            sys.stderr.write(f"dist_train: error: {err}\n")  # one write: ranks sharing a terminal cannot split it
        record_for_torchrun(f"dist_train: error: {err}")  # every rank's: a quiet one's too
        return EXIT_USAGE
    except KeyboardInterrupt:
        logging.getLogger("dist_train").error("interrupted")
        return 130


if __name__ == "__main__":  # `python -m dist_train.cli` works like `python -m dist_train`
    exit_with(main())
