"""User factories that are wrong in the ways users get them wrong: for the one-line error tests."""

import torch
from torch.utils.data import TensorDataset

not_callable = 3


def model_raises(**kwargs):
    raise ValueError("weights file missing")


def data_raises(split: str):
    raise FileNotFoundError(f"no such shard: /data/{split}-00000.bin")


class _Items(torch.utils.data.Dataset):
    def __init__(self, make):
        self.make = make

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        return self.make(index)


def data_single(split: str):
    return _Items(lambda i: torch.randn(32))


def data_triple(split: str):
    return _Items(lambda i: (torch.randn(32), torch.tensor(1), torch.tensor(0)))


class _Stream(torch.utils.data.IterableDataset):
    def __len__(self) -> int:
        return 64

    def __iter__(self):
        return iter((torch.randn(32), torch.tensor(1)) for _ in range(64))


def data_iterable(split: str):
    """An IterableDataset with a length: the samplers cannot index it."""
    return _Stream()


def data_plain_list(split: str):
    return [1, 2, 3] * 30


def data_classes(split: str):
    """32 features, 4 classes: right for cross_entropy, not for mse."""
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 32, generator=generator), torch.randint(4, (64,), generator=generator))


def data_late_bad_class(split: str):
    """4 classes, but item 40 says 7: with loader.shuffle false and 8 per batch, step 6 meets it."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(4, (64,), generator=generator)
    targets[40] = 7
    return TensorDataset(torch.randn(64, 32, generator=generator), targets)


def data_bad_on_rank_1(split: str):
    """4 classes on rank 0; rank 1's targets are all 7 (a model with 4 outputs refuses them)."""
    import os

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(4, (64,), generator=generator)
    if os.environ.get("RANK") == "1":
        targets[:] = 7
    return TensorDataset(torch.randn(64, 32, generator=generator), targets)


def data_splits(split: str):
    """Every split in one dict (as `datasets.load_dataset` returns them): len() works, [0] is a KeyError."""
    return {"train": data_classes("train"), "eval": data_classes("eval")}


class _NoLength(torch.utils.data.Dataset):
    def __len__(self) -> int:
        raise NotImplementedError("length unknown until the shards are listed")

    def __getitem__(self, index: int):
        return torch.randn(32), torch.tensor(0)


def data_no_length(split: str):
    return _NoLength()


class _DictOutputs(torch.nn.Module):
    """Returns a dict of outputs (as Hugging Face models do) instead of the logits tensor."""

    def __init__(self, input_dim: int = 32, num_classes: int = 4):
        super().__init__()
        self.head = torch.nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor):
        return {"logits": self.head(x)}


def model_dict_outputs(**kwargs):
    return _DictOutputs()


def model_frozen(**kwargs):
    """Every parameter frozen (a backbone without its trainable head)."""
    return torch.nn.Linear(32, 4).requires_grad_(False)


def model_half_frozen(**kwargs):
    """A frozen 32 -> 64 body under a trainable 64 -> 2 head (fine-tuning a backbone's head)."""
    body = torch.nn.Linear(32, 64).requires_grad_(False)
    return torch.nn.Sequential(body, torch.nn.ReLU(), torch.nn.Linear(64, 2))


def model_without_parameters(**kwargs):
    return torch.nn.Flatten()


def model_lazy():
    """Lazy modules: their parameters get shapes at the first forward, after DDP/FSDP/ZeRO have set up."""
    return torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.LazyBatchNorm1d(), torch.nn.Linear(8, 2))


class _UnusedHead(torch.nn.Module):
    """An auxiliary head the forward never calls (as a pretrained pooler a classifier skips)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(32, 4)
        self.aux = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor):
        return self.head(x)


def model_unused_head(**kwargs):
    return _UnusedHead()


class _Temperature(torch.nn.Module):
    """Logits divided by a learned 0-dimensional temperature (as CLIP's logit scale)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(32, 4)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor):
        return self.head(x) / self.temperature


def model_scalar_parameter(**kwargs):
    return _Temperature()
