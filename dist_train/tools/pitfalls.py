"""Known pitfalls `dist-train check` warns about: each one a sentence saying what happens and what to change."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import Config
from ..errors import UserError
from ..schedules import max_steps_change
from ..state import TrainState, compress_mismatch, config_changes, training_config
from .memory import optimizer_states_per_param
from .report import human_bytes


def checkpoint_size(trainable: int, numel: int, cfg: Config) -> int:
    """Approximate bytes of one checkpoint: fp32 weights plus fp32 optimizer state. DeepSpeed ZeRO
    also saves its fp32 master partitions (4 bytes per trainable parameter), and at stage 3 those are
    the only copy of the trainable weights: its model-state files hold the frozen ones only."""
    weights, states = 4 * numel, 4 * optimizer_states_per_param(cfg) * trainable
    if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage:
        states += 4 * trainable
        held = numel - trainable if cfg.strategy.zero_stage == 3 else numel  # ZeRO-3: frozen_param_fragments
        weights = (2 if cfg.train.precision == "fp16" else 4) * held
    return weights + states


def _model_pitfalls(cfg: Config, model: nn.Module, world_size: int) -> list[str]:
    warnings = []
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batchnorm and world_size > 1 and not cfg.train.sync_batchnorm:
        warnings.append(
            f"the model has BatchNorm and runs on {world_size} ranks without train.sync_batchnorm: each rank "
            "normalises over its own micro-batch, so results depend on the world size; set train.sync_batchnorm=true"
        )
    if has_batchnorm and cfg.train.grad_accum_steps > 1:
        warnings.append(
            "BatchNorm statistics are per micro-batch: gradient accumulation is not the same as a bigger "
            "micro-batch for this model"
        )
    if cfg.train.precision == "fp16" and (not torch.cuda.is_available() or cfg.dist.backend == "gloo"):
        warnings.append(
            "train.precision=fp16 on the CPU: fp16 autocast is slow there and needs loss scaling; "
            "use bf16 (or fp32) on CPUs"
        )
    return warnings


def _set_aside(root: Path, resumed: Path | None) -> list[str]:
    others = [path.name for path in ckpt.other_trajectories(root, resumed)]
    return [ckpt.other_trajectories_summary(root, others)] if others else []


def _resume_checkpoint(cfg: Config) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint folder `checkpoint.resume` points at, its manifest, and a warning for each damaged
    candidate the run would skip (manifests and file sizes are read, not checksummed). A path the run
    would refuse (not a checkpoint, incomplete, truncated) is its UserError here too, unless this run
    started from it and resumes its own checkpoints by now."""
    resume, output_dir = cfg.checkpoint.resume, Path(cfg.run.output_dir)
    if resume == "never":
        return None, None, []
    if resume != "auto" and not ckpt._started_from(resume, output_dir):
        folder = ckpt.resume_path(resume)
        try:
            return folder, ckpt.verify(folder, checksums=False), []
        except ValueError as err:
            raise UserError(f"checkpoint.resume: {err}") from None
    root, skipped = output_dir / "checkpoints", []
    for folder in ckpt.resume_candidates(root):  # in the run's order
        try:
            return folder, ckpt.verify(folder, checksums=False), skipped
        except ValueError as err:  # the run skips it with a warning and falls back to an older one
            skipped.append(f"the run will skip the damaged checkpoint {folder} ({err}) and fall back to an older one")
    return None, None, skipped


def _checkpoint_pitfalls(
    cfg: Config, world_size: int, total_steps: int, epoch_samples: int, global_batch: int
) -> list[str]:
    folder, manifest, warnings = _resume_checkpoint(cfg)
    if folder is None:
        existing = Path(cfg.run.output_dir) / "checkpoints"
        if warnings:  # every candidate damaged
            warnings.append(f"no intact checkpoint left in {existing}: the run starts from scratch")
        return warnings + _set_aside(existing, None)
    warnings += _set_aside(Path(cfg.run.output_dir) / "checkpoints", folder)
    if manifest.get("strategy", "ddp") != cfg.strategy.name:
        warnings.append(
            f"the run will resume {folder}, written by strategy {manifest.get('strategy')!r}; this config uses "
            f"{cfg.strategy.name!r}, so it will stop with an error (use the same strategy or checkpoint.resume=never)"
        )
    if cfg.strategy.name == "deepspeed" and manifest.get("zero_stage") not in (None, cfg.strategy.zero_stage):
        warnings.append(
            f"the run will resume {folder}, written with ZeRO stage {manifest.get('zero_stage')}; this config uses "
            f"stage {cfg.strategy.zero_stage}"
        )
    if manifest.get("optimizer", cfg.optim.name) != cfg.optim.name:  # as the run: another optimizer's state
        warnings.append(
            f"the run will resume {folder}, written with optim.name={manifest.get('optimizer')}; this config uses "
            f"{cfg.optim.name}, so it will stop with an error (use optim.name={manifest.get('optimizer')}, or "
            "checkpoint.resume=never in a new run.output_dir)"
        )
    if moved := max_steps_change(cfg, manifest.get("max_steps"), manifest.get("step", 0)):
        warnings.append(f"the run will resume {folder}, and {moved}")
    if changed := compress_mismatch(manifest, cfg):
        warnings.append(
            f"the run will resume {folder}, written with {changed}, so it will stop with an error (the model's "
            "state layout differs; resume with the setting it was written with, or checkpoint.resume=never in a new "
            "run.output_dir)"
        )
    try:
        state = TrainState(**manifest["trainer"])
    except (KeyError, TypeError):
        state = None  # a manifest of another version: the run itself says what it makes of it
    if state and state.epoch_continues(global_batch, epoch_samples) and state.samples_in_epoch % world_size:
        warnings.append(
            f"the run will resume {folder} {state.samples_in_epoch} samples into an epoch, which world size "
            f"{world_size} cannot split evenly, so it will stop with an error (resume at world size "
            f"{manifest.get('world_size')})"
        )
    elif manifest.get("world_size") != world_size:
        if cfg.strategy.name == "deepspeed":  # as the run: its ZeRO partitions do not reshard
            outcome = (
                "DeepSpeed cannot reshard its ZeRO partitions, so it will stop with an error (resume at world size "
                f"{manifest.get('world_size')})"
            )
        else:
            outcome = f"{'FSDP reshards it and ' if cfg.strategy.name == 'fsdp' else 'DDP '}continues with fresh RNG streams (not bit-exact)"
        warnings.append(
            f"the run will resume {folder}, written at world size {manifest.get('world_size')}, at world size "
            f"{world_size}: {outcome}"
        )
    if manifest.get("config_hash") != ckpt.config_hash(training_config(cfg)):
        warnings.append(
            f"the run will resume {folder}, written for another model/data/data order/optimizer/schedule/batch config "
            f"(config hash differs{': ' + changed if (changed := config_changes(manifest, cfg)) else ''}); use a new "
            "run.output_dir or checkpoint.resume=never to start fresh"
        )
    if cfg.train.epochs and state:  # counted on from where the checkpoint left the data, as the run counts them
        resumed_total = min(cfg.train.max_steps, state.end_of_epochs(cfg.train.epochs, epoch_samples, global_batch))
        if state.step < resumed_total != total_steps:
            warnings.append(
                f"the run will resume {folder} at step {state.step}, and train.epochs={cfg.train.epochs} counted on "
                f"from where it left the data ends the run at step {resumed_total}, not {total_steps} as from scratch"
            )
        total_steps = resumed_total
    if state and state.still_early_stopped(cfg.eval) and state.step < total_steps:  # the run stays stopped
        warnings.append(state.early_stop_note(str(folder), cfg.eval))
    elif manifest.get("step", 0) >= total_steps:
        warnings.append(f"{folder} is at step {manifest.get('step')} >= {total_steps}: the run has nothing left to do")
    return warnings


def _free_disk(path: Path) -> int | None:
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def find_pitfalls(cfg: Config, model: nn.Module, report: dict) -> list[str]:
    """Warnings for `report` (as built by check.inspect_config)."""
    world_size, steps = report["world_size"], report["steps"]
    warnings = _model_pitfalls(cfg, model, world_size)
    if isinstance(report["first_batch"].get("loss"), str):
        warnings.append(
            f"the loss of rank 0's first micro-batch is {report['first_batch']['loss']} (fp32, eval mode): the run "
            f"skips steps whose loss is not finite and stops after train.max_nonfinite_steps "
            f"({cfg.train.max_nonfinite_steps}) in a row; check the model's initialisation and the data"
        )
    dropped = steps["dropped_per_epoch"]
    if dropped:
        warnings.append(
            f"the global batch ({report['batch']['global_batch']}) does not divide the train split "
            f"({report['data']['train_samples']}): the last {dropped} samples of every epoch are never trained on"
        )
    if cfg.schedule.warmup_steps > steps["total"]:  # step k (from 1) trains at lr x k / warmup_steps
        warnings.append(
            f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) > the run's {steps['total']} steps "
            "(train.max_steps/train.epochs): the LR never reaches train.lr"
        )
    if steps["total"] < cfg.train.max_steps:
        warnings.append(
            f"train.epochs={cfg.train.epochs} ends the run at step {steps['total']}, before train.max_steps"
        )
    if cfg.strategy.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        warnings.append("strategy.name=deepspeed but deepspeed is not installed: pip install 'dist-train[deepspeed]'")
    if cfg.log.plot and importlib.util.find_spec("matplotlib") is None:
        warnings.append(
            "log.plot is on but matplotlib is not installed: no metrics.png (pip install 'dist-train[plot]')"
        )
    epoch_samples = report["data"]["train_samples"] - dropped
    warnings += _checkpoint_pitfalls(cfg, world_size, steps["total"], epoch_samples, report["batch"]["global_batch"])
    size, free = report["checkpoint_bytes"], _free_disk(Path(cfg.run.output_dir))
    needed = size * (cfg.checkpoint.keep_last + 1)  # a new checkpoint is complete before the oldest goes
    if free is not None and needed > free:
        warnings.append(
            f"checkpoints need about {human_bytes(needed)} ({cfg.checkpoint.keep_last} kept + 1 being written, "
            f"{human_bytes(size)} each); {cfg.run.output_dir} has {human_bytes(free)} free"
        )
    if torch.cuda.is_available():
        total = report["memory"]["per_rank"][report["memory"]["configured"]]["with_activations"]
        capacity = torch.cuda.get_device_properties(0).total_memory
        if total > 0.9 * capacity:
            warnings.append(
                f"this config needs about {human_bytes(total)} per rank; the GPU has {human_bytes(capacity)}: "
                "shard more (ZeRO-3/FSDP), lower train.micro_batch_size or use train.grad_checkpointing"
            )
    return warnings
