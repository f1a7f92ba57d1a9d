"""SyncBatchNorm that works on any device and backend (gloo on CPU included), plus a converter.

`torch.nn.SyncBatchNorm` refuses CPU tensors, so on anything but CUDA we use our own: each rank reduces
its per-channel sum, sum of squares and element count, and ONE all-reduce makes them global.

Gradient convention (the same as torch's SyncBatchNorm): backward all-reduces (SUM) the per-channel
sums of grad_out and grad_out * x_hat, so each rank's input gradient is that of the SUM of all ranks'
losses; the weight and bias gradients are this rank's local sums. Why that is right under DDP, which
AVERAGES gradients over W ranks: with a mean loss, rank r's loss is L_r = mean over its b samples and
the global loss over W*b samples is L = (1/W) * sum_r L_r. Summed grad sums give every rank
d(sum_r L_r)/dx = W * dL/dx, whose contribution DDP then divides by W, and the local weight/bias sums
add up over ranks to d(sum_r L_r)/dweight, which DDP also divides by W. So N ranks under DDP match one
process on the N*b batch. (Equivalently: the sum over ranks of the local weight grads is the
single-process gradient of the summed loss, which is what the tests check.)

Eval mode uses the running statistics and never communicates. As in torch, eval with
track_running_stats=False normalises with local batch statistics: a collective in eval would hang when
only some ranks evaluate (e.g. rank 0 alone).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _stats_dtype(device: torch.device) -> torch.dtype:
    """Dtype in which per-rank statistics are combined: float64, except on MPS which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the elementwise normalisation: at least float32, as torch's BatchNorm kernels compute
    bf16/fp16 inputs (a mean rounded to bf16 before the subtraction is off by up to |mean| / 256)."""
    return torch.promote_types(x.dtype, torch.float32)


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against x: (1, C, 1, ...)."""
    return (1, x.size(1)) + (1,) * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalise with global statistics; backward all-reduces the two per-channel gradient sums at once."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: float,
        group: Any,
    ) -> Tensor:
        shape, compute = _channel_shape(x), _compute_dtype(x)
        out = (x.to(compute) - mean.to(compute).view(shape)) * invstd.to(compute).view(shape)
        if weight is not None:
            out = out * weight.to(compute).view(shape)
        if bias is not None:
            out = out + bias.to(compute).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        shape, dims, compute = _channel_shape(x), [0, *range(2, x.dim())], _compute_dtype(x)
        x_hat = (x.to(compute) - mean.to(compute).view(shape)) * invstd.to(compute).view(shape)
        grad_out = grad_out.to(compute)
        sum_dy = grad_out.sum(dims, dtype=mean.dtype)
        sum_dy_xhat = (grad_out * x_hat).sum(dims, dtype=mean.dtype)

        # Local sums: DDP averages them over ranks like any other parameter gradient (module docstring).
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None  # a bias implies a weight

        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / ctx.count).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_input = (
                (grad_out - mean_dy.to(compute).view(shape) - x_hat * mean_dy_xhat.to(compute).view(shape))
                * scale.to(compute).view(shape)
            ).to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole process group, for inputs (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W).

    Outside training, without torch.distributed, or in a group of one rank it is plain BatchNorm.
    Ranks may hold different batch sizes, zero included: the element counts are all-reduced too.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(
                "SyncBatchNorm expects input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); "
                f"got shape {tuple(input.shape)}"
            )

    def _needs_sync(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self._needs_sync():
            return super().forward(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"SyncBatchNorm expects {self.num_features} channels, got input shape {tuple(input.shape)}"
            )
        mean, var, count = self._global_stats(input)
        if count <= 1:
            raise ValueError(
                f"SyncBatchNorm needs more than 1 value per channel when training; the group has {count:g}"
            )
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, invstd, count, self.process_group)

    @torch.no_grad()
    def _global_stats(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """Global per-channel mean and biased variance, and the global element count per channel."""
        acc = _stats_dtype(x.device)
        local_count = x.numel() // x.size(1)
        if local_count > 0:
            # Local var_mean is accurate in the input precision; rebuilding sum and sum of squares from it
            # in float64 avoids the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
            var, mean = torch.var_mean(
                x if x.element_size() >= 4 else x.float(), dim=[0, *range(2, x.dim())], correction=0
            )
            mean, var = mean.to(acc), var.to(acc)
            sums = torch.cat([mean * local_count, (var + mean * mean) * local_count])
        else:
            sums = torch.zeros(2 * x.size(1), dtype=acc, device=x.device)
        stats = torch.cat([sums, torch.tensor([local_count], dtype=acc, device=x.device)])
        dist.all_reduce(stats, group=self.process_group)  # the one collective of the forward pass
        count = stats[-1].item()  # a host sync, but the count is needed on the host (check, unbiasing)
        mean = stats[: x.size(1)] / count
        var = (stats[x.size(1) : -1] / count - mean * mean).clamp_min(0)
        return mean, var, count

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        """Same update as torch's BatchNorm: momentum=None is a cumulative average; the variance is unbiased."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_var = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


_BATCHNORM_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def check_convertible(module: nn.Module) -> None:
    """Refuse a BatchNorm subclass whose own forward or state the conversion would drop (the converted
    layer is a plain SyncBatchNorm: a `scale` buffer gone from the weights, an overridden forward not run)."""
    from .errors import UserError

    for name, bn in module.named_modules():
        if not isinstance(bn, _BATCHNORM_TYPES) or type(bn) in _BATCHNORM_TYPES:
            continue
        dropped = ["its forward"] if type(bn).forward is not _BatchNorm.forward else []
        dropped += [f"`{key}`" for key in sorted({*bn._parameters, *bn._buffers} - _BATCHNORM_STATE)]
        if dropped:
            base = next(cls for cls in _BATCHNORM_TYPES if isinstance(bn, cls)).__name__
            raise UserError(
                f"train.sync_batchnorm replaces {name or 'the model'} ({type(bn).__name__}, a subclass of {base}) "
                f"with a plain synchronised BatchNorm, which would drop {' and '.join(dropped)}: make it a "
                f"torch.nn.{base} or set train.sync_batchnorm=false"
            )


def convert_sync_batchnorm(module: nn.Module, device_type: str, process_group: Any | None = None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module`: torch's SyncBatchNorm on CUDA, ours elsewhere (where
    a torch SyncBatchNorm the model holds, which DDP refuses off CUDA, becomes ours too, in its group).

    Parameters and buffers are moved over as the same tensors (as torch's converter does), so values,
    requires_grad flags and any optimizer references stay intact; training mode is kept. A subclass
    with its own forward, parameters or buffers is refused (UserError): the conversion would drop them.
    """
    check_convertible(module)
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group: Any | None) -> nn.Module:
    converted = module
    if isinstance(module, (*_BATCHNORM_TYPES, nn.SyncBatchNorm)):  # torch's own refuses CPU tensors: ours too
        group = getattr(module, "process_group", None)
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group if group is None else group,
            bias=module.bias is not None,
        )
        # Fresh tensors from __init__ are dropped; the original ones carry values, dtype, device and flags.
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, process_group))
    return converted
