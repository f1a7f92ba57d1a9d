"""Suite-wide guards."""

import os

import pytest

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
