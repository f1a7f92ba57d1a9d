"""A language model's output projection and cross-entropy in one step (`train.fused_loss`), a chunk
of tokens at a time, so that the (tokens, vocabulary) logits never exist whole.

For GPT-2 small at 64 x 1024 tokens per micro-batch, the logits are 65,536 x 50,304: 6.6 GB in
bf16, twice that again for their fp32 copy and gradient. Here each chunk's logits live only while
that chunk is computed: its loss, and its gradients with respect to the hidden states and the
weight, are worked out in the forward pass itself (the softmax minus the one-hot target is the
logits' gradient, known as soon as the logits are); backward only scales them by the incoming
gradient. Same FLOPs as the unfused head (one product forward, two for the gradients), one pass
less over the logits, and memory that does not grow with the batch beyond one chunk.

The loss is the sum over counted tokens, as `losses.Loss.sum` (targets of -100 are ignored), with
label smoothing as torch's `cross_entropy` defines it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import UserError
from .losses import IGNORE_INDEX, check_class_targets

CHUNK_BYTES = 512 * 2**20  # fp32 logits of one chunk; GPT-2's vocabulary: 2,668 tokens, 25 chunks at 65,536


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_BYTES of fp32 logits (at least one token)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _add_at_targets(grad: torch.Tensor, safe: torch.Tensor, value: float) -> torch.Tensor:
    """grad[i, safe[i]] += value, for each row i. Eager: in place, a scatter. Compiled: a comparison with
    the column index, so that Inductor fuses it with the softmax before and the cast after into one pass
    that writes the bf16 gradient alone; a scatter made it write the chunk's fp32 gradient first and read
    it back (on an H100 the fused loss ran 5.8 % slower than the unfused one with the scatter). The same
    fp32 addition on the same element either way: the results are equal, bit for bit."""
    if not torch.compiler.is_compiling():
        return grad.scatter_add_(1, safe, grad.new_full(safe.shape, value))
    columns = torch.arange(grad.shape[1], device=grad.device)
    return torch.where(columns == safe, grad + value, grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, smoothing: float, rows: int):  # (N, d), (V, d), (N,) -> ()
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = weight.shape[0]
        exact = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as the unfused loss's upcast
        total = hidden.new_zeros((), dtype=exact)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], rows):
            x, t = hidden[start : start + rows], targets[start : start + rows]
            logits = x @ weight.t()  # autocast's dtype under autocast, as nn.Linear's
            z = logits.to(exact)
            keep = t != IGNORE_INDEX
            safe = torch.where(keep, t, 0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=1)
            # -log p_t, and label smoothing's share of -mean_c log p_c (torch's definition)
            row_loss = lse - (1.0 - smoothing) * z.gather(1, safe).squeeze(1) - smoothing * z.mean(dim=1)
            total = total + torch.where(keep, row_loss, 0.0).sum()
            if not (want_hidden or want_weight):
                continue
            grad = z.sub_(lse.unsqueeze(1)).exp_()  # the softmax, in z's memory; d loss / d logits is
            # the softmax - (1 - s) one-hot - s / V
            if smoothing:
                grad.sub_(smoothing / vocab)
            grad = _add_at_targets(grad, safe, smoothing - 1.0)
            grad.mul_(keep.unsqueeze(1))
            grad = grad.to(logits.dtype)
            if want_hidden:  # the products in logits' dtype, as nn.Linear's backward under autocast
                grad_hidden[start : start + rows] = (grad @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight.add_(grad.t() @ x)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:  # scaled in fp32 at least: a bf16 scale would be off by up to 0.4 %
            grad_hidden = (grad_hidden * grad_total.to(torch.promote_types(grad_hidden.dtype, torch.float32))).to(
                grad_hidden.dtype
            )
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """sum over counted tokens of cross_entropy(hidden @ weight.T, targets): hidden (..., d), weight
    (V, d), targets (...) of class ids (-100 ignored); a 0-d loss in fp32 (fp64 for fp64 inputs)."""
    check_class_targets(hidden, targets, "cross_entropy (train.fused_loss: the outputs are the model's hidden states)")
    if not torch.is_grad_enabled():  # needs_input_grad would still say yes: the loss alone, one product
        hidden, weight = hidden.detach(), weight.detach()
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    return _LinearCrossEntropy.apply(flat, weight, ids, float(smoothing), chunk_rows(weight.shape[0]))


class LMHead(nn.Linear):
    """A language model's output projection that, given targets, returns the fused loss instead of
    the logits. The loss is computed inside this module's own forward, so a strategy that gathers a
    module's sharded weight around its forward (FSDP2, ZeRO-3) holds the whole weight meanwhile."""

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        if self.bias is not None:
            raise UserError("train.fused_loss: LMHead computes the loss of a projection without bias (bias=False)")
        return linear_cross_entropy(x, self.weight, targets, label_smoothing)
