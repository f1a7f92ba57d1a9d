"""First-batch errors: a torch op refusing the batch is a config mistake (one line, exit 2); the
model's own raise, out-of-memory and collective failures are not."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

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
