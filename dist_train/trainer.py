"""The one shared training loop: `train()` drives steps, evaluation, checkpoints and export;
`train_step()` does one optimizer step of gradient accumulation for any strategy.

Hot-loop discipline: nothing reads a device value on the host except on logging, evaluation and
checkpoint steps. Loss sums, counts and the non-finite guard stay on the device in between.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import state as run_state
from .build import build_run
from .checkpoint import write_atomic
from .config import CUDA_GRAPH_MODES, Config, dump_yaml
from .config.checks import check_watched_metrics_fit_outputs
from .control import Control
from .data import loading_error, unbatchable
from .distributed import DistContext
from .errors import UserError, on_every_rank
from .evaluation import evaluate
from .flops import mfu_per_token
from .host_memory import retain_freed_heap
from .losses import Loss
from .metrics import (
    LossWindow,
    MetricsLogger,
    Throughput,
    peak_rss_mb,
    step_times_hook,
    tokens_per_sample,
    write_step_times,
)
from .misfit import FORWARD_ERRORS, ForwardError, require_tensor_outputs
from .schedules import LRSchedule
from .strategies import Strategy
from .strategies.ddp import UnusedParameters
from .transforms import preferred_attention

log = logging.getLogger("dist_train")


FP16_BACKOFF_STEPS = 16  # skipped steps in a row that take the loss scalers' initial 2**16 down to 1


class TrainingError(RuntimeError):
    """The run failed on this rank; the message names the rank and step."""


@dataclass
class StepResult:
    losses: list[torch.Tensor]  # this rank's loss sum of each micro-batch (0-d, detached)
    count: torch.Tensor | int  # global counted elements (loss normaliser)
    grad_norm: torch.Tensor  # pre-clip global norm
    nonfinite: torch.Tensor  # 1.0 when the step was skipped
    output_dims: int  # of the model's outputs (3: language-model logits)


def _loss_sum(loss_fn: Loss, outputs, targets: torch.Tensor) -> torch.Tensor:
    if loss_fn.in_model:  # train.fused_loss: the model's forward returned the loss sum
        return outputs
    require_tensor_outputs(outputs)  # a dict/tuple/ModelOutput: the loss takes a tensor
    return loss_fn.sum(outputs, targets)


def replays_cuda_graphs(cfg: Config, ctx: DistContext) -> bool:
    """Whether the compiled model replays CUDA graphs (train.compile_mode reduce-overhead/max-autotune)."""
    return cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES and ctx.device.type == "cuda"


def train_step(strategy: Strategy, loss_fn: Loss, micro_batches: list, cfg: Config, ctx: DistContext) -> StepResult:
    """One optimizer step over `grad_accum_steps` micro-batches.

    Each micro-batch's loss is its *sum* divided by the global count of counted elements (all
    micro-steps, all ranks), times the world size because the strategy averages gradients across
    ranks: the update then equals one big batch exactly, padding and ignored tokens included.
    Gradient sync is suppressed for the forward *and* backward of all but the last micro-step
    (suppressing only backward is a known DDP pitfall: pytorch/pytorch#47260-style hangs/extra syncs).
    """
    local_count = sum(loss_fn.count(targets) for _, targets in micro_batches)  # host ints: no sync
    count, pending = local_count * ctx.world_size, None
    scale = ctx.world_size / max(count, 1)  # nothing counted (every target ignored): a zero update, not 0/0
    if not loss_fn.same_count and ctx.world_size > 1:  # summed while the first forward runs, not before it
        count = torch.tensor(float(local_count), device=ctx.device)
        pending = dist.all_reduce(count, async_op=True)
    losses = []
    last = len(micro_batches) - 1
    graphs = replays_cuda_graphs(cfg, ctx)
    for i, (inputs, targets) in enumerate(micro_batches):
        inputs = inputs.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if i == 0:  # outside no_sync: DDP's bucket warm-up after a resume synchronises
            try:
                strategy.prepare_step(
                    inputs, functools.partial(_loss_sum, loss_fn, targets=targets), loss_fn.model_kwargs(targets)
                )
            except FORWARD_ERRORS as err:
                raise ForwardError(err, *micro_batches[i], None) from err
        if graphs:  # a new replay of the model's CUDA graphs; the last micro-step's outputs are spent
            torch.compiler.cudagraph_mark_step_begin()
        with strategy.no_sync() if i < last else contextlib.nullcontext():
            outputs = None
            try:
                with strategy.autocast():
                    outputs = strategy.model(inputs, **loss_fn.model_kwargs(targets))
                loss_sum = _loss_sum(loss_fn, outputs, targets)
            except FORWARD_ERRORS as err:  # the model or loss cannot take this batch (misfit.py)
                raise ForwardError(err, *micro_batches[i], outputs) from err  # host tensors: values shown on CUDA too
            if pending is not None:
                pending.wait()
                pending, scale = None, ctx.world_size / count.clamp(min=1.0)
            strategy.backward(loss_sum * scale)
        if graphs and i == 0 < last:  # the next replay overwrites the graphs' memory, where .grad lives now
            strategy.own_gradients()
        # a fused loss is the graphs' own output under CUDA graphs: the next replay would overwrite it
        losses.append(loss_sum.detach().clone() if graphs and loss_fn.in_model else loss_sum.detach())
    grad_norm, nonfinite = strategy.clip_and_step(cfg.train.grad_clip_norm, cfg.train.grad_clip_value)
    dims = targets.dim() + 1 if loss_fn.in_model else outputs.dim() if isinstance(outputs, torch.Tensor) else 0
    return StepResult(losses, count, grad_norm, nonfinite, dims)


def _log_row(state, window: LossWindow, lr: float, throughput: Throughput, data, tokens, ctx, metrics) -> None:
    """The training row of the window that ends at this step: metrics.jsonl, TensorBoard, console."""
    loss, grad_norm, window_tokens = window.read(throughput.tokens, throughput.data_wait_frac())
    if window.longest_streak >= window.limit:
        raise TrainingError(
            f"loss or gradient norm was not finite for {window.longest_streak} steps in a row (by step {state.step})"
        )
    row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    row.update(throughput.rates(data.global_batch, window_tokens if tokens > 1 else None, window.data_wait_frac))
    row.update(skipped_steps=window.skipped, peak_rss_mb=round(peak_rss_mb(), 1))
    if ctx.device.type == "cuda":
        row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
    state.skipped_steps = row["skipped_steps"]
    metrics.emit(row)


def train(cfg: Config, ctx: DistContext) -> dict:
    """Run (or resume) training as configured. Returns a summary with `status` and `step`."""
    with preferred_attention(cfg.train.sdpa_backend), contextlib.ExitStack() as held:  # attention: before torch.compile
        return _train(cfg, ctx, held)


def _train(cfg: Config, ctx: DistContext, held: contextlib.ExitStack) -> dict:
    step_times = step_times_hook()  # benchmarks only (DIST_TRAIN_STEP_TIMES); None otherwise
    output_dir = Path(cfg.run.output_dir)
    control = Control(ctx, cfg.dist.timeout_s, cfg.checkpoint.save_timeout_s)
    run_state.claim_output_dir(output_dir, ctx, control, held, cfg.log.tensorboard)
    try:  # a mistake found while building is the config's, met by every rank alike: said once per node
        strategy, compression, data, eval_data, loss_fn, train_loss = build_run(cfg, ctx)
    except UserError as err:
        raise on_every_rank(err) from None
    tokens = tokens_per_sample(data.dataset[0][0])  # token inputs: report tokens/s (MFU: item 0's length)

    restored = run_state.restore(cfg, ctx, control, strategy, output_dir, data.sampler.usable_samples())
    state = restored[0] if restored else run_state.TrainState()
    resumed_at = state.step if restored else None
    total_steps = cfg.train.max_steps
    if cfg.train.epochs:
        total_steps = min(
            total_steps, state.end_of_epochs(cfg.train.epochs, data.sampler.usable_samples(), data.global_batch)
        )
        compression.check_run_length(total_steps)  # QAT's start, the pruning ramp's end: before the epochs end it
    if state.early_stopped:  # the same command after early stopping: nothing left to train
        if state.step < total_steps and ctx.is_rank_zero:  # more steps asked for: say why none run
            log.warning("%s", state.early_stop_note(restored[1].name, cfg.eval))
        total_steps = state.step
    elif state.step > total_steps and ctx.is_rank_zero:
        log.warning(
            "checkpoint %s is at step %d, past the %d steps of train.max_steps/train.epochs: nothing to train "
            "(raise train.max_steps to go on, or set checkpoint.resume=never to start over)",
            restored[1].name,
            state.step,
            total_steps,
        )
    limit = cfg.train.max_nonfinite_steps
    if cfg.train.precision == "fp16":  # the loss scaler halves its scale (2**16 at first) on each skip: its
        limit += FP16_BACKOFF_STEPS  # back-off is no divergence, but a streak past scale 1 is
    window = LossWindow(
        ctx, limit, restored[2] if restored else None, state.window_count, state.skipped_steps, state.nonfinite_streak
    )
    schedule = LRSchedule(cfg, state.lr_schedule)  # plateau state resumes with the trainer state
    metrics = MetricsLogger(
        output_dir, ctx.is_rank_zero, total_steps, state.step, cfg.log.progress, cfg.log.tensorboard
    )

    def accepted() -> None:
        """Once the config ran its first step (or had none to run): a config refused by its checkpoints or
        its first batch (status 2) leaves the folder's config.yaml and metrics.jsonl as they were (and its
        TensorBoard events: the writer's purge waits for the first row)."""
        refused = None
        if ctx.is_rank_zero:
            write_atomic(output_dir / "config.yaml", dump_yaml(cfg).encode())
            refused = run_state.set_aside_other_trajectories(
                output_dir / "checkpoints", restored[1] if restored else None
            )
        if refused := control.broadcast_object(refused):
            raise on_every_rank(UserError(refused))
        if restored:
            metrics.write({"resumed_from": restored[1].name, "step": resumed_at})
        else:
            metrics.text("config", "```\n" + dump_yaml(cfg) + "```")

    log.info(
        "training %s on %d rank(s), strategy %s: global batch %d, %d steps/epoch, %d steps (from %d)",
        cfg.model.name,
        ctx.world_size,
        cfg.strategy.name,
        data.global_batch,
        data.steps_per_epoch,
        total_steps,
        state.step,
    )

    throughput = Throughput(mfu_per_token(strategy.module, tokens, ctx), ctx.device)
    status, batches = "early_stopped" if state.early_stopped else "finished", None
    last_saved = state.step if restored else -1  # a finished run started again saves nothing new
    if ctx.device.type == "cpu":
        retain_freed_heap()  # no per-step heap trim + page faults (host_memory.py)
    control.install()
    first_step = True  # this process's first: a batch the model refuses here is a config mistake (misfit.py)
    try:
        while state.step < total_steps:
            control.arm_watchdog()
            if control.should_stop():
                status = "preempted"
                break
            wait_start = time.perf_counter()  # starting an epoch's iterator (workers) is data wait too
            if state.samples_in_epoch + data.global_batch > data.sampler.usable_samples():
                state.epoch, state.samples_in_epoch, batches = state.epoch + 1, 0, None
            try:
                if batches is None:
                    batches = data.epoch_batches(state.epoch, state.samples_in_epoch)
                micro_batches = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
            except Exception as err:  # an item or its collation failed (in a worker or not): name the step
                if (
                    first_step
                    and (refused := unbatchable(err, data.dataset, data.sampler, cfg.train.micro_batch_size))
                    is not None
                ):
                    raise refused from None  # items of several shapes: the dataset's config, nothing trained yet
                raise TrainingError(
                    f"rank {ctx.rank} failed at step {state.step + 1} loading its batch: {loading_error(err)}"
                ) from err
            throughput.data_wait += time.perf_counter() - wait_start
            compression.on_step(state.step)
            lr = schedule.lr_at(state.step)
            strategy.set_lr(lr)
            try:
                result = train_step(strategy, train_loss, micro_batches, cfg, ctx)
            except UnusedParameters:  # this rank's own batch: a rank that used them fails on the connection
                raise
            except UserError as err:  # outputs and targets that the loss cannot pair: a config mistake, exit 2
                raise on_every_rank(err) from None
            except ForwardError as err:
                if first_step and err.is_misfit():  # nothing trained or saved yet by this process
                    raise err.as_user_error() from None
                raise TrainingError(f"rank {ctx.rank} failed at step {state.step + 1}: {err}") from err.error
            except Exception as err:
                raise TrainingError(
                    f"rank {ctx.rank} failed at step {state.step + 1}: {type(err).__name__}: {err}"
                ) from err
            if first_step:  # before any evaluation or checkpoint: a watched metric these outputs cannot have
                try:
                    check_watched_metrics_fit_outputs(cfg, result.output_dims)
                except UserError as err:
                    raise on_every_rank(err) from None
                accepted()
            first_step = False
            state.step += 1
            state.samples_in_epoch += data.global_batch
            throughput.steps += 1
            if tokens > 1:  # every item's own length: items of other lengths at micro-batch 1 (no sync: host shapes)
                throughput.tokens += sum(inputs.numel() for inputs, _ in micro_batches)
            window.add(result.losses, result.count, result.grad_norm, result.nonfinite)
            logged = state.step % cfg.log.every_steps == 0 or state.step == total_steps
            if logged:
                _log_row(state, window, lr, throughput, data, tokens, ctx, metrics)
            if eval_data is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                state.last_eval_step = state.step
                with throughput.paused():  # evaluation is not training throughput; the watchdog re-armed per batch
                    eval_row = {"step": state.step, **_evaluate(strategy, loss_fn, eval_data, ctx, state.step, control)}
                control.vote_after_pause()  # a stop signal that came during it is acted on before the next step
                metrics.emit(eval_row)
                state.lr_schedule = schedule.observe(eval_row, state.step)  # same metrics, same LR on every rank
                patience = cfg.eval.early_stopping_patience  # eval.metric is read for early stopping only
                if patience and state.evals_without_improvement_after(cfg.eval, eval_row) >= patience:
                    log.info(
                        "early stopping at step %d: no improvement of %s in %d evaluations",
                        state.step,
                        cfg.eval.metric,
                        patience,
                    )
                    status, state.early_stopped = "early_stopped", True
                    if not logged:  # the run's last step: its window gets a row, as at train.max_steps
                        _log_row(state, window, lr, throughput, data, tokens, ctx, metrics)
            last_step = state.step == total_steps or status == "early_stopped"
            if _checkpoint_due(cfg, state.step) and not last_step:  # the last one after the final evaluation
                with throughput.paused():
                    _save(cfg, ctx, control, strategy, state, window, output_dir)
                last_saved = state.step
            if step_times is not None:
                step_times.append((time.perf_counter(), time.process_time()))
            if status == "early_stopped":
                break
        if first_step:  # no step to run (a finished run started again), or stopped before the first
            accepted()
        control.disarm_watchdog()
        write_step_times(step_times, ctx.rank)
        control.finish_vote()
        if status == "preempted":  # one rank stops before its first step: there may be nothing new to save
            new = state.step > 0 and last_saved != state.step
            log.warning(
                "stop signal received: %s",
                f"checkpointing step {state.step} and exiting"
                if new
                else f"nothing new to checkpoint at step {state.step}; exiting",
            )
        elif cfg.eval.at_end and eval_data is not None and state.last_eval_step != state.step:
            state.last_eval_step = state.step
            eval_row = {"step": state.step, **_evaluate(strategy, loss_fn, eval_data, ctx, state.step)}
            metrics.emit(eval_row)
        wanted = cfg.checkpoint.at_end or status == "preempted" or _checkpoint_due(cfg, state.step)
        if state.step > 0 and last_saved != state.step and wanted:
            _save(cfg, ctx, control, strategy, state, window, output_dir)
            control.disarm_watchdog()  # as after the loop: the exports and their evaluation take what they take
        if status != "preempted":
            int8_due = resumed_at != state.step or not compression.exported(output_dir)  # else: a finished run again
            if int8_due and ctx.is_rank_zero:
                compression.discard(output_dir)
            run_state.export_weights(
                strategy, ctx, output_dir / "model.safetensors", state.step, compression.export_state_dict
            )
            if int8_due:

                def log_int8(int8_metrics: dict) -> None:
                    metrics.emit({"step": state.step, **int8_metrics})

                compression.export(strategy.module, ctx, output_dir, loss_fn, eval_data, log_int8)
    except (UserError, TrainingError):
        raise
    except Exception as err:  # the loop's own collectives (the logged loss, the stop vote), the export: a lost peer
        raise TrainingError(f"rank {ctx.rank} failed after step {state.step}: {type(err).__name__}: {err}") from err
    finally:
        control.disarm_watchdog()
        control.restore()
        metrics.close()
    if status != "preempted" and ctx.is_rank_zero and cfg.log.plot:
        from .plots import plot_metrics

        try:
            plot_metrics(output_dir)
        except Exception as err:  # noqa: BLE001 - a finished run never fails over its plot
            log.warning("could not write metrics.png: %s: %s", type(err).__name__, err)
    strategy.teardown()
    return {"status": status, "step": state.step}


def _evaluate(strategy, loss_fn, eval_data, ctx, step: int, control=None) -> dict[str, float]:
    """`evaluate`, its failures named with rank and step (an eval batch the model refuses, a broken item)."""
    try:
        return evaluate(strategy, loss_fn, eval_data, ctx, control.arm_watchdog if control else None)
    except UserError:
        raise
    except Exception as err:
        raise TrainingError(f"rank {ctx.rank} failed evaluating step {step}: {loading_error(err)}") from err


def _checkpoint_due(cfg: Config, step: int) -> bool:
    return bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0


def _save(cfg, ctx, control, strategy, state, window: LossWindow, output_dir) -> None:
    control.arm_watchdog(cfg.checkpoint.save_timeout_s + 60)
    loss_sum, state.window_count, state.skipped_steps, state.nonfinite_streak = window.checkpoint_values()
    try:
        run_state.save(cfg, ctx, control, strategy, state, output_dir, loss_sum)
    except (UserError, TrainingError):
        raise
    except run_state.WrittenThenFailed as err:  # the checkpoint is complete: say so, not "failed to save"
        cause = err.__cause__
        raise TrainingError(
            f"rank {ctx.rank} failed after writing the checkpoint of step {state.step} ({err} is complete: the same "
            f"command resumes from it): {type(cause).__name__}: {cause}"
        ) from cause
    except Exception as err:  # a full disk, a lost peer: the previous checkpoint is still the newest
        raise TrainingError(
            f"rank {ctx.rank} failed to save the checkpoint of step {state.step}: {type(err).__name__}: {err}"
        ) from err
    control.arm_watchdog()
