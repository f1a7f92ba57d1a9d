"""Hot-loop discipline of the shared loop, counted rather than assumed.

* No host read of a tensor (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float/int/bool(t)`) on
  non-logging steps; the logging step does one.
* Collectives on the default group per step: at most the loss normaliser (token losses, world size
  > 1, targets that may hold IGNORE_INDEX; none for a TensorDataset without it), plus the window's
  loss sum on logging steps (DDP's bucket all-reduces run in C++, the stop vote on the control group).
* Per-step tensor allocations beyond a minimal hand-written loop do not grow with the model.
* DataLoader workers and pinned memory follow `loader.*`; throughput metrics are logged and right.

Steps are told apart by wrapping `trainer.train_step`: everything between the end of step k and the
start of step k+1 (logging, bookkeeping, loading the next batch) belongs to "after k".
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import ctx_from_env, read_rows, run_ranks, tiny_lm_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dist_train import trainer
from dist_train.config import from_dict
from dist_train.distributed import DistContext

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
# aten ops that make the host wait for the device whatever Python called them (torch.nonzero,
# boolean-mask indexing, torch.equal, a C++ .item(), ...), seen by a TorchDispatchMode. A copy into
# host memory (`.to("cpu")` is a no-op on a CPU tensor) shows only on CUDA: tests/test_gpu.py runs the
# step under torch's sync debug mode there.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "unique", "bool_mask_index")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")
# Host-side tensors by construction, read on every step on purpose (see each module):
#   the sampler's permutation and the DataLoader's collate (CPU batches before `.to(device)`),
#   Loss.count (counts the host target batch), Control.should_stop and its _result (a CPU flag on the
#   gloo group);
#   and once per run, after the first step, Control.broadcast_object (rank 0's verdict on setting aside
#   the checkpoints the run does not continue: a pickled object in CPU tensors on the gloo group).
HOST_SIDE = ("dist_train/data/", "torch/utils/data/")
HOST_SIDE_FUNCTIONS = {
    ("losses.py", "count"),
    ("control.py", "should_stop"),
    ("control.py", "_result"),
    ("control.py", "broadcast_object"),
}
LOG_EVERY, STEPS = 5, 12


def single_ctx() -> DistContext:
    return DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")


def _caller_is_host_side(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    nearest_ours = None
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if any(part in path for part in HOST_SIDE):
            return True
        if nearest_ours is None and "/dist_train/" in path:
            nearest_ours = (Path(path).name, frame.f_code.co_name)
        frame = frame.f_back
    return nearest_ours in HOST_SIDE_FUNCTIONS


class SyncingOps(TorchDispatchMode):
    """Records the aten ops in SYNC_OPS (bar host-side callers) as events of the current phase."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_unique") or name.startswith("unique"):
            name = "unique"
        if name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:])
        ):
            name = "bool_mask_index"
        if name in SYNC_OPS and not _caller_is_host_side(depth=1):
            self.record(name)
        return func(*args, **(kwargs or {}))


def instrumented_train(cfg, ctx) -> list[tuple[str, int, str]]:
    """Run train() counting host reads (Tensor methods and syncing aten ops) and default-group
    collectives; events are (phase, step, what)."""
    import torch.distributed as dist

    phase = {"name": "setup", "step": 0}
    events: list[tuple[str, int, str]] = []
    local = threading.local()
    patched: list[tuple[object, str, object]] = []

    def counting(name, original, kind):
        def wrapper(*args, **kwargs):
            if getattr(local, "inside", False):
                return original(*args, **kwargs)
            local.inside = True
            try:
                if kind == "read" and not _caller_is_host_side():
                    events.append((phase["name"], phase["step"], name))
                if kind == "collective" and kwargs.get("group") in (None, dist.group.WORLD):
                    events.append((phase["name"], phase["step"], name))
                return original(*args, **kwargs)
            finally:
                local.inside = False

        return wrapper

    def patch(owner, name, kind):
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, counting(name, original, kind))

    original_step = trainer.train_step

    def step_wrapper(*args, **kwargs):
        phase["name"] = "step"
        result = original_step(*args, **kwargs)
        phase["name"], phase["step"] = "after", phase["step"] + 1
        return result

    for name in HOST_READS:
        patch(torch.Tensor, name, "read")
    for name in COLLECTIVES:
        patch(dist, name, "collective")
    patched.append((trainer, "train_step", original_step))
    trainer.train_step = step_wrapper
    try:
        with SyncingOps(lambda name: events.append((phase["name"], phase["step"], name))):
            trainer.train(cfg, ctx)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return events


def hot_loop_config(output_dir: Path, **train) -> dict:
    return tiny_lm_config(
        output_dir,
        train={"max_steps": STEPS, "grad_accum_steps": 2, **train},
        optim={"name": "adamw"},  # fused AdamW skips non-finite steps on the device (SGD reads the flag)
        eval={"every_steps": None, "at_end": False},
        checkpoint={"every_steps": None, "at_end": False},
        log={"every_steps": LOG_EVERY, "plot": False, "progress": "lines"},
    )


def is_logging_step(step: int) -> bool:
    return step % LOG_EVERY == 0 or step == STEPS


def _check_events(events: list[tuple[str, int, str]], world_size: int, normaliser: bool = False) -> None:
    reads = [(p, s, w) for p, s, w in events if w in HOST_READS or w in SYNC_OPS]
    in_step = [e for e in reads if e[0] == "step"]
    assert not in_step, f"host reads inside train_step: {in_step}"
    bad = [e for e in reads if e[0] == "after" and not is_logging_step(e[1])]
    assert not bad, f"host reads after non-logging steps: {bad}"
    assert any(e[0] == "after" and e[1] == LOG_EVERY for e in reads), "the logging step reads its row"

    collectives = [(p, s, w) for p, s, w in events if w in COLLECTIVES and p in ("step", "after")]
    for step in range(1, STEPS + 1):
        during = [w for p, s, w in collectives if p == "step" and s == step - 1]
        after = [w for p, s, w in collectives if p == "after" and s == step]
        # token loss at world size > 1, targets that may be ignored: one all-reduce of the loss normaliser
        assert during == (["all_reduce"] if world_size > 1 and normaliser else []), (step, during)
        expected_after = ["all_reduce"] if is_logging_step(step) and world_size > 1 else []
        if step == STEPS:  # after the last step: export and teardown may gather; only check the log row
            assert after[: len(expected_after)] == expected_after, (step, after)
        else:
            assert after == expected_after, (step, after)


def test_no_host_sync_on_non_logging_steps(tmp_path):
    cfg = from_dict(hot_loop_config(tmp_path / "run"))
    events = instrumented_train(cfg, single_ctx())
    _check_events(events, world_size=1)
    rows = [r for r in read_rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 12]
    for row in rows:  # throughput metrics on CPU; MFU is CUDA-only
        assert {"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_rss_mb"} <= row.keys()
        assert 0.0 <= row["data_wait_frac"] <= 1.0 and "mfu" not in row
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 16)


def test_fp16_without_clipping_reads_no_loss_scale_on_the_host(tmp_path):
    """The unclipped gradient norm of an fp16 run is the unscaled gradients' (GradScaler.get_scale()
    would read the scale on the host every step)."""
    cfg = from_dict(hot_loop_config(tmp_path / "run", precision="fp16", grad_clip_norm=None))
    _check_events(instrumented_train(cfg, single_ctx()), world_size=1)


@pytest.mark.parametrize(
    "sync",
    [
        lambda norm, flag: norm.item(),
        lambda norm, flag: torch.nonzero(flag),
        lambda norm, flag: norm.reshape(1)[flag.reshape(1) > 0],
        lambda norm, flag: torch.equal(norm, norm),
    ],
    ids=["item", "nonzero", "bool_mask_index", "equal"],
)
def test_the_instrument_sees_a_sync_inside_the_step(tmp_path, monkeypatch, sync):
    """The check above can fail: one syncing call per step, in the strategy, is reported."""
    from dist_train.strategies.ddp import DDPStrategy

    original = DDPStrategy.clip_and_step

    def syncing(self, *args, **kwargs):
        norm, flag = original(self, *args, **kwargs)
        sync(norm, flag)
        return norm, flag

    monkeypatch.setattr(DDPStrategy, "clip_and_step", syncing)
    events = instrumented_train(from_dict(hot_loop_config(tmp_path / "run")), single_ctx())
    with pytest.raises(AssertionError, match="host reads inside train_step"):
        _check_events(events, world_size=1)


def _two_rank_events(rank: int, world_size: int, output_dir: str, wrapped: bool) -> list:
    logging.disable(logging.INFO)
    config = hot_loop_config(Path(output_dir))
    if wrapped:  # not a TensorDataset: targets may hold IGNORE_INDEX, the normaliser is summed every step
        config["data"] = {**config["data"], "name": "userpkg.slow:slow_tokens", "delay": 0.0}
    return instrumented_train(from_dict(config), ctx_from_env())


@pytest.mark.slow
@pytest.mark.parametrize("wrapped", [False, True], ids=["tensor_dataset", "map_dataset"])
def test_two_ranks_only_the_normaliser_all_reduce_between_logging_steps(tmp_path, wrapped):
    for events in run_ranks(_two_rank_events, 2, str(tmp_path / "run"), wrapped):
        _check_events(events, world_size=2, normaliser=wrapped)


class TensorOutputs(TorchDispatchMode):
    """Counts tensors produced by non-view aten ops (allocations) and their bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.count += 1
                    self.nbytes += leaf.untyped_storage().nbytes()
        return out


def _per_step_outputs(run, steps_short: int, steps_long: int) -> tuple[float, float]:
    counts = []
    for steps in (steps_short, steps_long):
        mode = TensorOutputs()
        with mode:
            run(steps)
        counts.append((mode.count, mode.nbytes))
    span = steps_long - steps_short
    return (counts[1][0] - counts[0][0]) / span, (counts[1][1] - counts[0][1]) / span


def test_per_step_allocations_do_not_grow_with_the_model(tmp_path):
    """dist_train's extra allocations per step over a hand-written loop are the same for 2 and 8 layers."""
    from bench import hand_ddp
    from bench.workloads import LM, smoke

    logging.disable(logging.INFO)
    try:
        extra = {}
        for layers in (2, 8):
            base = smoke(LM)
            work = base.scaled(model_kwargs={**base.model_kwargs, "n_layers": layers}, log_every=LOG_EVERY)

            def ours(steps, work=work, layers=layers):
                cfg = work.scaled(steps=steps).dist_train_config(str(tmp_path / f"l{layers}-s{steps}"))
                trainer.train(from_dict(cfg), single_ctx())

            def hand(steps, work=work):
                hand_ddp.run(work.scaled(steps=steps).spec(), torch.device("cpu"))

            # 5 -> 10 steps: the same number of logging steps (1) inside the difference for both sides
            ours_count, ours_bytes = _per_step_outputs(ours, 5, 10)
            hand_count, hand_bytes = _per_step_outputs(hand, 5, 10)
            assert hand_count > 100  # the instrument sees the forward/backward/optimizer ops
            extra[layers] = (ours_count - hand_count, ours_bytes - hand_bytes)
    finally:
        logging.disable(logging.NOTSET)
    (count2, bytes2), (count8, bytes8) = extra[2], extra[8]
    assert abs(count8 - count2) <= 1, extra  # a per-parameter allocation would add ~12 per layer
    assert abs(bytes8 - bytes2) <= 1024, extra
    # small and constant: the loss scale per micro-step, the skipped flag (measured 5.2; 17.2 before the
    # window kept the step's own tensors instead of adding them up on the device every step)
    assert count2 < 8, extra


def test_loader_workers_and_pinned_memory_reach_the_dataloader(tmp_path):
    from dist_train.data import build_eval_data, build_train_data

    ctx = single_ctx()
    default = from_dict(tiny_lm_config(tmp_path))
    data = build_train_data(default, ctx)
    assert data.loader.num_workers == 0 and data.loader.pin_memory is False  # CPU: no pinning by default
    cfg = from_dict(tiny_lm_config(tmp_path, loader={"num_workers": 2, "pin_memory": True, "prefetch_factor": 3}))
    for loader in (build_train_data(cfg, ctx).loader, build_eval_data(cfg, ctx).loader):
        assert loader.num_workers == 2 and loader.pin_memory is True and loader.prefetch_factor == 3


def test_data_wait_fraction_and_paused_time(tmp_path):
    """A slow dataset shows as data wait; evaluation time stays out of the step time."""
    from dist_train.metrics import Throughput

    slow = tiny_lm_config(tmp_path / "slow", train={"max_steps": 4, "grad_accum_steps": 1})
    slow["data"] = {**slow["data"], "name": "userpkg.slow:slow_tokens", "delay": 0.05}
    slow["log"]["every_steps"] = 4
    slow["eval"] = {"at_end": False}
    trainer.train(from_dict(slow), single_ctx())
    (row,) = [r for r in read_rows(tmp_path / "slow") if "loss" in r]
    assert 0.5 < row["data_wait_frac"] <= 1.0, row  # 4 items x 50 ms per step vs a few-ms model

    import time

    throughput = Throughput()
    throughput.steps = 1
    with throughput.paused():
        time.sleep(0.2)
    assert throughput.rates(1)["step_time_s"] < 0.1


def _slow_rank_one_run(rank: int, world_size: int, output_dir: str) -> None:
    logging.disable(logging.INFO)
    config = tiny_lm_config(Path(output_dir), train={"max_steps": 4, "grad_accum_steps": 1})
    config["data"] = {**config["data"], "name": "userpkg.slow:slow_tokens", "delay": 0.05, "slow_rank": 1}
    config["log"]["every_steps"] = 4
    config["eval"] = {"at_end": False}
    trainer.train(from_dict(config), ctx_from_env())


@pytest.mark.slow
def test_data_wait_fraction_shows_the_rank_whose_data_is_slow(tmp_path):
    """Only rank 1's items are slow (4 x 50 ms per step): rank 0 waits for it in the gradient all-reduce,
    not on its DataLoader. The row showed rank 0's own data wait (0.00), hiding the input bottleneck;
    it shows the ranks' largest now."""
    run_ranks(_slow_rank_one_run, 2, str(tmp_path / "run"))
    (row,) = [r for r in read_rows(tmp_path / "run") if "loss" in r]
    assert 0.5 < row["data_wait_frac"] <= 1.0, row


def test_step_times_hook(tmp_path, monkeypatch):
    """DIST_TRAIN_STEP_TIMES=PATH writes one wall and one CPU time per step (benchmarks); unset: nothing."""
    monkeypatch.setenv("DIST_TRAIN_STEP_TIMES", str(tmp_path / "times"))
    trainer.train(from_dict(hot_loop_config(tmp_path / "run")), single_ctx())
    record = json.loads((tmp_path / "times.rank0").read_text())
    assert len(record["steps"]) == len(record["cpu"]) == STEPS
    assert record["train_start"] < record["steps"][0] and record["steps"] == sorted(record["steps"])
    assert record["peak_rss_mb"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap tuning (dist_train/host_memory.py)")
def test_steady_state_steps_do_not_fault_the_heap_back_in(tmp_path):
    """glibc used to trim the heap the step freed and fault it back in next step (~2,000 minor faults
    per step on this workload); host_memory.retain_freed_heap keeps it."""
    import resource
    import statistics

    from bench.workloads import LM

    faults = []
    original_step = trainer.train_step

    def step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return result

    cfg = from_dict(LM.scaled(steps=20, log_every=10).dist_train_config(str(tmp_path / "run")))
    trainer.train_step = step
    try:
        trainer.train(cfg, single_ctx())
    finally:
        trainer.train_step = original_step
    per_step = [b - a for a, b in zip(faults[8:], faults[9:])]
    assert statistics.median(per_step) < 50, per_step


def test_static_normaliser_only_for_tensor_datasets_without_ignored_targets():
    from torch.utils.data import TensorDataset
    from userpkg.slow import Slow

    from dist_train.data import same_counts

    tokens = torch.randint(0, 10, (8, 4))
    assert same_counts(TensorDataset(tokens, tokens), ignores_targets=True)
    padded = tokens.clone()
    padded[0, -1] = -100
    assert not same_counts(TensorDataset(tokens, padded), ignores_targets=True)
    assert same_counts(TensorDataset(tokens, padded), ignores_targets=False)  # a loss that counts every target
    assert not same_counts(Slow(TensorDataset(tokens, tokens), 0.0), ignores_targets=True)  # unknown until loaded
    assert not same_counts(Slow(TensorDataset(tokens, tokens), 0.0), ignores_targets=False)  # sizes may differ
    assert same_counts(TensorDataset(tokens.float(), tokens.float()), ignores_targets=False)  # regression, fixed


def test_loss_window_sums_in_order_across_compaction_and_checkpoints(monkeypatch):
    """The window's loss is the left-to-right float64 sum whether it folded entries (long logging
    intervals) or started from a checkpoint's partial sum; the skipped-step streak spans folds."""
    from dist_train.metrics import LossWindow

    monkeypatch.setattr(LossWindow, "COMPACT_AT", 4)
    ctx = single_ctx()
    torch.manual_seed(0)
    losses = [torch.rand(()) * 10 for _ in range(14)]  # 7 steps x 2 micro-batches
    flags = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    expected = torch.zeros((), dtype=torch.float64)
    for loss in losses:
        expected = expected + loss

    def feed(window, steps):
        for step in steps:
            window.add(losses[2 * step : 2 * step + 2], 6, torch.tensor(2.0), torch.tensor(flags[step]))

    whole = LossWindow(ctx, limit=3)
    feed(whole, range(7))
    assert len(whole.losses) < 4  # folded along the way
    loss, grad_norm, tokens = whole.read(tokens=96)
    assert loss == float(expected) / 42 and grad_norm == 2.0 and tokens == 96
    assert (whole.skipped, whole.longest_streak, whole.streak) == (4, 3, 0)

    first = LossWindow(ctx, limit=3)
    feed(first, range(3))
    partial, count, skipped, streak = first.checkpoint_values()  # a checkpoint after step 3, 2 skipped in a row
    assert (skipped, streak) == (2, [2, 2])
    resumed = LossWindow(ctx, limit=3, loss_sum=partial, count=count, skipped=skipped, streak=streak)
    feed(resumed, range(3, 7))
    assert resumed.read()[0] == loss and resumed.skipped == 4
    assert (resumed.longest_streak, resumed.streak) == (3, 0)  # the streak went on across the checkpoint
