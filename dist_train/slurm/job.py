"""What the batch scripts in slurm/ call inside a job: the run's output folder and torchrun.

`dist-train slurm output-dir CONFIG [KEY=VALUE ...]` checks the config (a bad one fails the job
at once, with exit status 2 and nothing requeued) and prints the folder the job writes to.

`dist-train slurm torchrun ARGS` is torchrun (same arguments) for the one task per node of a batch
job. Plain torchrun breaks preemption twice: `scancel --signal=USR1` and `--signal=USR1@T` signal
every process of the job step and torchrun's agent dies of SIGUSR1 (default action, taking the
ranks with it), and a rank that stops after its checkpoint exits 75, which the agent reports as a
failure (status 1). Here the agent ignores SIGUSR1 and exits 75 when the ranks did.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ..cli import ArgParser
from ..errors import UserError


def output_dir_for_job(config_output_dir: str, overrides: list[str], job_id: str | None) -> str:
    """`run.output_dir=...` given on the command line wins; else the config's folder / job id.

    Keyed by the job id, a requeued job (same id) writes to, and resumes from, the same folder,
    and every new submission starts a fresh run.
    """
    if any(item.startswith("run.output_dir=") for item in overrides):
        return config_output_dir
    if not job_id:
        raise UserError("not inside a SLURM job (SLURM_JOB_ID is unset): pass --job-id or run.output_dir=...")
    return str(Path(config_output_dir) / job_id)


def output_dir_main(argv: list[str]) -> int:
    from ..config import load_config

    parser = ArgParser(prog="dist-train slurm output-dir", description=output_dir_for_job.__doc__)
    parser.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID"), help="default: $SLURM_JOB_ID")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(output_dir_for_job(cfg.run.output_dir, args.overrides, args.job_id))
    return 0


def torchrun_main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from ..control import EXIT_PREEMPTED

    # The ranks inherit the ignore until dist_train installs its stop handler: a USR1 that comes
    # while they start up is dropped (the batch script sends it again) instead of killing them.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run(parse_args(argv))
    except SignalException as err:  # SIGTERM (scancel, time limit): the agent passed it on and waited
        print(f"dist_train: torchrun stopped by {err.sigval.name}; the ranks checkpoint on it", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        # Once one rank has exited, the agent terminates the others: they show as killed by a signal
        # (negative code). A rank exits 75 only after the checkpoint's closing barrier, when every
        # rank has saved, so ranks killed after that lose nothing.
        exited = {failure.exitcode for failure in err.failures.values() if failure.exitcode >= 0}
        if exited == {EXIT_PREEMPTED}:
            print(
                f"dist_train: the ranks stopped after their checkpoint (exit status {EXIT_PREEMPTED})", file=sys.stderr
            )
            return EXIT_PREEMPTED
        if exited == {2}:
            return 2  # a bad config or command line: the ranks printed their one-line error
        print(err.format_msg(), file=sys.stderr)
        return 1
    return 0
