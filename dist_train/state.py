"""The trainer's replicated state, and saving/restoring a whole run through `checkpoint.py`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, to_dict
from .control import Control
from .distributed import DistContext
from .errors import UserError, on_every_rank
from .safetensors_io import save_file
from .schedules import max_steps_change
from .strategies import Strategy

log = logging.getLogger("dist_train")


@dataclass
class TrainState:
    """Everything besides model/optimizer/RNG that a resumed run needs (JSON, in the manifest)."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    samples_in_epoch: int = 0  # global samples of `epoch` consumed: resumable at another world size
    skipped_steps: int = 0  # non-finite steps skipped so far
    nonfinite_streak: list = field(default_factory=lambda: [0, 0])  # [in a row now, most in a row] since the last log
    best_metric: float | None = None
    evals_without_improvement: int = 0
    best_of: str | None = None  # "eval.metric eval.mode" that best_metric and the count above belong to
    window_count: float = 0.0  # counted elements in the open logging window (sums are per rank)
    lr_schedule: dict = field(default_factory=dict)  # schedules.LRSchedule state (plateau), JSON
    last_eval_step: int = -1  # a run restarted after its last evaluation does not repeat it
    early_stopped: bool = False  # a run started again after early stopping has nothing left to do
    started_from: str | None = None  # the checkpoint.resume path this run started from (it continues its own)

    def end_of_epochs(self, epochs: int, epoch_samples: int, global_batch: int) -> int:
        """The step that ends epoch `epochs - 1`, counted on from where this state left the data
        (`epoch_samples`: the samples of an epoch the run trains on), so that a resume with another
        global batch still trains `epochs` passes in all."""
        steps_per_epoch = epoch_samples // global_batch
        left = max(0, epoch_samples - self.samples_in_epoch) // global_batch  # of the current epoch
        return self.step + left + (epochs - self.epoch - 1) * steps_per_epoch

    def still_early_stopped(self, eval_cfg) -> bool:
        """Whether an early stop recorded in the checkpoint stands under this config: it does for the
        same command started again, not for a run whose early stopping is off (or has a larger patience
        this run has not used up), resumed in its own folder or fine-tuned from it in another."""
        patience = eval_cfg.early_stopping_patience
        if not (self.early_stopped and patience) or self.best_of not in (None, _watched(eval_cfg)):
            return False
        return self.evals_without_improvement >= patience

    def early_stop_note(self, folder: str, eval_cfg) -> str:
        """Why a run started from this early-stopped checkpoint trains nothing, and how to go on (said by
        the run and by `dist-train check`, when the config asks for more steps)."""
        return (
            f"checkpoint {folder} stopped early at step {self.step} ({self.evals_without_improvement} evaluations "
            f"without improvement of {eval_cfg.metric}): nothing to train; raise eval.early_stopping_patience above "
            f"{self.evals_without_improvement}, or set it to null, to train on"
        )

    def epoch_continues(self, global_batch: int, epoch_samples: int) -> bool:
        """Whether a run resumed from this state goes on in the current epoch (as the loop decides: an
        epoch with no room for another global batch is over, the next starts at 0)."""
        return self.samples_in_epoch + global_batch <= epoch_samples

    def evals_without_improvement_after(self, eval_cfg, metrics: dict) -> int:
        """Count this evaluation toward early stopping: evaluations in a row without an improvement
        of `eval_cfg.metric`, this one included."""
        value = metrics.get(eval_cfg.metric)
        if value is None:
            raise UserError(f"eval.metric {eval_cfg.metric!r} is not among the eval metrics ({', '.join(metrics)})")
        if self.best_of not in (None, _watched(eval_cfg)):  # the checkpoint's best is another metric's (or mode's)
            self.best_metric, self.evals_without_improvement = None, 0
        self.best_of = _watched(eval_cfg)
        best = self.best_metric
        if best is None:  # as from best = inf (min) or -inf (max): a NaN first evaluation is no improvement
            best = math.inf if eval_cfg.mode == "min" else -math.inf
        if eval_cfg.mode == "min":
            better = value < best - eval_cfg.min_delta
        else:
            better = value > best + eval_cfg.min_delta
        if better:
            self.best_metric, self.evals_without_improvement = value, 0
        else:
            self.evals_without_improvement += 1
        return self.evals_without_improvement


def _watched(eval_cfg) -> str:
    return f"{eval_cfg.metric} {eval_cfg.mode}"


def training_config(cfg: Config) -> dict:
    """The part of the config that defines the optimisation trajectory (hashed into manifests): the data
    order too (`loader.shuffle` flipped on resume reads the rest of the epoch in another order)."""
    full = to_dict(cfg)
    train = {k: v for k, v in full["train"].items() if k not in ("max_steps", "epochs")}
    sections = ("model", "data", "optim", "schedule", "compress")
    return {k: full[k] for k in sections} | {"train": train, "seed": cfg.run.seed, "shuffle": cfg.loader.shuffle}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recorded_training_config(cfg: Config) -> dict:
    """`training_config` as the manifest records it (JSON), under the config's own dotted key names."""
    tree = json.loads(json.dumps(training_config(cfg), default=str))
    tree["run"], tree["loader"] = {"seed": tree.pop("seed")}, {"shuffle": tree.pop("shuffle")}
    return tree


def config_changes(manifest: dict, cfg: Config, limit: int = 4) -> str:
    """The training keys this config changed since the checkpoint ('train.lr: 0.001 -> 0.0003; ...'),
    '' for a manifest that does not record them (older versions)."""
    written = manifest.get("training_config")
    if not isinstance(written, dict):
        return ""
    before, now = _flat(written), _flat(recorded_training_config(cfg))
    keys = [key for key in sorted(before.keys() | now.keys()) if before.get(key, ()) != now.get(key, ())]

    def value(tree: dict, key: str) -> str:
        if key not in tree:
            return "unset"  # a factory argument left to its default
        v = tree[key]  # as the config writes it: true, false, null
        return json.dumps(v) if v is None or isinstance(v, bool) else str(v)

    shown = "; ".join(f"{key}: {value(before, key)} -> {value(now, key)}" for key in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def compress_layout(cfg: Config) -> dict:
    """The compress keys that shape the model's state_dict (in the manifest): pruning's weight_orig and
    weight_mask, QAT's fake-quant modules."""
    return {"prune": cfg.compress.prune, "qat": cfg.compress.qat}


def compress_mismatch(manifest: dict, cfg: Config) -> str | None:
    """'compress.K=<the checkpoint's>, this run uses compress.K=<this config's>' when K changed the
    model's layout since the checkpoint (None when not, or for a manifest without the field)."""
    written = manifest.get("compress")
    if not isinstance(written, dict):
        return None
    if "prune" in written and (written["prune"] != "none") != (cfg.compress.prune != "none"):
        return f"compress.prune={written['prune']}, this run uses compress.prune={cfg.compress.prune}"
    if "qat" in written and bool(written["qat"]) != cfg.compress.qat:
        return f"compress.qat={written['qat']}, this run uses compress.qat={cfg.compress.qat}"
    return None


class WrittenThenFailed(RuntimeError):
    """The checkpoint is complete under its step name, then the save failed: rank 0 could not update
    `latest` or apply retention (a full disk), or the save's closing barrier failed (a peer lost after
    it had written its files). The same command resumes from this checkpoint (the newest intact one)."""


def save(
    cfg: Config,
    ctx: DistContext,
    control: Control,
    strategy: Strategy,
    state: TrainState,
    output_dir: Path,
    window_loss_sum: torch.Tensor,
) -> Path | None:
    """Collective: every rank writes its files into a temporary folder, rank 0 commits it atomically."""
    root = output_dir / "checkpoints"
    tmp = None
    if ctx.is_rank_zero:
        tmp = ckpt.begin_save(root, state.step)
    tmp = Path(control.broadcast_object(str(tmp)))
    files = strategy.save(tmp)
    # per rank: RNG streams, this rank's share of the open logging window and its own buffers
    rank_state = {"rng": ckpt.rng_state(), "window_loss_sum": window_loss_sum.cpu()}
    rank_state["buffers"] = {name: buffer.cpu() for name, buffer in _persistent_buffers(strategy.module).items()}
    torch.save(rank_state, tmp / ckpt.rng_file(ctx.rank))
    files.append(ckpt.rng_file(ctx.rank))
    ckpt.fsync_files(tmp, files)
    all_files = [name for rank_files in control.gather_objects(files) for name in rank_files]
    final = None
    if ctx.is_rank_zero:
        meta = {
            "epoch": state.epoch,
            "world_size": ctx.world_size,
            "strategy": cfg.strategy.name,
            "zero_stage": cfg.strategy.zero_stage if cfg.strategy.name == "deepspeed" else None,
            "optimizer": cfg.optim.name,
            "compress": compress_layout(cfg),
            "max_steps": cfg.train.max_steps,  # linear/cosine decay to it: a resume with another one is said
            "config_hash": ckpt.config_hash(training_config(cfg)),
            "training_config": recorded_training_config(cfg),  # a resume with other values names them
            "trainer": dataclasses.asdict(state),
        }
        try:
            final = ckpt.commit_save(
                root, tmp, state.step, meta, all_files, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every
            )
        except Exception as err:
            named = root / ckpt.step_dir_name(state.step)
            if tmp.exists() or not named.is_dir():  # not renamed: the previous checkpoint is the newest
                raise
            raise WrittenThenFailed(named.name) from err
        log.info("checkpoint %s written", final.name)
    try:
        control.barrier()  # bounded by checkpoint.save_timeout_s: nobody leaves before `latest` is in place
    except Exception as err:
        if final is None:
            raise
        raise WrittenThenFailed(final.name) from err
    return final


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of the model's state_dict, by name. Under FSDP and ZeRO-1/2 each rank keeps its own
    (BatchNorm statistics without sync, a running input mean the training forward reads), while the
    checkpoint's model state holds rank 0's: each rank saves and restores its own for an exact resume."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, sub in module.named_modules()
        for name, buffer in sub.named_buffers(recurse=False)
        if name not in sub._non_persistent_buffers_set
    }


def _load_error_summary(err: Exception, limit: int = 300) -> str:
    """torch's multi-line `load_state_dict` report (missing/unexpected keys, size mismatches) on one line."""
    lines = [line.strip() for line in str(err).splitlines()]
    details = "; ".join(line for line in lines[1:] if line) or lines[0]
    return details if len(details) <= limit else details[: limit - 3] + "..."


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} tensors)" if len(names) > limit else "")


def restore(
    cfg: Config, ctx: DistContext, control: Control, strategy: Strategy, output_dir: Path, epoch_samples: int
) -> tuple[TrainState, Path, torch.Tensor] | None:
    """Find (rank 0) and load (every rank) the checkpoint named by `checkpoint.resume`, if any.

    `epoch_samples` is the number of samples of an epoch this run trains on (whole global batches).
    Returns the trainer state, the checkpoint's folder and this rank's open-window loss sum.
    """
    found = None
    if ctx.is_rank_zero:
        try:
            found = ckpt.find_resume_checkpoint(cfg.checkpoint.resume, output_dir)
            found = None if found is None else (str(found.folder), found.manifest, found.origin)
        except UserError as err:
            found = err
    found = control.broadcast_object(found)
    if isinstance(found, UserError):
        raise on_every_rank(found)
    if found is None:
        return None
    folder, manifest, origin = Path(found[0]), found[1], found[2]
    if manifest.get("strategy", "ddp") != cfg.strategy.name:
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} was written by strategy {manifest.get('strategy')!r}, this run uses "
                f"{cfg.strategy.name!r}; resume with the same strategy or set checkpoint.resume=never"
            )
        )
    if manifest["world_size"] != ctx.world_size and not strategy.reshards:  # DeepSpeed's ZeRO partitions
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} holds {manifest['world_size']} shards; this strategy cannot reshard it: "
                f"resume with world size {manifest['world_size']}"
            )
        )
    if (
        cfg.strategy.name == "deepspeed"
        and manifest.get("zero_stage", cfg.strategy.zero_stage) != cfg.strategy.zero_stage
    ):
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} was written at strategy.zero_stage={manifest['zero_stage']}, this run uses "
                f"{cfg.strategy.zero_stage}: resume with strategy.zero_stage={manifest['zero_stage']}"
            )
        )
    if manifest.get("optimizer", cfg.optim.name) != cfg.optim.name:  # another optimizer's state: stale moments
        # carried along (Adam's into SGD, in every later checkpoint) or missing ones (SGD's into Adam)
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} was written with optim.name={manifest['optimizer']}, this run uses "
                f"{cfg.optim.name}: resume with optim.name={manifest['optimizer']}, or start this one in a new "
                "run.output_dir with checkpoint.resume=never"
            )
        )
    if changed := compress_mismatch(manifest, cfg):  # else: "does not fit this model" (Missing key(s) ...)
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} was written with {changed}: pruning reparametrises the weights (weight_orig, "
                "weight_mask) and QAT inserts fake-quant modules, so its state does not fit; resume with the setting "
                "it was written with, or start this one in a new run.output_dir with checkpoint.resume=never"
            )
        )
    configured = [{k: v for k, v in group.items() if k != "params"} for group in strategy.optimizer.param_groups]
    try:
        strategy.load(folder)
        for i, (group, hyper) in enumerate(zip(strategy.optimizer.param_groups, configured, strict=True)):
            # the state is matched to parameters by position in each group (DDP, ZeRO's flat partitions):
            # parameters that moved between groups would take other parameters' moments and master weights
            if group.get("names", hyper["names"]) != hyper["names"]:
                raise ValueError(
                    f"optimizer group {i} holds {_shown(hyper['names'])}, the checkpoint's {_shown(group['names'])}"
                )
            group.update(hyper)  # the config's weight decay, betas, lr_scale...: the checkpoint gives state only
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # shape/key mismatch; other param groups; not ours
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} does not fit this model or optimizer ({_load_error_summary(err)}): resume with "
                "the model, optim.name and optim.param_groups it was written with, or start this one in a new run.output_dir"
            )
        ) from None
    if manifest.get("config_hash") != ckpt.config_hash(training_config(cfg)) and ctx.is_rank_zero:
        changed = config_changes(manifest, cfg)
        log.warning(
            "the training config differs from the one checkpoint %s was written with%s",
            folder.name,
            f" ({changed})" if changed else "",
        )
    if ctx.is_rank_zero and (moved := max_steps_change(cfg, manifest.get("max_steps"), manifest["step"])):
        log.warning("resuming checkpoint %s: %s", folder.name, moved)
    try:
        window_loss_sum = _restore_rank_state(folder, manifest, strategy, ctx)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:  # checksums fine, content not ours
        raise UserError(
            f"checkpoint {folder}: its per-rank state does not fit this version ({_load_error_summary(err)}): resume "
            "another checkpoint, or start this run in a new run.output_dir"
        ) from None
    try:
        state = TrainState(**manifest["trainer"])
        state.started_from = origin or state.started_from
        state.early_stopped = state.still_early_stopped(cfg.eval)
    except TypeError as err:  # fields this version does not know (or lacks): another dist_train wrote it
        raise on_every_rank(
            UserError(f"checkpoint {folder}: its trainer state does not fit this version ({err})")
        ) from None
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * ctx.world_size
    epoch_continues = state.epoch_continues(global_batch, epoch_samples)
    if epoch_continues and state.samples_in_epoch % ctx.world_size:
        raise on_every_rank(
            UserError(
                f"checkpoint {folder} stopped {state.samples_in_epoch} samples into an epoch, which world size "
                f"{ctx.world_size} cannot split evenly; resume at world size {manifest['world_size']}"
            )
        )
    if epoch_continues and state.samples_in_epoch % global_batch and ctx.is_rank_zero:
        log.warning(
            "global batch changed since the checkpoint: the current epoch continues from sample %d",
            state.samples_in_epoch,
        )
    if ctx.is_distributed:
        dist.barrier(group=control.group)
    log.info("resumed from %s (step %d)", folder.name, state.step)
    return state, folder, window_loss_sum.to(ctx.device)


def set_aside_other_trajectories(root: Path, resumed: Path | None) -> str | None:
    """Rank 0, once the run's first step ran (a config refused before it changes nothing): the checkpoints
    this run does not continue leave the step-N names (`ckpt.set_aside_other_trajectories`), said in one
    line. Returns why they could not, for every rank to stop on: left in place, the newest of them is
    what `checkpoint.resume: auto` takes, not this run's own checkpoints."""
    try:
        names = ckpt.set_aside_other_trajectories(root, resumed)
    except UserError as err:  # `latest` made a folder by hand: rank 0's alone, so said by every rank
        return str(err)
    except OSError as err:
        return (
            f"could not set aside the checkpoints in {root} that this run does not continue ({err}); left there, "
            "checkpoint.resume=auto would resume the newest of them instead of this run's: move the later step "
            "folders out of it (or give this user write access to it) and start the run again"
        )
    if names:
        log.warning(ckpt.other_trajectories_summary(root, names))
    return None


def export_weights(strategy: Strategy, ctx: DistContext, path: Path, step: int, fold=None) -> None:
    """Consolidated fp32 weights with the bare model's names (collective; rank 0 writes).

    `fold` maps the strategy's full state_dict to the exported one (compression: masks folded in).
    """
    tensors = strategy.full_state_dict()
    if fold is not None:
        tensors = fold(tensors)
    if ctx.is_rank_zero and tensors is not None:
        save_file(tensors, path, metadata={"format": "pt", "step": str(step)})
        log.info("wrote %s (%d tensors)", path, len(tensors))


def _restore_rank_state(folder: Path, manifest: dict, strategy: Strategy, ctx: DistContext) -> torch.Tensor:
    """This rank's RNG streams and persistent buffers from its rank file (same world size); the open
    logging window's loss sum, which rank 0 carries for all the ranks that wrote one otherwise."""
    window_loss_sum = torch.zeros((), dtype=torch.float64)
    rank_path = folder / ckpt.rng_file(ctx.rank)
    if rank_path.exists() and manifest["world_size"] == ctx.world_size:
        rank_state = ckpt.load_payload(rank_path)
        ckpt.set_rng_state(rank_state["rng"])
        window_loss_sum = rank_state["window_loss_sum"]
        with torch.no_grad():  # the checkpoint's model state holds rank 0's
            for name, buffer in _persistent_buffers(strategy.module).items():
                if name in rank_state.get("buffers", {}):
                    buffer.copy_(rank_state["buffers"][name])
    elif ctx.is_rank_zero:
        log.warning("world size changed (%d -> %d): RNG streams start fresh", manifest["world_size"], ctx.world_size)
        # the open window's loss, summed over the ranks that wrote it: the next logged loss is all-reduced,
        # so rank 0 carries the whole sum and the window's mean comes out as in the uninterrupted run
        for rank in range(manifest["world_size"]):
            window_loss_sum = window_loss_sum + ckpt.load_payload(folder / ckpt.rng_file(rank))["window_loss_sum"]
    return torch.as_tensor(window_loss_sum, dtype=torch.float64)


def claim_output_dir(
    output_dir: Path, ctx: DistContext, control: Control, held: contextlib.ExitStack, tensorboard: bool = False
) -> None:
    """Rank 0 creates the run's folder and locks it for this run (the lock closes with `held`); a folder
    it cannot create or write in, one in use by another run, one with a file in the way of the run's
    own, or one in a checkpoint folder is refused on every rank alike."""
    refused = None
    if ctx.is_rank_zero and (refused := ckpt.in_a_checkpoint(output_dir)) is None:  # before the lock file is written
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            refused = f"run.output_dir {output_dir}: cannot create it ({err.strerror}); choose another"
        else:  # one run at a time per folder; a folder this user cannot write in (read-only, another owner's)
            try:
                held.callback(os.close, ckpt.lock_output_dir(output_dir))
            except UserError as err:
                refused = str(err)
            except OSError as err:
                refused = f"run.output_dir {output_dir}: cannot write in it ({err.strerror}); choose another"
            else:
                refused = ckpt.in_the_way(output_dir, tensorboard)
    refused = control.broadcast_object(refused)  # every rank stops, not only the one that saw it
    if refused:
        raise on_every_rank(UserError(refused))
