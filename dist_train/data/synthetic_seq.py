"""Synthetic sequence tasks for the recurrent, convolutional and encoder models of the zoo.

Like `synthetic.py`: deterministic from a seed, each split from its own seed, items are
`(input, target)` tensor pairs.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import UserError
from .synthetic import _generator


def synthetic_sequences(
    split: str,
    vocab_size: int = 32,
    num_classes: int = 2,
    min_len: int = 4,
    max_len: int = 32,
    num_samples: int = 2048,
    eval_samples: int = 256,
    bias: float = 0.3,
    pad_id: int = 0,
    seed: int = 1234,
) -> Dataset | None:
    """Variable-length token sequences, right-padded with `pad_id`; the label is their majority group.

    Every non-padding token t belongs to group `(t - 1) % num_classes`. A sequence of length
    uniform in [min_len, max_len] draws each token from its class's group with probability `bias`,
    else uniformly; the label is the group with the most tokens (ties to the lowest group), so it
    depends on the content only, never on the padding. Item: (tokens (max_len,), label ()).
    """
    if pad_id != 0:
        raise UserError("synthetic_sequences: only pad_id 0 is supported (tokens are 1..vocab_size-1)")
    if vocab_size - 1 < num_classes or num_classes < 2 or not 1 <= min_len <= max_len:
        raise UserError("synthetic_sequences: need vocab_size - 1 >= num_classes >= 2 and 1 <= min_len <= max_len")
    n = num_samples if split == "train" else eval_samples
    if n <= 0:
        return None
    gen = _generator(seed, split)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    drawn_class = torch.randint(num_classes, (n, 1), generator=gen)
    uniform = torch.randint(1, vocab_size, (n, max_len), generator=gen)
    # a token of the drawn class's group: 1 + class + num_classes * k, kept below vocab_size
    per_group = (vocab_size - 1 - drawn_class - 1) // num_classes + 1
    k = (torch.rand(n, max_len, generator=gen) * per_group).long()
    biased = 1 + drawn_class + num_classes * k
    tokens = torch.where(torch.rand(n, max_len, generator=gen) < bias, biased, uniform)
    real = torch.arange(max_len) < lengths.unsqueeze(1)
    tokens = torch.where(real, tokens, torch.zeros_like(tokens))
    groups = torch.where(real, (tokens - 1) % num_classes, torch.full_like(tokens, num_classes))
    counts = torch.zeros(n, num_classes + 1, dtype=torch.long).scatter_add_(1, groups, torch.ones_like(groups))
    return TensorDataset(tokens, counts[:, :num_classes].argmax(dim=1))


def synthetic_series(
    split: str,
    task: str = "adding",
    seq_len: int = 32,
    num_classes: int = 4,
    num_samples: int = 2048,
    eval_samples: int = 256,
    noise: float = 0.3,
    seed: int = 1234,
) -> Dataset | None:
    """Real-valued sequences `(seq_len, channels)` for sequence regression or classification.

    `adding` (regression, Hochreiter & Schmidhuber 1997): channel 0 holds values in [0, 1),
    channel 1 marks two positions; the target (shape (1,)) is the sum of the two marked values.
    `frequency` (classification): one channel, a sine with 2 (class + 1) periods over the sequence,
    random phase, plus Gaussian noise of std `noise`; the label is the class.
    """
    if task not in ("adding", "frequency"):
        raise UserError(f"synthetic_series: task must be adding or frequency, got {task!r}")
    if seq_len < 2:
        raise UserError("synthetic_series: seq_len must be >= 2")
    if task == "frequency" and not 1 <= num_classes <= seq_len // 4:
        # class c has 2 (c + 1) periods: past seq_len / 2 periods (Nyquist) a class's samples alias
        # onto a lower class's frequency, and the two classes cannot be told apart
        raise UserError(
            f"synthetic_series: task=frequency needs 1 <= num_classes <= seq_len / 4 (the top class has "
            f"2 num_classes periods over seq_len steps), got num_classes={num_classes} with seq_len={seq_len}: "
            f"raise data.seq_len to >= {4 * max(num_classes, 1)} or lower data.num_classes"
        )
    n = num_samples if split == "train" else eval_samples
    if n <= 0:
        return None
    gen = _generator(seed, split)
    if task == "adding":
        values = torch.rand(n, seq_len, generator=gen)
        # two distinct marked positions per row: the first two of a random permutation
        marked = torch.rand(n, seq_len, generator=gen).argsort(dim=1)[:, :2]
        markers = torch.zeros(n, seq_len).scatter_(1, marked, 1.0)
        target = (values * markers).sum(dim=1, keepdim=True)
        return TensorDataset(torch.stack([values, markers], dim=2), target)
    labels = torch.randint(num_classes, (n,), generator=gen)
    cycles = 2.0 * (labels.float() + 1)  # 2, 4, 6, ... full periods over the sequence
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    steps = torch.arange(seq_len).float()
    signal = torch.sin(2 * math.pi * cycles.unsqueeze(1) * steps / seq_len + phase)
    series = signal + noise * torch.randn(n, seq_len, generator=gen)
    return TensorDataset(series.unsqueeze(-1), labels)
