"""Control plane: preemption signals, stop agreement across ranks, the hang watchdog, and a
CPU (gloo) process group with an explicit timeout for checkpoint coordination.

Signal handlers only set a flag. Whether to stop is decided at an optimizer-step boundary by a
collective, so every rank stops after the same step and saves the same checkpoint (saving inside
a handler is a known source of broken checkpoints).
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DistContext

log = logging.getLogger("dist_train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = (
    75  # documented exit status of a run stopped by SIGTERM/SIGUSR1 after its checkpoint (EX_TEMPFAIL: retry)
)


VOTE_PERIOD_S = 0.25  # aim for one stop vote about every quarter second (see Control.should_stop)
MAX_VOTE_INTERVAL = 100  # steps

_early_signal: list[int] = []  # process-wide, like the signal dispositions it stands for


def catch_stop_signals_early() -> None:
    """Flag-only SIGTERM/SIGUSR1 handlers from process start, before the process group and the
    model exist: a preemption signal during start-up is remembered (and acted on at the first step
    boundary) instead of killing the rank or being lost. `Control.install` takes over.
    """

    def remember(signum: int, frame: Any) -> None:
        if not _early_signal:
            _early_signal.append(signum)

    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, remember)
        except ValueError:  # not the main thread
            return
    # `dist-train torchrun` starts its ranks with SIGUSR1 blocked: one sent during start-up waits
    # for this handler (and is taken now) instead of killing the rank.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Control:
    WATCHDOG_GRACE_S = 30.0  # the watchdog waits dist.timeout_s + this: a collective's own timeout speaks first

    def __init__(self, ctx: DistContext, timeout_s: float, save_timeout_s: float):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}
        self._mask: set[int] | None = None  # the signal mask before `install` blocked the stop signals
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._steps_to_vote, self._steps_since_vote, self._voted_at = 1, 1, 0.0  # vote at the first boundary
        self._vote_waited = False  # the next vote is waited on at once (after an evaluation: vote_after_pause)
        self._default_armed_at: float | None = None  # monotonic time of the last default arm_watchdog()
        # A separate gloo group bounds the wait of ranks that idle while rank 0 writes a checkpoint,
        # and lets the stop vote run on the CPU without touching the accelerator stream.
        self.group = None
        if ctx.is_distributed:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=save_timeout_s))

    # --- signals -------------------------------------------------------------------------------
    def install(self) -> None:
        """Flag-only handlers, and the stop signals blocked in this thread until `restore`.

        A process the rank starts while it trains inherits the block: the C++ compiler that
        torch.compile runs (a recompilation at the first evaluation, say), loader workers. torchrun's
        shutdown and SLURM signal every process of the job, and a compiler killed by that SIGTERM
        failed the rank (status 1, `CppCompileError`) instead of letting it checkpoint and exit 75.
        A blocked signal stays pending until `should_stop` takes it, at the next step boundary (or is
        taken at once by a thread that does not block it, such as gloo's).
        """
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): signals stay as they were
                return
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if self.signal_received is None and _early_signal:
            self.signal_received = _early_signal[0]  # arrived during start-up

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_received is None:
            self.signal_received = signum  # a second signal during the save changes nothing

    def _take_pending(self) -> None:
        """Let a stop signal held pending by `install`'s block reach the handler (which runs before
        pthread_sigmask returns), then block again."""
        if self._mask is not None and not signal.sigpending().isdisjoint(STOP_SIGNALS):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def restore(self) -> None:
        if self._mask is not None:  # a signal still pending goes to our handler, not the previous one
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Collective: True on every rank iff some rank had a stop signal by the previous vote.

        The vote is asynchronous: the all-reduce launched at one vote is waited on at the next, so
        it overlaps whole steps and costs no stall. Votes are about VOTE_PERIOD_S apart, not every
        step: each gloo all-reduce costs ~0.2-1 ms of CPU (worker-thread wake-ups), 5% of a 20 ms
        step. Every rank must vote at the same steps, so the interval (in steps) travels with the
        vote: each rank proposes one from its own step time, and the smallest proposal of vote k
        sets the steps between votes k+1 and k+2. A signal is acted on within two intervals, and at
        the first boundary after an evaluation (`vote_after_pause`).
        """
        self._take_pending()
        if not self.ctx.is_distributed or self.ctx.world_size == 1:
            return self.signal_received is not None
        self._steps_to_vote -= 1
        if self._steps_to_vote > 0 and not self._vote_waited:
            return False
        decided, interval = False, 1
        if self._pending is not None:
            decided, interval = self._result(*self._pending)
        now = time.perf_counter()
        per_step = (now - self._voted_at) / self._steps_since_vote if self._voted_at else VOTE_PERIOD_S
        proposal = max(1, min(MAX_VOTE_INTERVAL, int(VOTE_PERIOD_S / max(per_step, 1e-6))))
        flag = torch.tensor([int(self.signal_received is not None), -proposal], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        if self._vote_waited:  # this vote decides now, with the signals received up to here
            self._vote_waited = False
            stop, interval = self._result(*self._pending)
            decided, self._pending = decided or stop, None
        self._voted_at, self._steps_since_vote, self._steps_to_vote = now, interval, interval
        return decided

    @staticmethod
    def _result(work: Any, flag: torch.Tensor) -> tuple[bool, int]:
        """(some rank had a stop signal, the agreed steps to the next vote) of a launched vote."""
        work.wait()
        stop, negative_interval = flag.tolist()  # CPU tensor on the gloo group: no device sync
        return bool(stop), -negative_interval

    def vote_after_pause(self) -> None:
        """Make the next `should_stop` vote at once and wait for it. Called after an evaluation, at the
        same step on every rank: the interval between votes counts training steps, and an evaluation
        inside it (seconds, or minutes) made a stop signal wait for several more evaluations (2 ranks,
        1 s evaluations every 5 steps: stopped 4-7 s and up to 5 evaluations after the signal). One
        blocking all-reduce after an evaluation costs nothing next to it."""
        self._vote_waited = True

    def finish_vote(self) -> None:
        """Drain the outstanding vote so no collective is left in flight at teardown."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    # --- coordination ----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # --- watchdog ----------------------------------------------------------------------------------
    def arm_watchdog(self, seconds: float | None = None) -> None:
        """If this rank makes no progress for `seconds`, dump every thread's stack and exit.

        A rank stuck outside a collective (a hung data loader, a deadlock in user code) would
        otherwise wait forever while its peers time out; this ends it with its stack on stderr.
        The default timeout is re-armed at most once a second: each call restarts faulthandler's
        timer thread, which cost 0.05-0.8 ms per optimizer step on a busy 2-core machine.
        """
        now = time.monotonic()
        if seconds is None and self._default_armed_at is not None and now - self._default_armed_at < 1.0:
            return
        faulthandler.dump_traceback_later(seconds or self.timeout_s + self.WATCHDOG_GRACE_S, exit=True, file=sys.stderr)
        self._default_armed_at = now if seconds is None else None

    def disarm_watchdog(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._default_armed_at = None
