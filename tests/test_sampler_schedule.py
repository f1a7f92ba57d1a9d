"""Data sharding and LR schedules: pure functions, no process group."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from dist_train.config import from_dict
from dist_train.data.sampler import PaddedEvalSampler, ResumableDistributedSampler
from dist_train.optim import lr_at


def shards(n, world, epoch, micro=4, start=0, seed=3):
    dataset = TensorDataset(torch.arange(n))
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(dataset, world, rank, True, seed, global_batch=micro * world)
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        out.append(list(sampler))
    return out


def global_batches(per_rank, micro):
    """The set of samples in each global micro-batch: rank r's k-th batch is per_rank[r][k*micro:(k+1)*micro]."""
    steps = len(per_rank[0]) // micro
    return [sorted(i for shard in per_rank for i in shard[k * micro : (k + 1) * micro]) for k in range(steps)]


def test_shards_are_disjoint_and_cover_each_epoch():
    for world in (1, 2, 3, 4):
        per_rank = shards(96, world, epoch=0, micro=4)
        flat = [i for shard in per_rank for i in shard]
        assert len(flat) == len(set(flat))  # disjoint
        usable = 96 // (4 * world) * (4 * world)
        assert len(flat) == usable  # covers every sample that fills a global batch


def test_order_changes_between_epochs_and_is_seeded():
    assert shards(64, 2, epoch=0) != shards(64, 2, epoch=1)
    assert shards(64, 2, epoch=1) == shards(64, 2, epoch=1)


def test_same_global_batch_for_any_world_size():
    # global batch 16 = 1 x 16 = 2 x 8 = 4 x 4: the same samples at every step
    reference = global_batches(shards(160, 1, 0, micro=16), 16)
    for world, micro in ((2, 8), (4, 4)):
        assert global_batches(shards(160, world, 0, micro=micro), micro) == reference


def test_start_offset_resumes_mid_epoch_at_another_world_size():
    full = [i for k in global_batches(shards(160, 2, 0, micro=8), 8) for i in k]
    resumed = [i for k in global_batches(shards(160, 4, 0, micro=4, start=48), 4) for i in k]
    assert sorted(full[48:]) == sorted(resumed) and len(resumed) == 160 - 48


def test_eval_sampler_pads_and_flags_padding():
    dataset = TensorDataset(torch.arange(10))
    samplers = [PaddedEvalSampler(dataset, 3, r) for r in range(3)]
    lengths = {len(list(s)) for s in samplers}
    assert lengths == {4}  # equal shard lengths
    real = sorted(i for s in samplers for i, ok in zip(list(s), s.valid_flags()) if ok)
    assert real == list(range(10))


def schedule_cfg(name, **schedule):
    raw = {
        "run": {"output_dir": "x"},
        "model": {"name": "mlp"},
        "data": {"name": "d"},
        "train": {"lr": 0.1, "max_steps": 100},
        "schedule": {"name": name, "warmup_steps": 10, **schedule},
    }
    return from_dict(raw)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "step"])
def test_schedule_formulas(name):
    cfg = schedule_cfg(name, min_lr_ratio=0.1, step_size=30, gamma=0.5)
    assert lr_at(cfg, 0) == pytest.approx(0.1 / 10)
    assert lr_at(cfg, 9) == pytest.approx(0.1)  # end of warm-up: the peak
    last = {"constant": 0.1, "linear": 0.01, "cosine": 0.01, "step": 0.1 * 0.5 ** ((99 - 10) // 30)}[name]
    assert lr_at(cfg, 99) == pytest.approx(last)
    if name == "cosine":
        mid = 10 + (99 - 10) / 2
        assert lr_at(cfg, int(mid)) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
