"""Synthetic datasets with a learnable signal, generated deterministically from a seed.

Items are `(input, target)` tensor pairs. Each split is drawn from its own seed, so the
eval split is held out from the train split.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import UserError

SPLIT_OFFSET = {"train": 0, "eval": 1_000_003}


def _generator(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed + SPLIT_OFFSET[split])


def synthetic_tokens(
    split: str,
    vocab_size: int = 256,
    seq_len: int = 64,
    num_samples: int = 2048,
    eval_samples: int = 256,
    noise: float = 0.1,
    seed: int = 1234,
) -> Dataset | None:
    """Language modelling on sequences from a fixed sparse Markov chain.

    Each token follows its predecessor by a fixed random successor table (the learnable
    signal); with probability `noise` it is uniform instead. Item: (tokens[:-1], tokens[1:]).
    """
    if vocab_size < 2 or seq_len < 2:
        raise UserError("synthetic_tokens: vocab_size and seq_len must be >= 2")
    n = num_samples if split == "train" else eval_samples
    if n <= 0:
        return None
    successor = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))  # shared by both splits
    gen = _generator(seed, split)
    tokens = torch.empty(n, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (n,), generator=gen)
    random_tokens = torch.randint(vocab_size, (n, seq_len), generator=gen)
    is_noise = torch.rand(n, seq_len, generator=gen) < noise
    for t in range(seq_len):
        tokens[:, t + 1] = torch.where(is_noise[:, t], random_tokens[:, t], successor[tokens[:, t]])
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def synthetic_images(
    split: str,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 16,
    num_samples: int = 2048,
    eval_samples: int = 512,
    noise: float = 1.0,
    seed: int = 1234,
) -> Dataset | None:
    """Classification: each class has a fixed random template; an item is template + Gaussian noise."""
    n = num_samples if split == "train" else eval_samples
    if n <= 0:
        return None
    templates = torch.randn(
        num_classes, channels, image_size, image_size, generator=torch.Generator().manual_seed(seed)
    )
    gen = _generator(seed, split)
    labels = torch.randint(num_classes, (n,), generator=gen)
    images = templates[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=gen)
    return TensorDataset(images, labels)


def synthetic_vectors(
    split: str,
    input_dim: int = 32,
    num_classes: int = 4,
    task: str = "classification",
    num_samples: int = 2048,
    eval_samples: int = 512,
    noise: float = 0.1,
    seed: int = 1234,
) -> Dataset | None:
    """Vectors x ~ N(0, I) with a fixed random linear teacher W.

    `classification`: label argmax(W x); `regression`: target W x + noise (shape (num_classes,));
    `binary`: float label 1[(W x)_0 > 0] of shape (1,), for `bce_with_logits`.
    """
    if task not in ("classification", "regression", "binary"):
        raise UserError(f"synthetic_vectors: task must be classification, regression or binary, got {task!r}")
    n = num_samples if split == "train" else eval_samples
    if n <= 0:
        return None
    teacher = torch.randn(input_dim, num_classes, generator=torch.Generator().manual_seed(seed)) / input_dim**0.5
    gen = _generator(seed, split)
    x = torch.randn(n, input_dim, generator=gen)
    scores = x @ teacher
    if task == "classification":
        return TensorDataset(x, scores.argmax(dim=1))
    if task == "binary":
        return TensorDataset(x, (scores[:, :1] > 0).float())
    return TensorDataset(x, scores + noise * torch.randn(n, num_classes, generator=gen))
