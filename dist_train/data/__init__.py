"""Dataset registry and the per-rank DataLoaders built on the samplers in `sampler.py`."""

from __future__ import annotations

import functools
import itertools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..config import Config
from ..distributed import DistContext
from ..errors import UserError, on_every_rank
from ..imports import call_factory, raised, resolve
from ..rng import seed_everything
from .sampler import PaddedEvalSampler, ResumableDistributedSampler

REGISTRY: dict[str, str] = {
    "synthetic_tokens": "dist_train.data.synthetic:synthetic_tokens",
    "synthetic_images": "dist_train.data.synthetic:synthetic_images",
    "synthetic_vectors": "dist_train.data.synthetic:synthetic_vectors",
    "synthetic_sequences": "dist_train.data.synthetic_seq:synthetic_sequences",
    "synthetic_series": "dist_train.data.synthetic_seq:synthetic_series",
    "hf": "dist_train.data.hf:hf_dataset",
}


def build_dataset(name: str, split: str, kwargs: dict) -> Dataset | None:
    try:
        return _build_dataset(name, split, kwargs)
    except UserError as err:
        raise on_every_rank(err) from None  # every rank builds the same dataset


def _build_dataset(name: str, split: str, kwargs: dict) -> Dataset | None:
    factory = resolve(name, REGISTRY, "dataset")
    dataset = call_factory(factory, kwargs, f"dataset {name!r}", split)
    if dataset is not None and not hasattr(dataset, "__len__"):
        raise UserError(f"dataset {name!r} split {split!r} must be a map-style Dataset with __len__")
    if isinstance(dataset, IterableDataset):  # one with __len__ too: the samplers index items
        raise UserError(
            f"dataset {name!r} split {split!r} is an IterableDataset: give a map-style Dataset "
            "(__len__ and __getitem__), the sampler picks each rank's items by index"
        )
    what = f"dataset {name!r} split {split!r}"
    try:
        if dataset is not None and len(dataset) == 0:
            return None
        item = dataset[0] if dataset is not None else None
    except Exception as err:  # a mapping of splits ({"train": ...}: KeyError 0), a broken __len__/__getitem__
        raise UserError(
            f"{what} must be a map-style Dataset: reading its length and item 0 raised {raised(err)}"
        ) from None
    if dataset is not None:
        _check_item(item, what)
    return dataset


def _check_item(item, what: str) -> None:
    """Items are `(input, target)` pairs of tensors: say so before the first step fails on one."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else type(item).__name__
        raise UserError(f"{what}: items must be (input, target) tensor pairs, got {got}")
    for part, value in zip(("input", "target"), item):
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{what}: an item's {part} must be a torch.Tensor, got {type(value).__name__}")


def _loader(
    cfg: Config, ctx: DistContext, dataset: Dataset, sampler, batch_size: int, drop_last: bool, seed: int
) -> DataLoader:
    workers = cfg.loader.num_workers
    pin = cfg.loader.pin_memory if cfg.loader.pin_memory is not None else ctx.device.type == "cuda"
    prefetch = None
    if workers > 0:  # seeded batches (training and evaluation)
        batching = {"batch_sampler": _SeededBatches(sampler, batch_size, seed, drop_last)}
        dataset = _SeededFetch(dataset)
        # more than an epoch's batches ahead is the epoch: torch's loader loops prefetch_factor x workers
        # times as it starts each epoch (loader.prefetch_factor=2**62 hung the first step)
        prefetch = max(1, min(cfg.loader.prefetch_factor, len(batching["batch_sampler"])))
    else:
        batching = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=cfg.loader.persistent_workers and workers > 0,
        prefetch_factor=prefetch,
        generator=torch.Generator().manual_seed(seed),  # worker seeds independent of the global RNG
        # forked from the rank whatever the default start method (Python 3.14's is forkserver): a
        # worker starts with the rank's blocked stop signals and the rank as its parent (_worker_init)
        multiprocessing_context="fork" if workers > 0 and sys.platform.startswith("linux") else None,
        # a worker whose rank is killed (even while the worker is still starting) exits with it
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
    )


class _SeededBatches:
    """A loader's batch sampler when it has workers: each batch's indices come paired with a seed
    from (the rank's loader seed, epoch, the batch's place in the epoch), and the worker that loads
    the batch reseeds its generators with it first (`_SeededFetch`). A random transform then draws
    the same numbers whichever worker loads the batch, and a run resumed mid-epoch draws what the
    uninterrupted run drew. (Without workers the process's own streams, checkpointed with the run,
    do the same.) The eval split's sampler stays at epoch 0 (nothing sets it): every evaluation draws alike, the first
    one of a resumed run too (the loader's own worker seeds move on with each evaluation)."""

    def __init__(self, sampler, batch_size: int, seed: int, drop_last: bool = True):
        self.sampler, self.batch_size, self.seed, self.drop_last = sampler, batch_size, seed, drop_last

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = iter(self.sampler)
        start = getattr(self.sampler, "start", 0)
        first = start // self.sampler.num_replicas // self.batch_size  # a resume's first batch
        epoch = getattr(self.sampler, "epoch", -1)
        for number in range(first, first + len(self)):
            seed = hash((self.seed, epoch, number)) % 2**63  # ints hash alike in every process
            yield [(seed, index) for index in itertools.islice(indices, self.batch_size)]

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size  # whole batches only
        return -(-len(self.sampler) // self.batch_size)


class _SeededFetch(Dataset):
    """A split as a worker sees it: a batch of (seed, index) keys reseeds, then loads."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[key[1]]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        seed_everything(keys[0][0])
        indices = [index for _, index in keys]
        many = getattr(self.dataset, "__getitems__", None)
        return many(indices) if many else [self.dataset[i] for i in indices]


def _worker_init(rank_pid: int, worker_id: int) -> None:
    """A loader worker lives and dies with its rank.

    It ignores the stop signals (blocked from its start until then: `start_batches`): torchrun's shutdown and SLURM's scancel/preemption signal every
    process of the group, and a worker killed by SIGTERM fails its rank ("DataLoader worker exited
    unexpectedly") before the rank can checkpoint. The rank ends its workers when it is done, and
    they get SIGKILL if it dies. A SIGTERM from the rank itself ends the worker: Python's exit
    terminates the workers still running (a failed in-process train() whose error the caller keeps),
    then waits for them.
    """
    from ..distributed import die_with_parent

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1,))  # blocked since the fork (start_batches)
    threading.Thread(target=_end_on_sigterm_from, args=(rank_pid,), daemon=True).start()  # SIGTERM stays blocked
    die_with_parent(rank_pid)


def _end_on_sigterm_from(rank_pid: int) -> None:
    """A loader worker's thread: take each SIGTERM (held blocked), exit on the rank's, drop anyone else's."""
    while signal.sigwaitinfo((signal.SIGTERM,)).si_pid != rank_pid:
        pass
    os._exit(0)


@dataclass
class TrainData:
    dataset: Dataset  # the factory's train split (the loader may wrap it: _SeededFetch)
    loader: DataLoader
    sampler: ResumableDistributedSampler
    steps_per_epoch: int
    global_batch: int
    seed: int

    def epoch_batches(self, epoch: int, start_sample: int) -> Iterator:
        """This rank's micro-batches for `epoch`, from global sample offset `start_sample` on.

        Worker seeds derive from (seed, rank, epoch) alone and each batch reseeds its worker
        (`_SeededBatches`), so a resumed run's workers draw the same random numbers as the
        uninterrupted run's.
        """
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_sample)
        self.loader.generator.manual_seed(self.seed + 7 * epoch)
        return start_batches(self.loader)


@dataclass
class EvalData:
    loader: DataLoader
    valid: torch.Tensor  # (rank's padded shard length,) bool: False for DistributedSampler's padding

    def batches(self) -> Iterator:
        return start_batches(self.loader)


def start_batches(loader: DataLoader) -> Iterator:
    """`iter(loader)`, its workers started with SIGTERM/SIGUSR1 blocked: torch's own worker handler
    (a SIGTERM not from the rank kills the worker) is in place until `_worker_init` ignores them, and
    a signal to the whole process group in between would fail the rank instead of stopping it."""
    from ..control import STOP_SIGNALS

    if not loader.num_workers:
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


_COLLATE = os.path.join("torch", "utils", "data", "_utils", "collate.py")


def unbatchable(err: Exception, dataset: Dataset, sampler, batch_size: int, split: str = "train") -> UserError | None:
    """The error for a split's first batch that the loader's collation refused (items of several
    shapes: torch's stack fails on them, or in a worker its shared-memory resize); None for any other
    failure to load (an item that raises: the dataset's bug, kept a training failure)."""
    text = str(err)
    in_collate = any(f.filename.endswith(_COLLATE) for f in traceback.extract_tb(err.__traceback__))
    if not in_collate and _COLLATE not in text:  # a worker's error carries its traceback as text
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    cause = lines[-1] if _COLLATE in text else f"{type(err).__name__}: {lines[0] if lines else ''}"
    try:  # this rank's first micro-batch, read again for its shapes
        items = [dataset[i] for i in itertools.islice(iter(sampler), batch_size)]
        shapes = [", ".join(map(str, sorted({tuple(item[k].shape) for item in items}))) for k in (0, 1)]
        seen = f"; the first micro-batch's items: inputs {shapes[0]}, targets {shapes[1]}"
    except Exception:  # noqa: BLE001 - the shapes only help the message
        seen = ""
    batch = "training" if split == "train" else split
    return UserError(
        f"the {split} split's items cannot be batched: the first {batch} batch's collation failed with {cause}{seen}. "
        "The loader stacks a micro-batch's items into one tensor: give every item of a split the same shape "
        "(pad or crop them in the dataset)"
    )


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def loading_error(err: Exception) -> str:
    """`Type: message` of an error met loading a batch. torch re-raises one from a loader worker as
    `Caught Type in DataLoader worker process N.` with the worker's traceback in its message: that
    one is said as the worker's own last line, naming the worker (the traceback stays in `err`)."""
    head, found, trace = str(err).partition(WORKER_TRACEBACK)
    lines = trace.strip().splitlines()
    if found and head.startswith("Caught ") and " in DataLoader worker process " in head and lines:
        return f"{lines[-1]} (in DataLoader worker {head.rsplit(' ', 1)[-1].rstrip('.')})"
    return f"{type(err).__name__}: {err}"


def build_train_data(cfg: Config, ctx: DistContext) -> TrainData:
    dataset = build_dataset(cfg.data.name, "train", cfg.data.kwargs)
    if dataset is None:
        raise on_every_rank(UserError(f"dataset {cfg.data.name!r} has no `train` split"))
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * ctx.world_size
    if global_batch > len(dataset):  # the same verdict on every rank: said once per node
        fit = len(dataset) // (t.micro_batch_size * t.grad_accum_steps)  # ranks that fit (0: not even one)
        fewer = f", or run on at most {fit} ranks" if ctx.world_size > 1 and fit else ""
        raise on_every_rank(
            UserError(
                f"global batch {global_batch} (micro_batch_size {t.micro_batch_size} x grad_accum_steps "
                f"{t.grad_accum_steps} x world size {ctx.world_size}) is larger than the train split "
                f"({len(dataset)} samples): lower train.micro_batch_size or train.grad_accum_steps{fewer}"
            )
        )
    if not cfg.loader.drop_last and len(dataset) % global_batch:
        raise on_every_rank(
            UserError(
                f"loader.drop_last=false needs the train split ({len(dataset)}) to be a multiple of the global batch "
                f"({global_batch}) so every step sees a full global batch; set loader.drop_last=true or change the batch"
            )
        )
    sampler = ResumableDistributedSampler(
        dataset, ctx.world_size, ctx.rank, cfg.loader.shuffle, cfg.run.seed, global_batch
    )
    seed = cfg.run.seed * 1009 + ctx.rank * 100_003
    loader = _loader(cfg, ctx, dataset, sampler, t.micro_batch_size, True, seed)
    return TrainData(dataset, loader, sampler, len(dataset) // global_batch, global_batch, seed)


def build_eval_data(cfg: Config, ctx: DistContext) -> EvalData | None:
    dataset = build_dataset(cfg.data.name, "eval", cfg.data.kwargs)
    if dataset is None:
        return None
    sampler = PaddedEvalSampler(dataset, ctx.world_size, ctx.rank)
    batch = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    loader = _loader(cfg, ctx, dataset, sampler, batch, False, cfg.run.seed)
    try:  # the first eval batch now, not after training: items of several shapes cannot be stacked
        loader.collate_fn([dataset[i] for i in itertools.islice(iter(sampler), batch)])
    except Exception as err:  # noqa: BLE001 - another failure (an item that raises) is the evaluation's to report
        refused = unbatchable(err, dataset, sampler, batch, "eval")
        if refused is not None:
            raise refused from None
    return EvalData(loader, torch.tensor(sampler.valid_flags(), dtype=torch.bool))


def same_counts(dataset: Dataset, ignores_targets: bool) -> bool:
    """True when every rank's train micro-batches are known up front to count as many loss elements:
    a TensorDataset (fixed shapes) whose integer targets, for a loss that ignores IGNORE_INDEX, hold
    none. The loss normaliser of a step is then static (elements per micro-batch x accumulation x
    world size), and the loop skips its per-step all-reduce. Any other dataset may give the ranks
    targets of other sizes (variable-length items), whatever the loss.
    """
    from torch.utils.data import TensorDataset

    from ..losses import IGNORE_INDEX

    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        return False
    targets = dataset.tensors[1]
    return not ignores_targets or (not targets.is_floating_point() and not bool((targets == IGNORE_INDEX).any()))
