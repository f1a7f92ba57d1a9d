"""`dist-train check CONFIG [KEY=VALUE ...] [--world-size N] [--json]`: validate a config and say what
the run will do, without starting a process group.

It builds the datasets (sizes, steps per epoch) and the model (on the meta device when the factory
allows: no memory), then reports batch shape, steps and epochs, the LR schedule's key points, the
DeepSpeed JSON the strategy would pass, per-rank memory under every strategy, and warnings for
known pitfalls (see `pitfalls.py`). Exit 0 when the config is valid (warnings included), 2 when not.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..build import DATA_SEED_OFFSET, initial_model, require_eval_split, require_fused_loss_support
from ..cli import ArgParser
from ..compress import Compression
from ..config import Config, load_config
from ..config.checks import check_watched_metrics_fit_outputs
from ..data import build_eval_data, build_train_data
from ..distributed import DistContext
from ..errors import UserError
from ..imports import raised
from ..losses import build_loss
from ..metrics import tokens_per_sample
from ..misfit import FORWARD_ERRORS, ForwardError, require_tensor_outputs
from ..misfit import where as where_raised
from ..optim import lr_at
from ..rng import seed_everything
from ..strategies import build_strategy
from ..transforms import preferred_attention
from . import memory
from .pitfalls import checkpoint_size, find_pitfalls
from .report import human_bytes, key_values, table


def _parser() -> ArgParser:
    parser = ArgParser(prog="dist-train check", description="Validate a config and print what the run will do.")
    parser.add_argument("args", nargs="*", metavar="CONFIG [KEY=VALUE ...]", help="config file, then overrides")
    parser.add_argument("--config", help="config file (instead of the first positional argument)")
    parser.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: the launcher's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def split_config_args(config: str | None, args: list[str], command: str) -> tuple[str, list[str]]:
    """`CONFIG KEY=VALUE ...` or `--config CONFIG KEY=VALUE ...` -> (config, overrides)."""
    if config:
        return config, args
    if not args or "=" in args[0]:
        raise UserError(f"give a config file: dist-train {command} CONFIG [KEY=VALUE ...]")
    return args[0], args[1:]


def default_world_size() -> tuple[int, str]:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]), var
    return 1, "default"


def lr_points(cfg: Config, total: int) -> list[dict]:
    """The schedule's key points up to step `total`, as logged steps (step s is trained with lr_at(s - 1))."""
    warmup = cfg.schedule.warmup_steps
    steps = {1, total, max(1, total // 4), max(1, total // 2), max(1, 3 * total // 4)}
    if 0 < warmup <= total:
        steps.add(warmup)
    if cfg.schedule.name == "step":
        # the first steps at each new LR (logged step s trains with lr_at(s - 1))
        steps.update(range(warmup + cfg.schedule.step_size + 1, total + 1, cfg.schedule.step_size)[:3])
    if cfg.schedule.name == "multistep":  # the last step at each LR and the first at the next
        steps.update(s for m in cfg.schedule.milestones for s in (m, m + 1) if s <= total)
    return [{"step": s, "lr": lr_at(cfg, s - 1)} for s in sorted(steps)]


def deepspeed_json(cfg: Config, world_size: int) -> tuple[dict | None, str]:
    """The DeepSpeed config the strategy would pass, or None with the reason."""
    if cfg.strategy.name != "deepspeed":
        return None, f"n/a (strategy.name={cfg.strategy.name})"
    try:
        from ..strategies.deepspeed import check_schema, deepspeed_config
    except ImportError as err:
        return None, f"n/a (the DeepSpeed strategy is not available: {err})"
    try:
        config = deepspeed_config(cfg, world_size)
        check_schema(cfg, config)  # a value DeepSpeed's parser refuses stops the run (exit 2): here too
        return config, "passed to deepspeed.initialize"
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the report goes on; the error is shown in its place
        return None, f"n/a ({type(err).__name__}: {err})"


PROBE_MAX_PARAMETERS = 200_000_000  # the first-batch probe builds the model for real on the CPU


def probe_first_batch(cfg: Config, data, model: nn.Module, where: str, numel: int) -> dict:
    """Forward and loss of rank 0's first micro-batch (up to 4 samples, fp32, eval mode, no grad) on
    the CPU, as the run's first step would meet them: a model and data that disagree (input width,
    vocabulary, sequence length, classes; misfit.py) are a UserError here, before any job is queued."""
    if where != "cpu":
        if numel > PROBE_MAX_PARAMETERS:
            return {"checked": False, "note": f"not run: {numel:,} parameters; the run's first step checks it"}
        model = initial_model(cfg)  # the run's first weights (model.init included)
    count = min(cfg.train.micro_batch_size, 4)
    data.sampler.set_epoch(0)
    data.sampler.set_start(0)
    indices = list(itertools.islice(iter(data.sampler), count))
    what = f"rank 0's first micro-batch ({count} samples, dist-train check)"
    try:  # items of other shapes (variable-length, unpadded), an item that raises: the run's first step fails
        inputs, targets = data.loader.collate_fn([data.dataset[i] for i in indices])
    except Exception as err:  # noqa: BLE001 - the user's dataset: any error, said in one line
        raise UserError(f"loading {what} raised {raised(err)}: the run would fail at its first step") from None
    loss, outputs = build_loss(cfg.train.loss, **cfg.train.loss_kwargs), None
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(inputs)
            require_tensor_outputs(outputs)  # as the run's first step refuses it
            value = loss.sum(outputs, targets) / max(1, loss.count(targets))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the model's own raise too (an assert, a KeyError): one line
        error = ForwardError(err, inputs, targets, outputs)
        if isinstance(err, FORWARD_ERRORS) and error.is_misfit():
            raise error.as_user_error(what) from None
        message = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"the model's forward or loss raised {type(err).__name__}: {message}{where_raised(err)} on {what}: the run "
            "would fail at its first step"
        ) from None
    shape = tuple(outputs.shape)
    check_watched_metrics_fit_outputs(cfg, len(shape))
    value = float(value)  # not finite: a string, as metrics.jsonl writes it (JSON has no NaN/inf)
    return {"checked": True, "samples": count, "outputs": shape, "loss": value if math.isfinite(value) else str(value)}


def estimate_activations(cfg: Config, model: nn.Module, sample: torch.Tensor, where: str, numel: int):
    """(activation bytes or None, how they were had). A forward the meta device cannot run (Hugging
    Face models: their mask code reads a tensor's value) is measured on the CPU instead, for models
    up to PROBE_MAX_PARAMETERS as the first-batch probe (it was n/a for every Hugging Face model)."""
    try:
        return memory.activation_bytes(model, sample, cfg, where), f"estimated on the {where} device"
    except UserError:  # e.g. train.grad_checkpointing on a model without blocks: the run would refuse it too
        raise
    except Exception as err:  # noqa: BLE001 - an estimate only: report why it is missing
        if where == "meta" and numel <= PROBE_MAX_PARAMETERS:
            return estimate_activations(cfg, initial_model(cfg), sample, "cpu", numel)
        return None, f"n/a ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def check_output_dir(output_dir: str, tensorboard: bool = False) -> None:
    """The run's `mkdir -p run.output_dir`, creating nothing: a file in its way (the folder itself or
    one above it), or one in the way of the run's own files inside, makes the run stop with exit 2.
    Permissions are left alone (this machine may not be the one that writes), except a folder this
    user may not enter at all: the run would refuse it, and nothing past it can be checked."""
    if refused := ckpt.in_a_checkpoint(Path(output_dir)):
        raise UserError(refused)
    path = Path(output_dir).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except PermissionError as err:  # a folder above it this user may not enter: the run's mkdir fails alike
        raise UserError(f"run.output_dir {output_dir}: cannot create it ({err.strerror}); choose another") from None
    if not existing.is_dir():
        reason = errno.EEXIST if existing == path else errno.ENOTDIR
        raise UserError(f"run.output_dir {output_dir}: cannot create it ({os.strerror(reason)}); choose another")
    try:
        refused = ckpt.in_the_way(Path(output_dir), tensorboard) if existing == path else None
    except PermissionError as err:  # a folder this user may not even look into (another user's, mode 700)
        raise UserError(f"run.output_dir {output_dir}: cannot write in it ({err.strerror}); choose another") from None
    if refused:  # as the run refuses it
        raise UserError(refused)


def inspect_config(cfg: Config, world_size: int, world_source: str = "--world-size") -> dict:
    """Everything `check` reports, as a JSON-ready dict. Raises UserError when the run would refuse the config."""
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    check_output_dir(cfg.run.output_dir, cfg.log.tensorboard)
    ctx = DistContext(0, 0, world_size, world_size, torch.device("cpu"), None, "single")
    seed_everything(cfg.run.seed + DATA_SEED_OFFSET)  # the run's data, from factories that draw from torch's RNG
    data = build_train_data(cfg, ctx)  # the same checks as the run: batch vs split size, drop_last
    train_len = len(data.dataset)
    eval_data = build_eval_data(cfg, ctx)  # as the run: eval items its first eval batch cannot stack are refused
    require_eval_split(cfg, eval_data is not None)
    if cfg.log.tensorboard:
        from ..imports import require

        require("tensorboard", "tb", "log.tensorboard")
    sample = data.dataset[0][0]
    tokens = tokens_per_sample(sample)
    total_steps = cfg.train.max_steps
    if cfg.train.epochs:
        total_steps = min(total_steps, cfg.train.epochs * data.steps_per_epoch)

    model, where = memory.build_for_inspection(cfg)
    require_fused_loss_support(cfg, model)
    build_strategy(cfg, ctx).check_model(model)  # as the strategy's set-up refuses it (0-d, mixed dtypes)
    if cfg.train.sync_batchnorm:  # as the run's transform refuses it: a BatchNorm subclass it would cut down
        from ..sync_batchnorm import check_convertible

        check_convertible(model)
    compression = Compression(cfg, model)
    compression.probe(sample)  # as the run builds it: what compress.* cannot use is refused
    if cfg.train.epochs:
        compression.check_run_length(total_steps)  # train.epochs ending the run before QAT or the ramp
    numel, trainable = memory.count_parameters(model)
    with preferred_attention(cfg.train.sdpa_backend):  # as the run's forwards (torch >= 2.6 for a preference)
        first_batch = probe_first_batch(cfg, data, model, where, numel)
    activations, act_note = estimate_activations(cfg, model, sample, where, numel)
    ds_config, ds_note = deepspeed_json(cfg, world_size)
    persistent = memory.zero3_persistent_numel(model, (ds_config or {}).get("zero_optimization", {}))
    states = memory.model_state_bytes(
        numel, trainable, world_size, cfg.train.precision, memory.optimizer_states_per_param(cfg), persistent
    )
    per_rank = {row: {**s.as_dict(), "with_activations": s.total + (activations or 0)} for row, s in states.items()}
    report = {
        "world_size": world_size,
        "world_size_source": world_source,
        "model": {"name": cfg.model.name, "parameters": numel, "trainable_parameters": trainable},
        "data": {
            "name": cfg.data.name,
            "train_samples": train_len,
            "eval_samples": len(eval_data.loader.dataset) if eval_data else 0,
        },
        "first_batch": first_batch,
        "strategy": cfg.strategy.name,
        "precision": cfg.train.precision,
        "batch": {
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "global_batch": data.global_batch,
            "tokens_per_step": data.global_batch * tokens if tokens > 1 else None,
        },
        "steps": {
            "total": total_steps,
            "max_steps": cfg.train.max_steps,
            "steps_per_epoch": data.steps_per_epoch,
            "epochs": total_steps / data.steps_per_epoch,
            "samples": total_steps * data.global_batch,
            "dropped_per_epoch": train_len - data.sampler.usable_samples(),
        },
        "lr_schedule": {
            "name": cfg.schedule.name,
            "warmup_steps": cfg.schedule.warmup_steps,
            "points": lr_points(cfg, total_steps),
        },
        "deepspeed_config": ds_config,
        "deepspeed_note": ds_note,
        "memory": {
            "precision_note": memory.precision_note(cfg.train.precision),
            "configured": memory.configured_row(cfg),
            "activations": activations,
            "activation_note": act_note,
            "per_rank": per_rank,
        },
        "checkpoint_bytes": checkpoint_size(trainable, numel, cfg),
    }
    report["warnings"] = find_pitfalls(cfg, model, report)
    return report


def first_batch_line(probe: dict) -> str:
    if not probe["checked"]:
        return probe["note"]
    loss = f"{probe['loss']:.4g}" if isinstance(probe["loss"], float) else probe["loss"]  # "nan", "inf"
    return (
        f"forward and loss ran on {probe['samples']} samples of rank 0's first micro-batch "
        f"(CPU, fp32): outputs {probe['outputs']}, loss {loss}"
    )


def render(report: dict, config_path: str) -> str:
    b, s, m = report["batch"], report["steps"], report["model"]
    tokens = f" ({b['tokens_per_step']:,} tokens)" if b["tokens_per_step"] else ""
    epochs = f"{s['steps_per_epoch']:,} steps per epoch -> {s['epochs']:.2f} epochs"
    lines = [
        f"dist-train check {config_path}",
        key_values(
            [
                ("model", f"{m['name']}: {m['parameters']:,} parameters ({m['trainable_parameters']:,} trainable)"),
                (
                    "data",
                    f"{report['data']['name']}: {report['data']['train_samples']:,} train samples, "
                    f"{report['data']['eval_samples']:,} eval",
                ),
                ("first batch", first_batch_line(report["first_batch"])),
                ("strategy", f"{report['strategy']}, precision {report['precision']}"),
                ("world size", f"{report['world_size']} ({report['world_size_source']})"),
                ("micro-batch", f"{b['micro_batch_size']} per rank"),
                ("accumulation", f"{b['grad_accum_steps']} micro-step(s) per optimizer step"),
                ("global batch", f"{b['global_batch']:,} samples{tokens}"),
                ("steps", f"{s['total']:,} ({epochs}; {s['samples']:,} samples)"),
            ]
        ),
        "",
        f"LR schedule: {report['lr_schedule']['name']}, warm-up {report['lr_schedule']['warmup_steps']} steps",
        table(
            ["step", "lr"],
            [[str(p["step"]), f"{p['lr']:.3e}"] for p in report["lr_schedule"]["points"]],
            align="rr",
        ),
        "",
        f"DeepSpeed config: {report['deepspeed_note'] if report['deepspeed_config'] is None else ''}".rstrip(),
    ]
    if report["deepspeed_config"] is not None:
        lines.append("\n".join("  " + line for line in json.dumps(report["deepspeed_config"], indent=2).splitlines()))
    mem = report["memory"]
    lines += ["", f"Memory per rank at world size {report['world_size']}", f"  {mem['precision_note']}"]
    rows = []
    for row, v in mem["per_rank"].items():
        label = memory.ROW_LABELS[row] + (" *" if row == mem["configured"] else "")
        act = human_bytes(mem["activations"]) if mem["activations"] is not None else "n/a"
        cells = [v["params"], v["grads"], v["optimizer"], v["total"]]
        rows.append([label, *map(human_bytes, cells), act, human_bytes(v["with_activations"])])
    header = ["strategy", "params", "grads", "optimizer", "model states", "activations", "total"]
    lines.append(table(header, rows))
    lines.append(
        f"  * this config. Activations: one micro-batch of {b['micro_batch_size']}, saved for backward, "
        f"{mem['activation_note']}."
    )
    lines += ["", "Warnings:" if report["warnings"] else "No warnings."]
    lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    config_path, overrides = split_config_args(args.config, args.args, "check")
    cfg = load_config(config_path, overrides)
    world_size, source = (args.world_size, "--world-size") if args.world_size is not None else default_world_size()
    report = inspect_config(cfg, world_size, source)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report, config_path))
    return 0
