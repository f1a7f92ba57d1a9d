"""First-batch errors: a torch op refusing the batch is a config mistake (one line, exit 2); the
model's own raise, out-of-memory and collective failures are not."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import REPO_ROOT, launch

from dist_train.misfit import ForwardError


def forward_error(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> ForwardError:
    targets = torch.zeros(inputs.shape[0], dtype=torch.long) if targets is None else targets
    try:
        model(inputs)
    except Exception as err:  # noqa: BLE001 - what train_step wraps
        return ForwardError(err, inputs, targets, None)
    raise AssertionError("the forward did not fail")


class Raises(nn.Module):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_an_embedding_index_out_of_range_is_a_misfit_naming_the_batch_and_line():
    err = forward_error(nn.Embedding(10, 4), torch.tensor([[1, 12]]))
    assert err.is_misfit()
    message = str(err.as_user_error())
    assert "failed with IndexError: index out of range in self (at " in message
    assert "inputs (1, 2) int64 in [1, 12], targets (1,) int64 in [0, 0]" in message
    assert "test_misfit.py:" in message and "Check model.* against data.*" in message


def test_a_shape_error_under_torch_compile_reports_the_error_torch_met():
    model = nn.Linear(8, 2)
    model.compile()
    err = forward_error(model, torch.randn(3, 5))
    assert err.is_misfit(), repr(err.error)
    assert "RuntimeError" in str(err.as_user_error()) and "Dynamo" not in str(err.as_user_error())


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("a bug in the model's own code"),
        torch.OutOfMemoryError("CUDA out of memory"),
        dist.DistBackendError("NCCL communicator was aborted"),
    ],
    ids=["model_raise", "oom", "collective"],
)
def test_not_misfits(error):
    assert not forward_error(Raises(error), torch.randn(2, 3)).is_misfit()


@pytest.mark.slow
def test_a_batch_refused_on_one_rank_is_said_by_that_rank_and_the_peer_fails_on_the_connection(tmp_path):
    """Rank 1's targets exceed the model's classes: rank 1 says so in one line (status 2); rank 0,
    left waiting in the gradient all-reduce, fails on the broken connection and is not reported as a
    misfit of its own (its batch was fine)."""
    config = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 8, "num_classes": 4},
        "data": {"name": "userpkg.broken:data_bad_on_rank_1"},
        "train": {"max_steps": 2, "micro_batch_size": 8},
        "log": {"plot": False},
    }
    proc = launch(
        config, tmp_path, nproc=2, launcher="torchrun", env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    )
    assert proc.returncode != 0
    misfits = [line for line in proc.stderr.splitlines() if line.startswith("dist_train: error:")]
    assert len(misfits) == 1 and "targets (8,) int64 in [7, 7], model outputs (8, 4)" in misfits[0], proc.stderr
    assert f"  traceback : {misfits[0]}" in proc.stderr.splitlines()  # torchrun's summary, from the error file
    assert "rank 0 failed at step 1" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_compiled_losss_bounds_check_is_a_misfit():
    """Under train.compile the loss is a generated kernel: its index check is torch's, not the model's."""
    from dist_train.losses import build_loss

    torch._dynamo.reset()  # a fresh compile: earlier tests may have used up the recompiles of Loss.sum
    loss = build_loss("cross_entropy").compiled()
    outputs, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 7, 0, 1, 2, 3])
    try:
        loss.sum(outputs, targets)
    except RuntimeError as err:
        assert "index out of bounds" in str(err)  # the generated kernel's check, not eager torch's IndexError
        error = ForwardError(err, torch.randn(8, 32), targets, outputs)
    else:
        raise AssertionError("the compiled loss took class 7 of 4")
    assert error.is_misfit()
    message = str(error.as_user_error())
    assert "targets (8,) int64 in [0, 7], model outputs (8, 4)" in message and "losses.py:" in message
