"""Checking a config: each value against its key's type (`coerce`), then values the types allow
but a run cannot use (`validate`)."""

from __future__ import annotations

import difflib
import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from ..errors import UserError
from .schema import CUDA_GRAPH_MODES, MAX_SEED, MAX_TIMEOUT_S, REQUIRED_KEYS, Config

MAX_INT = 2**63  # |int key| below it: torch and its C++ take steps, sizes and counts as int64


def nearest(name: str, options: list[str], prefix: str = "") -> str:
    """' (did you mean `prefix + option`?)' for the option closest to `name`, else the valid options.
    A name that is a whole word of exactly one option is that option (`patience` is
    `early_stopping_patience`, which spelling alone put behind `at_end`)."""
    words = [option for option in options if name and set(name.split("_")) <= set(option.split("_"))]
    close = words if len(words) == 1 else difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean `{prefix}{close[0]}`?)" if close else f" (valid: {', '.join(options)})"


WANTED = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _wanted(tp: Any) -> str:
    """What a value of annotation `tp` must be, in words: `an integer or null`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if option is type(None) else _wanted(option) for option in get_args(tp))
    if origin is Literal:
        return f"one of {', '.join(map(str, get_args(tp)))}"
    return WANTED.get(origin or tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; convert numeric spellings for numbers."""
    converted = _convert(value, tp)
    if converted is _INVALID:
        quote = ""
        if isinstance(value, bool) and _convert("text", tp) is not _INVALID:  # a text key: `output_dir: no`
            quote = " (YAML reads yes/no/on/off/true/false as a boolean: quote the text, e.g. 'no')"
        raise UserError(f"`{path}` must be {_wanted(tp)}, got {value!r}{quote}")
    if isinstance(converted, str) and "\0" in converted:  # no path or name holds one (os calls raise ValueError)
        raise UserError(f"`{path}` must not contain a NUL character (\\0), got {value!r}")
    if isinstance(converted, int) and not isinstance(converted, bool) and not -MAX_INT < converted < MAX_INT:
        raise UserError(f"`{path}` must be an integer between -2**63 and 2**63 (exclusive), got {value!r}")
    return converted


_INVALID = object()


def _convert(value: Any, tp: Any) -> Any:
    """`value` as annotation `tp` wants it, or _INVALID."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for option in get_args(tp):
            converted = _INVALID if option is type(None) else _convert(value, option)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is Literal:
        return value if value in get_args(tp) else _INVALID
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        if number and isinstance(value, int):  # as it is (coerce bounds it): float() overflows past 1.8e308
            return value
        if number and value.is_integer():
            return int(value)  # `train.max_steps=1e5`
        return _INVALID
    if tp is float:
        if isinstance(value, str):  # a spelling YAML left as text (`1_0e-3`): accept every numeric spelling
            try:
                value, number = float(value), True
            except ValueError:
                return _INVALID
        try:
            return float(value) if number and math.isfinite(value) else _INVALID
        except OverflowError:  # an integer past the largest float (1.8e308)
            return _INVALID
    if tp is str:
        if number:
            return str(value)  # a path or name that YAML read as a number (`run.output_dir=2024`)
        return value if isinstance(value, str) else _INVALID
    if tp is list or origin is list:
        return value if isinstance(value, list) else _INVALID
    if tp is dict or origin is dict:
        return value if isinstance(value, dict) else _INVALID
    return value


def _positive(value: Any, path: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"`{path}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_timeout(value: float, path: str) -> None:
    """A timeout in seconds: positive, at most 30 days (a longer one overflows the deadlines built from it)."""
    if not 0 < value <= MAX_TIMEOUT_S:
        raise UserError(f"`{path}` must be a number of seconds > 0 and <= {MAX_TIMEOUT_S} (30 days), got {value!r}")


def validate(cfg: Config) -> None:
    """Values the types allow but a run cannot use."""
    for path in REQUIRED_KEYS:
        section, key = path.split(".")
        if not getattr(getattr(cfg, section), key):
            raise UserError(f"`{path}` is required: set it in the config file or as `{path}=...`")
    if not -MAX_SEED < cfg.run.seed < MAX_SEED:
        raise UserError(f"`run.seed` must be an integer between -2**32 and 2**32 (exclusive), got {cfg.run.seed}")
    t = cfg.train
    _positive(t.max_steps, "train.max_steps")
    _positive(t.epochs, "train.epochs", allow_none=True)
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.grad_accum_steps, "train.grad_accum_steps")
    _positive(t.lr, "train.lr")
    _positive(t.grad_clip_norm, "train.grad_clip_norm", allow_none=True)
    _positive(t.grad_clip_value, "train.grad_clip_value", allow_none=True)
    _positive(t.grad_checkpointing_every, "train.grad_checkpointing_every")
    if t.grad_checkpointing_every != 1 and not t.grad_checkpointing:  # as compile_mode without compile
        raise UserError(
            f"train.grad_checkpointing_every={t.grad_checkpointing_every} needs train.grad_checkpointing=true "
            "(or leave grad_checkpointing_every at 1)"
        )
    _positive(t.max_nonfinite_steps, "train.max_nonfinite_steps")
    if t.fused_loss and t.loss != "cross_entropy":
        raise UserError(
            f"train.fused_loss computes cross_entropy inside the model; train.loss is {t.loss}: "
            "set train.loss=cross_entropy, or train.fused_loss=false"
        )
    _validate_compile_mode(cfg)
    _positive(cfg.optim.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(cfg.optim.eps, "optim.eps", allow_zero=True)
    if not 0 <= cfg.optim.momentum < 1:  # 1 and past it: the momentum buffer never forgets, the steps grow
        raise UserError(f"`optim.momentum` must be in [0, 1), got {cfg.optim.momentum}")
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and not cfg.optim.momentum:
        raise UserError("`optim.nesterov=true` needs `optim.momentum` > 0 (Nesterov momentum without momentum)")
    _positive(cfg.schedule.gamma, "schedule.gamma")
    if cfg.strategy.name == "deepspeed" and t.grad_clip_value:
        raise UserError("train.grad_clip_value is not supported with strategy.name=deepspeed; use train.grad_clip_norm")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise UserError(f"`optim.betas` must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    _positive(cfg.schedule.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    _positive(cfg.schedule.step_size, "schedule.step_size")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise UserError(f"`schedule.min_lr_ratio` must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    _positive(cfg.model.init_std, "model.init_std")
    _validate_param_groups(cfg.optim.param_groups)
    _validate_schedule(cfg)
    _validate_watched_metrics(cfg)
    _validate_compress(cfg)
    _positive(cfg.loader.num_workers, "loader.num_workers", allow_zero=True)
    _positive(cfg.loader.prefetch_factor, "loader.prefetch_factor")
    _positive(cfg.eval.every_steps, "eval.every_steps", allow_none=True)
    _positive(cfg.eval.micro_batch_size, "eval.micro_batch_size", allow_none=True)
    _positive(cfg.eval.early_stopping_patience, "eval.early_stopping_patience", allow_none=True)
    _positive(cfg.eval.min_delta, "eval.min_delta", allow_zero=True)  # < 0: a worse metric would count as better
    if cfg.eval.early_stopping_patience and not cfg.eval.every_steps:  # the at-end evaluation is not counted
        raise UserError(
            "eval.early_stopping_patience counts the evaluations every eval.every_steps steps: set eval.every_steps"
        )
    if not 0 <= cfg.strategy.zero_stage <= 3:
        raise UserError(f"`strategy.zero_stage` must be 0, 1, 2 or 3, got {cfg.strategy.zero_stage}")
    _positive(cfg.strategy.bucket_cap_mb, "strategy.bucket_cap_mb")
    check_timeout(cfg.dist.timeout_s, "dist.timeout_s")
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps", allow_none=True)
    _positive(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(cfg.checkpoint.keep_every, "checkpoint.keep_every", allow_none=True)
    check_timeout(cfg.checkpoint.save_timeout_s, "checkpoint.save_timeout_s")
    if not cfg.checkpoint.resume:  # Path("") is the working folder: a run there would be resumed from, silently
        raise UserError(
            "`checkpoint.resume` must be auto, never, or the path of a checkpoint or run folder, got '' "
            "(leave it out for auto)"
        )
    _positive(cfg.log.every_steps, "log.every_steps")


def _validate_compile_mode(cfg: Config) -> None:
    mode = cfg.train.compile_mode
    if mode != "default" and not cfg.train.compile:
        raise UserError(f"train.compile_mode={mode} needs train.compile=true (or leave compile_mode at default)")
    if mode in CUDA_GRAPH_MODES and cfg.strategy.name != "ddp":
        raise UserError(
            f"train.compile_mode={mode} replays CUDA graphs, which dist_train supports with strategy.name=ddp only "
            f"(FSDP2 and DeepSpeed move parameters and gradients between steps): use max-autotune-no-cudagraphs"
        )


PARAM_GROUP_KEYS = ("match", "lr_scale", "weight_decay")


def _validate_param_groups(rules: list) -> None:
    """Each rule: a mapping with a `match` pattern and optional non-negative `lr_scale`/`weight_decay`."""
    from ..patterns import compile_pattern

    for i, rule in enumerate(rules):
        path = f"optim.param_groups[{i}]"
        if not isinstance(rule, dict):
            raise UserError(f"`{path}` must be a mapping like {{match: 'head.*', lr_scale: 0.1}}, got {rule!r}")
        for key in rule:
            if key not in PARAM_GROUP_KEYS:
                raise UserError(f"unknown key `{key}` in `{path}`{nearest(str(key), list(PARAM_GROUP_KEYS))}")
        if "match" not in rule:
            raise UserError(f"`{path}` needs `match`: a glob on parameter names (`head.*`) or `re:<regex>`")
        compile_pattern(rule["match"], f"{path}.match")
        for key in ("lr_scale", "weight_decay"):
            if key in rule:
                rule[key] = coerce(rule[key], float, f"{path}.{key}")
                _positive(rule[key], f"{path}.{key}", allow_zero=True)


def eval_metrics(loss: str) -> list[str]:
    """The metrics an evaluation row holds for `train.loss` (perplexity: when the outputs are LM logits)."""
    metrics = ["eval_loss"]
    if loss in ("cross_entropy", "focal", "bce_with_logits"):
        metrics.append("eval_accuracy")
    if loss in ("cross_entropy", "focal"):
        metrics.append("eval_perplexity")
    return metrics


def _watched_metrics(cfg: Config) -> list[tuple[str, str]]:
    """(key, metric) for each evaluation metric the run reads: early stopping's and the plateau schedule's."""
    watched = []
    if cfg.eval.early_stopping_patience:
        watched.append(("eval.metric", cfg.eval.metric))
    if cfg.schedule.name == "plateau":
        # an unset plateau_metric follows eval.metric: a bad value is then named as the key the user set
        key = "schedule.plateau_metric" if cfg.schedule.plateau_metric else "eval.metric"
        watched.append((key, cfg.schedule.plateau_metric or cfg.eval.metric))
    return watched


def check_watched_metrics_fit_outputs(cfg: Config, output_dims: int) -> None:
    """eval_perplexity exists for language-model outputs (batch, tokens, vocab) only: a watched metric
    that names it for other outputs is refused at the first batch, not at the first evaluation."""
    for key, metric in _watched_metrics(cfg):
        if metric == "eval_perplexity" and output_dims != 3:
            raise UserError(
                f"{key}=eval_perplexity needs language-model outputs (batch, tokens, vocab), but this model's "
                f"outputs have {output_dims} dimensions: watch eval_loss or eval_accuracy"
            )


def _validate_watched_metrics(cfg: Config) -> None:
    """eval.metric (early stopping) and schedule.plateau_metric name a metric the evaluation reports."""
    known = eval_metrics(cfg.train.loss)
    for key, metric in _watched_metrics(cfg):
        if metric not in known:
            raise UserError(
                f"{key}={metric!r} is not a metric of train.loss={cfg.train.loss} (it has {', '.join(known)})"
            )


def _validate_schedule(cfg: Config) -> None:
    s = cfg.schedule
    if s.name == "multistep":
        # steps, read like an int key: `[3e4, 4.5e4]` (YAML 1.2 floats) are steps 30000 and 45000
        s.milestones = [coerce(m, int, f"schedule.milestones[{i}]") for i, m in enumerate(s.milestones)]
        if not s.milestones or not all(m > 0 for m in s.milestones):
            raise UserError(f"`schedule.milestones` must be a non-empty list of positive steps, got {s.milestones!r}")
        if sorted(set(s.milestones)) != s.milestones:
            raise UserError(f"`schedule.milestones` must be strictly increasing, got {s.milestones!r}")
    if s.name == "plateau" and not cfg.eval.every_steps:
        raise UserError("schedule.name=plateau reduces the LR after evaluations: set eval.every_steps")
    _positive(s.plateau_patience, "schedule.plateau_patience", allow_zero=True)
    _positive(s.plateau_cooldown, "schedule.plateau_cooldown", allow_zero=True)
    _positive(s.plateau_threshold, "schedule.plateau_threshold", allow_zero=True)
    _positive(s.min_lr, "schedule.min_lr", allow_zero=True)
    if not 0 < s.plateau_factor < 1:
        raise UserError(f"`schedule.plateau_factor` must be in (0, 1), got {s.plateau_factor}")


def _validate_compress(cfg: Config) -> None:
    c = cfg.compress
    sharded = cfg.strategy.name == "fsdp" or (cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3)
    stage = f" with zero_stage={cfg.strategy.zero_stage}" if cfg.strategy.name == "deepspeed" else ""
    where = f"strategy.name={cfg.strategy.name}{stage}"
    if (c.prune != "none" or c.dynamic_quant_export) and sharded:
        raise UserError(
            f"compress.prune/dynamic_quant_export need every rank to hold whole weights; {where} shards them: "
            "use strategy.name=ddp or deepspeed with zero_stage <= 2"
        )
    if not 0 <= c.prune_sparsity < 1:
        raise UserError(f"`compress.prune_sparsity` must be in [0, 1), got {c.prune_sparsity}")
    _positive(c.prune_start_step, "compress.prune_start_step", allow_zero=True)
    _positive(c.prune_every_steps, "compress.prune_every_steps")
    if c.prune_end_step is not None and c.prune_end_step < c.prune_start_step:
        raise UserError(
            f"`compress.prune_end_step` ({c.prune_end_step}) must be >= prune_start_step ({c.prune_start_step})"
        )
    max_steps = cfg.train.max_steps
    if c.prune != "none" and (c.prune_start_step >= max_steps or (c.prune_end_step or 0) >= max_steps):
        raise UserError(
            f"compress.prune_start_step ({c.prune_start_step}) and prune_end_step ({c.prune_end_step}) must be below "
            f"train.max_steps ({max_steps}): masks change as a step starts (steps count from 0), so the target "
            "sparsity would never be reached"
        )
    if c.prune != "none" and c.prune_end_step is None and c.prune_start_step > max_steps // 2:
        raise UserError(
            f"compress.prune_start_step ({c.prune_start_step}) is past the default prune_end_step, train.max_steps "
            f"// 2 ({max_steps // 2}): set compress.prune_end_step (>= {c.prune_start_step}, below {max_steps})"
        )
    if c.qat and c.qat_start_step >= max_steps:
        raise UserError(
            f"compress.qat_start_step ({c.qat_start_step}) must be below train.max_steps ({max_steps}): "
            "the observers would never see a batch"
        )
    if not all(isinstance(name, str) for name in c.prune_modules):
        raise UserError(f"`compress.prune_modules` must be a list of torch.nn class names, got {c.prune_modules!r}")
    from ..patterns import compile_pattern

    for i, pattern in enumerate(c.prune_exclude):
        compile_pattern(pattern, f"compress.prune_exclude[{i}]")
    _positive(c.prune_norm, "compress.prune_norm")
    _positive(c.prune_dim, "compress.prune_dim", allow_zero=True)
    _positive(c.qat_start_step, "compress.qat_start_step", allow_zero=True)
    if c.qat:
        if cfg.strategy.name != "ddp":
            raise UserError(f"compress.qat needs strategy.name=ddp (observers are kept in step by DDP), not {where}")
        for key, on in (
            ("train.compile", cfg.train.compile),
            ("train.grad_checkpointing", cfg.train.grad_checkpointing),
            ("train.sync_batchnorm", cfg.train.sync_batchnorm),
            ("train.precision=bf16/fp16", cfg.train.precision != "fp32"),
            ("compress.dynamic_quant_export", cfg.compress.dynamic_quant_export),
        ):
            if on:
                raise UserError(f"compress.qat does not combine with {key}: turn one of them off")
