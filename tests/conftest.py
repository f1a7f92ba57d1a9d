"""Suite-wide guards."""

import os
import signal

import pytest


def pytest_configure(config):
    """The launchers' Ctrl-C tests need their commands to start with SIGINT's default action, as a
    terminal's foreground job does. A suite started in the background by a shell without job control
    (`(make test &)`) inherits SIGINT ignored, and every command it starts would inherit that too (a
    SIGINT to spawn.py then did nothing: the run trained to the end, status 0)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Each file's wall time in seconds, measured in the whole suite on three pytest-xdist workers on a
# 2-core VM. The workers take whole files (--dist loadfile) in collection order (the Makefile passes
# --no-loadscope-reorder), so the longest go first and the short ones fill in at the end: ordered by
# their number of tests instead, the suite ended on the longest file alone. A file not listed goes last.
FILE_SECONDS = {
    "test_runtime.py": 650,
    "test_bench.py": 460,
    "test_strategies.py": 389,
    "test_tools.py": 287,
    "test_resume.py": 279,
    "test_slurm.py": 209,
    "test_checkpoint.py": 88,
    "test_slurm_submit.py": 76,
    "test_loop_edges.py": 76,
    "test_fused_loss.py": 73,
    "test_parity.py": 60,
    "test_config.py": 48,
    "test_hot_loop.py": 30,
    "test_hf.py": 30,
    "test_grad_checkpointing.py": 24,
    "test_misfit.py": 21,
    "test_qat.py": 18,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's own order is kept


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(autouse=True)
def no_launcher_variables_leak():
    """A test that leaves RANK/MASTER_ADDR/... in os.environ makes every later subprocess believe it
    runs under a launcher (and hang waiting for a rendezvous): fail the test that leaked them."""
    before = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    leaked = {name: value for name, value in after.items() if value != before[name]}
    for name in leaked:  # clean up so the rest of the suite still runs
        if before[name] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before[name]
    assert not leaked, f"test leaked launcher variables into os.environ: {leaked}"
