"""Samplers that give the same global batch at every step for any world size, and exact eval shards."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch at a global sample offset.

    The epoch's permutation depends only on (seed, epoch), never on the world size; rank r
    takes positions r, r + W, r + 2W, ... of it. With a per-rank batch of b, global
    micro-batch k is therefore positions [k·W·b, (k+1)·W·b) for every W, so the same samples
    make up each global batch at any world size. `set_start(n)` skips the first n positions
    of the permutation (a global sample count, so a resume may change the world size).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int, global_batch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.global_batch = global_batch
        self.start = 0

    def set_start(self, global_offset: int) -> None:
        if global_offset % self.num_replicas:
            raise ValueError(f"start offset {global_offset} is not a multiple of the world size {self.num_replicas}")
        self.start = global_offset

    def epoch_order(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=gen).tolist()
        return list(range(len(self.dataset)))

    def usable_samples(self) -> int:
        """Samples of an epoch that fill whole global batches (the tail is dropped)."""
        return len(self.dataset) // self.global_batch * self.global_batch

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()[self.start : self.usable_samples()]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return (self.usable_samples() - self.start) // self.num_replicas


class PaddedEvalSampler(DistributedSampler):
    """Rank r takes r, r + W, ...; shards are padded to equal length by repeating indices.

    Equal lengths keep collective-using strategies (ZeRO-3, FSDP) in lockstep; the padding
    positions are False in `valid_flags()`, so eval metrics skip them and come out the same
    at any world size.
    """

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter(p % len(self.dataset) for p in positions)

    def valid_flags(self) -> list[bool]:
        return [p < len(self.dataset) for p in range(self.rank, self.total_size, self.num_replicas)]
