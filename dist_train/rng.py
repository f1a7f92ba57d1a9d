"""Seeding every random number generator a training process draws from."""

from __future__ import annotations

import contextlib
import random

import torch


def seed_everything(seed: int) -> None:
    """Python's `random`, torch's CPU and CUDA generators and, when installed, numpy's global one."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
