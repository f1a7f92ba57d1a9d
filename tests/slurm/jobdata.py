"""A dataset factory for the SLURM tests (`data.name: jobdata:slow_tokens`, tests/slurm on PYTHONPATH).

`synthetic_tokens`, plus: `delay_s` sleeps in every item (steps slow enough to interrupt, without
using CPU), and `env_dir` makes each rank write the launcher variables it sees to
`env_dir/rank<RANK>.json` (how the test tells direct srun from torchrun).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from torch.utils.data import Dataset

from dist_train.data.synthetic import synthetic_tokens

RECORDED = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "TORCHELASTIC_RUN_ID",
)


class Slow(Dataset):
    def __init__(self, inner: Dataset, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        time.sleep(self.delay_s)
        return self.inner[index]


def slow_tokens(split: str, delay_s: float = 0.0, env_dir: str | None = None, **kwargs) -> Dataset | None:
    if env_dir and split == "train":
        Path(env_dir).mkdir(parents=True, exist_ok=True)
        seen = {name: os.environ.get(name) for name in RECORDED}
        (Path(env_dir) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    dataset = synthetic_tokens(split, **kwargs)
    return Slow(dataset, delay_s) if dataset is not None and delay_s else dataset
