"""A training batch that torch refuses for the model or the loss: on a run's first step, a config mistake.

`model.*` and `data.*` are written separately, so they can disagree: a vocabulary larger in the data
than in the model, more classes in the targets than the model outputs, another input width. Torch
meets these inside the first forward or loss (an IndexError from an embedding, a shape error from a
matmul, "Target 6 is out of bounds" from cross-entropy; under torch.compile, the error tracing met
or the generated kernel's bounds check). `train_step` wraps what the forward and the loss raise in
`ForwardError`; on the first step of a process the loop turns one that torch's own code raised into
a one-line UserError (exit status 2) that names the model's line and the batch, with nothing
trained or saved. An error the model's own code raises keeps its traceback (a bug, not a config),
as do later steps, out-of-memory, collective and compiler failures. With several ranks, a rank
whose peer stopped this way fails on the broken connection (status 1), the peer says why.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError

FORWARD_ERRORS = (IndexError, ValueError, TypeError, RuntimeError)
_NOT_MISFITS = ("BackendCompilerFailed", "InternalTorchDynamoError")  # torch.compile's own failures
_TORCH_DIR = str(Path(torch.__file__).parent)
_DISTRIBUTED_DIR = str(Path(dist.__file__).parent)
_TRAINER = str(Path(__file__).with_name("trainer.py"))
_FUSED_LOSS = str(Path(__file__).with_name("fused_loss.py"))  # train.fused_loss: torch's loss, chunked
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')  # torch.compile's "from user code:" lines


def require_tensor_outputs(outputs: object) -> None:
    """The loss takes a tensor: a forward that returns a dict, a tuple or a ModelOutput is a UserError
    (the run's first step and `dist-train check`)."""
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            f"the model's forward returned a {type(outputs).__name__}, not a tensor: return the "
            "outputs the loss takes (the logits or predictions, e.g. `return out['logits']`)"
        )


class ForwardError(Exception):
    """The forward or loss of a micro-batch raised `error` (also the __cause__)."""

    def __init__(self, error: Exception, inputs: torch.Tensor, targets: torch.Tensor, outputs: object):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.inputs, self.targets, self.outputs = error, inputs, targets, outputs

    def root(self) -> BaseException:
        """The error itself; under torch.compile, the one torch met while tracing the batch."""
        error: BaseException = self.error
        while _is_dynamo(error) and (error.__cause__ or error.__context__) is not None:
            error = error.__cause__ or error.__context__
        return error

    def is_misfit(self) -> bool:
        """Torch's own code refused the batch: not the model's own raise, nor memory, collectives or compiler."""
        error = self.root()
        oom, dist_error = getattr(torch, "OutOfMemoryError", ()), getattr(dist, "DistError", ())
        if isinstance(error, (oom, dist_error)) or type(error).__name__ in _NOT_MISFITS:
            return False
        frames = traceback.extract_tb(self.error.__traceback__) + traceback.extract_tb(error.__traceback__)
        if any(f.filename.startswith(_DISTRIBUTED_DIR) for f in frames):  # a collective failed (a peer left)
            return False
        inner = traceback.extract_tb(error.__traceback__)
        return bool(inner) and _in_torch(inner[-1].filename)

    def as_user_error(self, batch: str = "the first training batch") -> UserError:
        error = self.root()
        first_line = (str(error).strip().splitlines() or [""])[0].rstrip(".")
        parts = [f"inputs {describe(self.inputs)}", f"targets {describe(self.targets)}"]
        if isinstance(self.outputs, torch.Tensor):
            parts.append(f"model outputs {tuple(self.outputs.shape)}")
        return UserError(
            f"the model does not fit the data: {batch} failed with {type(error).__name__}: "
            f"{first_line}{where(self.error)}; batch: {', '.join(parts)}. Check model.* against data.* "
            "(input size, vocabulary size, sequence length, number of classes), or the model's code at that line"
        )


def _is_dynamo(error: BaseException) -> bool:
    return any(cls.__name__ == "TorchDynamoException" for cls in type(error).__mro__)


def _in_torch(filename: str) -> bool:
    """torch's installed code, code torch.compile generated (its cache folder), or our fused loss (a
    target id past the vocabulary fails in its gather as in torch's cross_entropy)."""
    if filename.startswith(_TORCH_DIR) or filename == _FUSED_LOSS:
        return True
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older torch: the default folder's name
        return "torchinductor" in filename
    return filename.startswith(cache_dir())


def describe(tensor: object) -> str:
    if not isinstance(tensor, torch.Tensor):
        return type(tensor).__name__
    text = f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
    if tensor.device.type == "cpu" and tensor.numel() and not tensor.is_floating_point():
        text += f" in [{int(tensor.min())}, {int(tensor.max())}]"  # the error path only: no hot-loop sync
    return text


def where(error: BaseException) -> str:
    """` (at FILE:LINE in FUNCTION)`: the innermost frame outside torch and the training loop (the
    model's or the loss's line that made the refused call); under torch.compile the innermost "user
    code" frame torch names in its message; "" when there is none."""
    frames = [
        (f.filename, f.lineno, f.name)
        for f in traceback.extract_tb(error.__traceback__)
        if not _in_torch(f.filename) and not f.filename.endswith(_TRAINER)
    ]
    if _is_dynamo(error):
        traced = _USER_FRAME.findall(str(error))
        frames += [(name, int(line), func) for name, line, func in traced if not _in_torch(name)]
    if not frames:
        return ""
    filename, line, func = frames[-1]
    path = Path(filename)
    try:
        path = path.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return f" (at {path}:{line} in {func})"
