"""Datasets for the loop's edge cases (tests/test_loop_edges.py); shuffle off makes positions steps."""

import torch
from torch.utils.data import Dataset, TensorDataset

from .slow import Slow


def vectors(split: str, n: int = 256, ignored=(), nan=(), eval_delay: float = 0.0):
    """Two classes of 32-d vectors; samples [ignored[0], ignored[1]) have only ignored targets (-100),
    samples [nan[0], nan[1]) NaN inputs. The eval split (64 samples) takes eval_delay s per sample."""
    if split != "train":
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
        data = TensorDataset(x, (x[:, 0] > 0).long())
        return Slow(data, eval_delay) if eval_delay else data
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    if ignored:
        y[ignored[0] : ignored[1]] = -100
    if nan:
        x[nan[0] : nan[1]] = float("nan")
    return TensorDataset(x, y)


class Jittered(Dataset):
    """A random transform in __getitem__ (as torchvision's are): Gaussian jitter from the global RNG."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(32), self.y[i]


def jittered_vectors(split: str, n: int = 256, eval_n: int = 0):
    """`eval_n` > 0: an eval split of that many items, jittered too (noise added on the fly)."""
    if split == "eval":
        return Jittered(eval_n) if eval_n else None
    return Jittered(n)


def global_rng_vectors(split: str, n: int = 64, ignored=()):
    """Drawn from the global torch RNG (like random_split without a generator): the same on every rank
    only because every rank calls the factory under the same seed."""
    if split != "train":
        return None
    x = torch.randn(n, 32)
    y = (x[:, 0] > 0).long()
    if ignored:
        y[ignored[0] : ignored[1]] = -100
    return TensorDataset(x, y)


class Overstated(Dataset):
    """Claims `claimed` items, holds len(data): the first batch reaching past them fails to load."""

    def __init__(self, data: Dataset, claimed: int):
        self.data, self.claimed = data, claimed

    def __len__(self) -> int:
        return self.claimed

    def __getitem__(self, i: int):
        return self.data[i]


def failing_vectors(split: str, claimed=None, eval_target=None):
    """`vectors` (64 train samples) whose train split overstates its length (`claimed`), or whose
    eval targets are all `eval_target` (a class the model may not have)."""
    data = vectors(split, n=64)
    if split == "train":
        return Overstated(data, claimed) if claimed else data
    if eval_target is not None:
        data = TensorDataset(data.tensors[0], torch.full_like(data.tensors[1], eval_target))
    return data


class VaryingSeries(Dataset):
    """Float series of 4 (even items) or 16 (odd items) steps; targets: their running sums, per step."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.items = [torch.randn(4 + 12 * (i % 2), 1, generator=gen) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i], self.items[i].cumsum(0)


def varying_series(split: str, n: int = 64, eval_n: int = 0):
    """Per-step regression on series of two lengths: with micro-batch 1, ranks count other numbers of elements.
    `eval_n` > 0: an eval split of that many such series."""
    if split == "eval":
        return VaryingSeries(eval_n) if eval_n else None
    return VaryingSeries(n)


class VaryingTokens(Dataset):
    """Token ids of 4 (even items) or 16 (odd items) positions; targets: the next ids, per position."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.items = [torch.randint(32, (4 + 12 * (i % 2) + 1,), generator=gen) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i][:-1], self.items[i][1:]


def varying_tokens(split: str, n: int = 64):
    """Language modelling on sequences of two lengths (micro-batch 1): `userpkg.residual:embedding_lm` takes them."""
    return VaryingTokens(n) if split == "train" else None


def tags(split: str, n: int = 64, columns: int = 3):
    """Per-token binary tags for bce_with_logits: (n, 6, 4) inputs, (n, 6, columns) 0-1 targets, or
    (n, 6) when columns is 0 (the model then outputs one column); `torch.nn:Linear` tags them."""
    x = torch.randn(n, 6, 4, generator=torch.Generator().manual_seed(0 if split == "train" else 1))
    y = (x[..., : max(columns, 1)] > 0).float()
    return TensorDataset(x, y if columns else y.squeeze(-1))


def eval_mode_mlp(dropout: float = 0.5):
    """A model with dropout whose inner module comes in eval mode: dist_train's hf models wrap what
    transformers' from_pretrained returns, in eval mode."""
    inner = torch.nn.Sequential(
        torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 2)
    )
    return torch.nn.Sequential(inner.eval())


READ: list[int] = []  # indices `recorded_vectors` items were read at, in order (in-process runs, no workers)


class Recorded(Dataset):
    """`vectors`' train split, each item read appended to READ: the order the loop reads the split in."""

    def __init__(self, n: int):
        self.data = vectors("train", n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        READ.append(i)
        return self.data[i]


def recorded_vectors(split: str, n: int = 32):
    return Recorded(n) if split == "train" else None
