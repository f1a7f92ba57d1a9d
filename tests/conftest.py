"""Suite-wide guards."""

import os

import pytest

# Each file's wall time in seconds, measured in the whole suite on three pytest-xdist workers on a
# 2-core VM. The workers take whole files (--dist loadfile) in collection order (the Makefile passes
# --no-loadscope-reorder), so the longest go first and the short ones fill in at the end: ordered by
# their number of tests instead, the suite ended on the longest file alone. A file not listed goes last.
FILE_SECONDS = {
    "test_strategies.py": 1191,
    "test_runtime.py": 643,
    "test_bench.py": 466,
    "test_resume.py": 379,
    "test_tools.py": 336,
    "test_parity.py": 247,
    "test_loop_edges.py": 199,
    "test_slurm.py": 165,
    "test_fused_loss.py": 145,
    "test_checkpoint.py": 123,
    "test_slurm_submit.py": 73,
    "test_config.py": 58,
    "test_hf.py": 35,
    "test_hot_loop.py": 26,
    "test_qat.py": 21,
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
