"""A dataset that takes a little time per item, so a test can interrupt a run mid-training."""

import time

from torch.utils.data import Dataset

from dist_train.data.synthetic import synthetic_tokens


class Slow(Dataset):
    def __init__(self, inner: Dataset, delay: float):
        self.inner, self.delay = inner, delay

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return self.inner[index]


def slow_tokens(split: str, delay: float = 0.005, **kwargs) -> Dataset | None:
    inner = synthetic_tokens(split, **kwargs)
    return None if inner is None else (Slow(inner, delay) if split == "train" else inner)
