"""What the batch scripts in slurm/ call inside a job: the run's output folder and torchrun.

`dist-train slurm output-dir CONFIG [KEY=VALUE ...]` checks the config (a bad one fails the job
at once, with exit status 2 and nothing requeued) and prints the folder the job writes to.

`dist-train torchrun ARGS` (also `dist-train slurm torchrun`) is torchrun with the same arguments,
made to stop the way every other launcher does. Plain torchrun breaks a stop three ways: its agent
dies of SIGUSR1 (default action, taking the ranks with it) when `scancel --signal=USR1` signals every
process of a job step; on SIGTERM it terminates the ranks itself (30 s, then SIGKILL) and exits 1;
and a rank that stops after its checkpoint exits 75, which the agent reports as a failure (1), or
restarts under --max-restarts. Here the agent passes SIGTERM and SIGUSR1 on to its ranks (which
checkpoint and exit 75) and exits with the ranks' 75 (never restarting them) or 2.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
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
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(output_dir_for_job(cfg.run.output_dir, args.overrides, args.job_id))
    return 0


def _children(pid: int) -> list[int]:
    """Linux: the processes whose parent is `pid` (the agent's ranks)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def _forward_stop_signals_to_ranks() -> None:
    """SIGTERM and SIGUSR1 to the agent go to its ranks; the agent keeps waiting for them.

    torchrun starts each rank in a session of its own, so a signal to the agent (or its process
    group) reaches no rank unless passed on, and the agent's own SIGTERM shutdown is turned off
    (torchrun's --signals-to-handle). Both signals are blocked before any thread or rank exists and
    taken by one relay thread (sigwait). The ranks inherit the block: a signal that comes while a
    rank imports is held until dist_train's stop handler takes it (`catch_stop_signals_early`
    unblocks), instead of killing the rank; one that comes before the ranks exist waits for them.
    """
    agent, stop = os.getpid(), {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    # torchrun's --signals-to-handle (PET_ from the environment) becomes TORCHELASTIC_SIGNALS_TO_HANDLE
    for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        os.environ[name] = "SIGINT,SIGHUP,SIGQUIT"

    def relay() -> None:
        while True:
            signum = signal.sigwait(stop)
            while not (ranks := _children(agent)):
                time.sleep(0.2)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    threading.Thread(target=relay, name="stop-signal-relay", daemon=True).start()


def _no_restart_after_a_stop() -> None:
    """A rank that stopped after its checkpoint (75) ends the agent's run, --max-restarts or not; so
    does a config error (2), which every restart would meet again.

    torchrun's agent restarts a worker group that failed while restarts are left, and a rank's 75 is a
    failure to it: the stopped ranks would resume and train on until the scheduler kills the job,
    which a preemption then never requeues. The agent's own check of its ranks disables restarts the
    same way (torchrun's wedged-worker case)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from ..cli import EXIT_USAGE
    from ..control import EXIT_PREEMPTED

    monitor = LocalElasticAgent._monitor_workers

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if any(failure.exitcode in (EXIT_PREEMPTED, EXIT_USAGE) for failure in result.failures.values()):
            self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = _monitor_workers


def torchrun_main(argv: list[str]) -> int:
    _forward_stop_signals_to_ranks()  # first: a stop signal during the imports below is kept too
    # c10d rendezvous: a fresh store per round. A shared one keeps the earlier rounds' keys, and the
    # restart count that would tell them apart differs between nodes (see distributed.rendezvous_store).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from ..control import EXIT_PREEMPTED

    _no_restart_after_a_stop()
    sys.argv[0] = "dist-train torchrun"  # torchrun's own --help names the command typed
    parser = get_args_parser()
    parser.error = ArgParser.error.__get__(parser)  # a bad command line: one line and status 2, no usage
    args = parser.parse_args(argv)
    # torchrun's agent checks these with a bare AssertionError (a traceback with status 1, no message)
    if args.nproc_per_node.lstrip("-").isdigit() and int(args.nproc_per_node) < 1:
        raise UserError(f"dist-train torchrun: --nproc_per_node must be >= 1, got {args.nproc_per_node}")
    if not args.monitor_interval > 0:
        raise UserError(f"dist-train torchrun: --monitor-interval must be > 0, got {args.monitor_interval}")
    try:
        run(args)
    except (ValueError, RuntimeError, AssertionError) as err:
        if "EADDRINUSE" in str(err):  # the agent's rendezvous store: another job listens on that port
            port = re.search(r"port: (\d+)", str(err))
            raise UserError(
                f"dist-train torchrun: port {port.group(1) if port else '?'} is in use on this machine "
                "(another torchrun?): give a free --master_port (or --rdzv_endpoint HOST:PORT), or --standalone"
            ) from None
        if not _raised_by_torchrun_arguments(err):
            raise
        raise UserError(f"dist-train torchrun: {err} (see `dist-train torchrun --help`)") from None
    except SignalException as err:  # SIGINT/SIGHUP/SIGQUIT: the agent ended the ranks itself
        print(f"dist_train: torchrun stopped by {err.sigval.name}", file=sys.stderr)
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


def _raised_by_torchrun_arguments(err: Exception) -> bool:
    """Whether torchrun's own argument checks raised `err` (`--nproc_per_node=x`, `--max-restarts=-1`),
    before any rank started: those are raised in torch/distributed/run.py itself."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).match("torch/distributed/run.py")
