"""Start N ranks on this machine with torch.multiprocessing.spawn (no torchrun).

    python launch/spawn.py --nproc_per_node 2 --config configs/quickstart.yaml [KEY=VALUE ...]

Nothing is exposed beyond the machine: this parent process hosts the rendezvous store on a
socket it binds to 127.0.0.1 itself (a TCPStore given only MASTER_ADDR=127.0.0.1 still listens
on all interfaces), every rank connects to it as a client (TORCHELASTIC_USE_AGENT_STORE), and
gloo binds its sockets to the loopback interface. SIGTERM/SIGUSR1 sent to this process are
forwarded to every rank, so a preempted job checkpoints. The exit status is the first failing
rank's (2 bad input, 75 stopped by a signal after checkpointing, 1 failure), else 0; SIGINT
(Ctrl-C) stops the ranks without a checkpoint, and the status is 130. With more
than one rank and no OMP_NUM_THREADS set, each rank gets one thread, as torchrun gives them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


# After a rank fails, the others get GRACE_S to exit by themselves, then SIGTERM, then GRACE_S more
# before SIGKILL (torchrun's 30 s): a hung rank's watchdog (dist.timeout_s + 30 s without progress, so
# about 30 s after a peer's collective timed out) dumps its stack and exits within that time.
GRACE_S = 30.0
INTERRUPT_WAIT_S = 2.0  # after a SIGINT, how long the ranks have to exit on their own before they are sent one


def _rank_main(local_rank: int, nproc: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the store lives in the parent: every rank is a client
        DIST_TRAIN_LAUNCHER="spawn",
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from dist_train.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the exit code is what the parent reads


def loopback_store(nproc: int):
    """A TCPStore server listening on 127.0.0.1 only; returns (store, port)."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        nproc,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(minutes=30),
        master_listen_fd=sock.detach(),
        use_libuv=False,
    )
    return store, port


def _interrupted(processes) -> int:
    """SIGINT (Ctrl-C) to this process: the ranks stop without a checkpoint, as `python -m dist_train`
    does, and 130 is returned. A terminal's Ctrl-C reached the ranks too; a SIGINT sent to this process
    alone is passed on to them (they would train on, and this process would wait for them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
    for wait_s, action in ((INTERRUPT_WAIT_S, signal.SIGINT), (GRACE_S, signal.SIGKILL)):
        deadline = time.monotonic() + wait_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, action)
    for process in processes:
        process.join()
    print("dist_train: interrupted (SIGINT): the ranks stopped without a checkpoint", file=sys.stderr)
    return 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, like every dist_train command
        print(f"dist_train: error: {message} (see `python launch/spawn.py --help`)", file=sys.stderr)
        sys.exit(2)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
SAID_WHY = {1, 2, 75, 130}  # the statuses a rank exits with after its own message (dist_train.cli)


def main(argv: list[str] | None = None) -> int:
    # A stop signal during start-up (importing torch, starting the ranks) waits, blocked, until the
    # forwarder below is in place; the ranks inherit the block and take it once their own handler is.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    parser = _Parser(
        prog="python launch/spawn.py",
        usage="%(prog)s [--nproc_per_node N] --config FILE [KEY=VALUE ...]",
        description=__doc__.split("\n\n")[0],
        epilog="Every other argument (--config FILE, dotted KEY=VALUE overrides) goes to each rank as "
        "`python -m dist_train` takes it.",
    )
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1, help="ranks to start")
    args, rest = parser.parse_known_args(argv)
    if args.nproc_per_node < 1:
        print("dist_train: error: --nproc_per_node must be >= 1", file=sys.stderr)
        return 2
    # A Ctrl-C while torch imports waits until the import is done: a KeyboardInterrupt raised inside
    # an extension's import can be swallowed there (a C module that clears a failed optional import),
    # and spawn.py then started, and waited for, ranks that trained to the end (status 0).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    import torch.multiprocessing as mp

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C meanwhile is raised here

    # A failing rank has said why; torch would add a line per sibling it terminates.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    if args.nproc_per_node > 1:  # as torchrun: N ranks x all cores each would oversubscribe the machine
        os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"
    # multiprocessing's resource tracker, started with the first rank, unblocks SIGTERM (and SIGINT)
    # when it is up: the ranks would start with SIGTERM deliverable and die of one while importing.
    # Start it now, keep what it lets through, and block again before any rank starts.
    from multiprocessing import resource_tracker

    held: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    store, port = loopback_store(args.nproc_per_node)
    context = mp.start_processes(
        _rank_main, args=(args.nproc_per_node, port, rest), nprocs=args.nproc_per_node, join=False, start_method="spawn"
    )

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    for signum in held:
        forward(signum, None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that arrived meanwhile is forwarded now
    try:
        # a rank that fails first leaves its siblings GRACE_S to exit by themselves: the one that
        # reports a config mistake (local rank 0) is often not the first to exit
        while not context.join(grace_period=GRACE_S):
            pass
    except KeyboardInterrupt:
        return _interrupted(context.processes)
    except mp.ProcessExitedException as err:
        if err.exit_code is not None and err.exit_code < 0:  # killed: it could not say why (the OOM killer?)
            print(
                f"dist_train: rank {err.error_index} (pid {err.error_pid}) was killed by {err.signal_name}",
                file=sys.stderr,
            )
        elif err.exit_code not in SAID_WHY:  # sys.exit() or os._exit() in user code, a library's exit()
            print(
                f"dist_train: rank {err.error_index} (pid {err.error_pid}) exited with status {err.exit_code}",
                file=sys.stderr,
            )
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    except mp.ProcessRaisedException as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        del store
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while starting up (importing torch): no rank trained yet
        print("dist_train: interrupted (SIGINT): the ranks stopped without a checkpoint", file=sys.stderr)
        sys.exit(130)
