"""Typed, nested run configuration: YAML file + dotted `section.key=value` overrides.

Every field carries its documentation in `metadata["doc"]`; `config_reference()` renders the
README's config table from it, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


def _f(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


REQUIRED = None  # marker default for the three keys the contract makes mandatory


@dataclass
class RunConfig:
    output_dir: str = _f(REQUIRED, "everything the run writes goes here (required)")
    seed: int = _f(0, "one seed drives every RNG on every rank")


@dataclass
class ModelConfig:
    name: str = _f(
        REQUIRED, "registry name (`transformer_lm`, `mlp`, `resnet`, ...) or `package.module:factory` (required)"
    )
    init: Literal["default", "kaiming", "xavier", "normal"] = _f(
        "default",
        "re-initialise after the factory: every >= 2-D parameter from the scheme, biases to 0 (`default`: keep)",
    )
    init_std: float = _f(0.02, "`model.init=normal`: standard deviation")
    kwargs: dict = _f({}, "every other `model.*` key: keyword arguments of the model factory")


@dataclass
class DataConfig:
    name: str = _f(
        REQUIRED, "registry name (`synthetic_tokens`, `synthetic_images`, ...) or `package.module:factory` (required)"
    )
    kwargs: dict = _f({}, "every other `data.*` key: keyword arguments of the dataset factory")


@dataclass
class TrainConfig:
    max_steps: int = _f(1000, "optimizer steps to run; the run ends at this global step")
    epochs: Union[int, None] = _f(None, "also stop after this many passes over the train split (null: no limit)")
    micro_batch_size: int = _f(8, "samples per rank per forward/backward")
    grad_accum_steps: int = _f(1, "micro-steps per optimizer step; global batch = micro x accum x world size")
    lr: float = _f(3e-4, "peak learning rate")
    grad_clip_norm: Union[float, None] = _f(1.0, "clip the global gradient L2 norm to this (null: no clipping)")
    grad_clip_value: Union[float, None] = _f(None, "clamp every gradient element to [-v, v] (null: off)")
    loss: str = _f("cross_entropy", "`cross_entropy`, `mse`, `l1`, `smooth_l1`, `bce_with_logits` or `focal`")
    loss_kwargs: dict = _f({}, "extra loss arguments, e.g. `{label_smoothing: 0.1}` or `{gamma: 2.0}`")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "`bf16` autocast (CPU, CUDA); `fp16` autocast + GradScaler")
    grad_checkpointing: bool = _f(False, "recompute activations in backward (per block, non-reentrant)")
    grad_checkpointing_every: int = _f(1, "checkpoint every k-th block only (1: every block)")
    sync_batchnorm: bool = _f(False, "convert every BatchNorm to a synchronised one")
    compile: bool = _f(False, "wrap the model in torch.compile before the strategy")
    max_nonfinite_steps: int = _f(5, "skip a step whose loss or grad norm is not finite; stop after this many in a row")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimizer")
    weight_decay: float = _f(
        0.01, "decoupled (adamw) or L2 (adam, sgd) decay; never applied to biases and norm weights"
    )
    betas: list = _f([0.9, 0.999], "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    param_groups: list = _f(
        [],
        "per-module rules `{match, lr_scale, weight_decay}`, first match wins: `match` is a glob on parameter "
        "names or `re:<regex>`; unmatched parameters keep the defaults",
    )


@dataclass
class ScheduleConfig:
    name: Literal["constant", "linear", "cosine", "step", "multistep", "plateau"] = _f(
        "constant", "LR schedule after warm-up"
    )
    warmup_steps: int = _f(0, "linear warm-up from 0 to `train.lr` over this many steps")
    min_lr_ratio: float = _f(0.0, "`linear`/`cosine` decay to `train.lr` x this at `train.max_steps`")
    step_size: int = _f(1000, "`step`: multiply the LR by `gamma` every this many steps after warm-up")
    gamma: float = _f(0.1, "`step`/`multistep`: decay factor")
    milestones: list = _f([], "`multistep`: optimizer steps from which the LR is multiplied by `gamma` once more")
    plateau_metric: Union[str, None] = _f(None, "`plateau`: eval metric to watch (null: `eval.metric`)")
    plateau_mode: Union[Literal["min", "max"], None] = _f(
        None, "`plateau`: whether it improves down or up (null: `eval.mode`)"
    )
    plateau_patience: int = _f(
        2, "`plateau`: reduce after more than this many evaluations in a row without improvement"
    )
    plateau_factor: float = _f(0.1, "`plateau`: multiply the LR by this on a plateau")
    plateau_threshold: float = _f(1e-4, "`plateau`: relative change that counts as an improvement")
    plateau_cooldown: int = _f(0, "`plateau`: evaluations to wait after a reduction before counting again")
    min_lr: float = _f(0.0, "`plateau`: never reduce the LR below this")


@dataclass
class CompressConfig:
    prune: Literal["none", "unstructured", "structured"] = _f(
        "none", "magnitude pruning during training: `unstructured` (L1, per weight) or `structured` (Ln, per channel)"
    )
    prune_sparsity: float = _f(0.5, "target fraction of each pruned weight tensor (or of its channels) set to zero")
    prune_modules: list = _f(["Linear", "Conv2d"], "torch.nn module types whose `weight` is pruned")
    prune_exclude: list = _f([], "module names (globs or `re:<regex>`) left unpruned, e.g. `[head]`")
    prune_start_step: int = _f(0, "first step of the sparsity ramp")
    prune_end_step: Union[int, None] = _f(
        None, "step where the target sparsity is reached (null: train.max_steps // 2)"
    )
    prune_every_steps: int = _f(100, "update the masks every this many steps between start and end")
    prune_ramp: Literal["cubic", "linear"] = _f("cubic", "sparsity ramp: `cubic` (Zhu & Gupta 2017) or `linear`")
    prune_norm: float = _f(2.0, "`structured`: the n of the Ln norm that ranks channels")
    prune_dim: int = _f(0, "`structured`: the weight dimension whose slices are pruned (0: output channels)")
    qat: bool = _f(False, "quantization-aware training (fake int8); exports `model_int8.pt` at the end")
    qat_start_step: int = _f(0, "step from which fake quantization and observers are on")
    qat_backend: Literal["x86", "fbgemm", "qnnpack"] = _f("x86", "quantized engine of the int8 model")
    dynamic_quant_export: bool = _f(False, "also export `model_dynamic_int8.pt`: Linear/LSTM/GRU weights int8")


@dataclass
class LoaderConfig:
    num_workers: int = _f(0, "DataLoader worker processes per rank")
    pin_memory: Union[bool, None] = _f(None, "pin host memory (null: on exactly when training on CUDA)")
    persistent_workers: bool = _f(
        False, "keep workers alive between epochs; workers then keep their first epoch's RNG seed across a resume"
    )
    prefetch_factor: int = _f(2, "batches each worker loads ahead (when num_workers > 0)")
    shuffle: bool = _f(True, "reshuffle the train split every epoch (seeded by run.seed and the epoch)")
    drop_last: bool = _f(True, "drop the tail of an epoch that does not fill a global batch")


@dataclass
class EvalConfig:
    every_steps: Union[int, None] = _f(None, "evaluate on the `eval` split every K steps (null: never during training)")
    at_end: bool = _f(True, "evaluate once more after the last step, when an eval split exists")
    micro_batch_size: Union[int, None] = _f(None, "eval samples per rank per forward (null: train.micro_batch_size)")
    metric: str = _f("eval_loss", "metric that early stopping watches")
    mode: Literal["min", "max"] = _f("min", "whether `metric` improves downwards or upwards")
    early_stopping_patience: Union[int, None] = _f(None, "stop after this many evaluations without improvement")
    min_delta: float = _f(0.0, "smallest change of `metric` that counts as an improvement")


@dataclass
class StrategyConfig:
    name: Literal["ddp", "deepspeed", "fsdp"] = _f("ddp", "`ddp` (also world size 1), `deepspeed` or `fsdp` (FSDP2)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage, 0-3")
    offload_optimizer: bool = _f(False, "DeepSpeed: keep optimizer state on the CPU")
    offload_params: bool = _f(False, "DeepSpeed ZeRO-3: keep parameters on the CPU")
    deepspeed_config: Union[dict, str, None] = _f(None, "extra DeepSpeed config (dict or JSON path), merged into ours")
    find_unused_parameters: bool = _f(False, "DDP: allow parameters that get no gradient")
    bucket_cap_mb: int = _f(25, "DDP: gradient bucket size")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward (ZeRO-3 style)")


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "process-group backend (auto: nccl with CUDA, else gloo)")
    timeout_s: float = _f(600.0, "collective timeout; a dead or hung rank fails the others after this long")


@dataclass
class CheckpointConfig:
    every_steps: Union[int, None] = _f(500, "write a checkpoint every K steps (null: only at the end)")
    keep_last: int = _f(3, "keep the newest K checkpoints (older ones are deleted after a new one is complete)")
    keep_every: Union[int, None] = _f(None, "also keep every checkpoint whose step is a multiple of M")
    resume: str = _f("auto", "`auto` (newest valid checkpoint, else fresh), `never`, or a checkpoint/run path")
    at_end: bool = _f(True, "write a checkpoint after the last step")
    save_timeout_s: float = _f(1800.0, "how long ranks wait for a checkpoint save to complete before failing")


@dataclass
class LogConfig:
    every_steps: int = _f(10, "write a metrics row (and a console line) every K steps")
    progress: Literal["auto", "bar", "lines"] = _f("auto", "tqdm bar on a terminal (auto), always, or plain lines")
    tensorboard: bool = _f(False, "also write scalars to `<output_dir>/tb/` (needs the `tb` extra)")
    plot: bool = _f(True, "write `<output_dir>/metrics.png` at the end (needs matplotlib; skipped without)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


FREE_FORM_SECTIONS = ("model", "data")  # keys other than `name` go to the factory as kwargs


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else f" (valid: {', '.join(options)})"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; convert numeric spellings for floats."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except UserError:
                pass
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise UserError(f"`{path}` must be {names}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise UserError(f"`{path}` must be one of {', '.join(map(str, get_args(tp)))}; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"`{path}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"`{path}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` as a string: accept every numeric spelling
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"`{path}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"`{path}` must be a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise UserError(f"`{path}` must be a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise UserError(f"`{path}` must be a mapping, got {value!r}")
    return value


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"section `{section}` must be a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    if section in FREE_FORM_SECTIONS:  # typed keys (`name`, `model.init`, ...) are not factory arguments
        typed = set(names) - {"kwargs"}
        values["kwargs"] = {k: v for k, v in raw.items() if k not in typed}
        raw = {k: v for k, v in raw.items() if k in typed}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"unknown key `{section}.{key}`{_nearest(str(key), names)}")
        if value is None and key in ("output_dir", "name"):
            continue  # a required key left empty: validate() says it is required
        values[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**values)


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise UserError("the config file must hold a mapping of sections (run:, model:, data:, train:, ...)")
    hints = get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    for name in raw:
        if name not in sections:
            raise UserError(f"unknown section `{name}`{_nearest(str(name), sections)}")
    cfg = Config(**{name: _build_section(hints[name], raw.get(name), name) for name in sections})
    validate(cfg)
    return cfg


def _positive(value: Any, path: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"`{path}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Values the types allow but a run cannot use."""
    for path, value in (
        ("run.output_dir", cfg.run.output_dir),
        ("model.name", cfg.model.name),
        ("data.name", cfg.data.name),
    ):
        if not value:
            raise UserError(f"`{path}` is required: set it in the config file or as `{path}=...`")
    t = cfg.train
    _positive(t.max_steps, "train.max_steps")
    _positive(t.epochs, "train.epochs", allow_none=True)
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.grad_accum_steps, "train.grad_accum_steps")
    _positive(t.lr, "train.lr")
    _positive(t.grad_clip_norm, "train.grad_clip_norm", allow_none=True)
    _positive(t.grad_clip_value, "train.grad_clip_value", allow_none=True)
    _positive(t.grad_checkpointing_every, "train.grad_checkpointing_every")
    _positive(t.max_nonfinite_steps, "train.max_nonfinite_steps")
    _positive(cfg.optim.weight_decay, "optim.weight_decay", allow_zero=True)
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise UserError(f"`optim.betas` must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    _positive(cfg.schedule.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    _positive(cfg.schedule.step_size, "schedule.step_size")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise UserError(f"`schedule.min_lr_ratio` must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    _positive(cfg.model.init_std, "model.init_std")
    _validate_param_groups(cfg.optim.param_groups)
    _validate_schedule(cfg)
    _validate_compress(cfg)
    _positive(cfg.loader.num_workers, "loader.num_workers", allow_zero=True)
    _positive(cfg.loader.prefetch_factor, "loader.prefetch_factor")
    _positive(cfg.eval.every_steps, "eval.every_steps", allow_none=True)
    _positive(cfg.eval.micro_batch_size, "eval.micro_batch_size", allow_none=True)
    _positive(cfg.eval.early_stopping_patience, "eval.early_stopping_patience", allow_none=True)
    if not 0 <= cfg.strategy.zero_stage <= 3:
        raise UserError(f"`strategy.zero_stage` must be 0, 1, 2 or 3, got {cfg.strategy.zero_stage}")
    _positive(cfg.strategy.bucket_cap_mb, "strategy.bucket_cap_mb")
    _positive(cfg.dist.timeout_s, "dist.timeout_s")
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps", allow_none=True)
    _positive(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(cfg.checkpoint.keep_every, "checkpoint.keep_every", allow_none=True)
    _positive(cfg.checkpoint.save_timeout_s, "checkpoint.save_timeout_s")
    _positive(cfg.log.every_steps, "log.every_steps")


PARAM_GROUP_KEYS = ("match", "lr_scale", "weight_decay")


def _validate_param_groups(rules: list) -> None:
    """Each rule: a mapping with a `match` pattern and optional non-negative `lr_scale`/`weight_decay`."""
    from .patterns import compile_pattern

    for i, rule in enumerate(rules):
        path = f"optim.param_groups[{i}]"
        if not isinstance(rule, dict):
            raise UserError(f"`{path}` must be a mapping like {{match: 'head.*', lr_scale: 0.1}}, got {rule!r}")
        for key in rule:
            if key not in PARAM_GROUP_KEYS:
                raise UserError(f"unknown key `{key}` in `{path}`{_nearest(str(key), list(PARAM_GROUP_KEYS))}")
        if "match" not in rule:
            raise UserError(f"`{path}` needs `match`: a glob on parameter names (`head.*`) or `re:<regex>`")
        compile_pattern(rule["match"], f"{path}.match")
        for key in ("lr_scale", "weight_decay"):
            if key in rule:
                rule[key] = _coerce(rule[key], float, f"{path}.{key}")
                _positive(rule[key], f"{path}.{key}", allow_zero=True)


def _validate_schedule(cfg: Config) -> None:
    s = cfg.schedule
    if s.name == "multistep":
        if not s.milestones or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in s.milestones):
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
    where = f"strategy.name={cfg.strategy.name}" + (" with zero_stage=3" if cfg.strategy.name == "deepspeed" else "")
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
    if not all(isinstance(name, str) for name in c.prune_modules):
        raise UserError(f"`compress.prune_modules` must be a list of torch.nn class names, got {c.prune_modules!r}")
    from .patterns import compile_pattern

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


def _yaml_error(err: yaml.YAMLError, source: str) -> UserError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if "python/" in str(err):
        problem = "Python object tags (!!python/...) are not allowed in configs"
    return UserError(f"{source}: malformed YAML{where}: {problem}")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings to (path, value) pairs; values are YAML scalars (safe loader)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} must look like `section.key=value` (e.g. train.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise _yaml_error(err, f"override {item!r}") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        if len(path) < 2:
            raise UserError(f"override `{'.'.join(path)}` must name a key inside a section, like `train.lr=3e-4`")
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override `{'.'.join(path)}`: `{part}` is not a mapping")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (safe loader only), apply dotted overrides, build and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path} (check the path given to --config)") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise _yaml_error(err, str(path)) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a mapping of sections (run:, model:, data:, train:, ...)")
    return from_dict(apply_overrides(raw, overrides or []))


def to_dict(cfg: Config) -> dict:
    """The resolved config as a plain nested dict (model/data kwargs flattened back)."""
    out = dataclasses.asdict(cfg)
    for section in FREE_FORM_SECTIONS:
        kwargs = out[section].pop("kwargs")
        out[section].update(kwargs)
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def type_name(tp: Any) -> str:
    """`Union[int, None]` -> `int or null`, `Literal['a', 'b']` -> `a | b`, for the docs."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def config_reference() -> str:
    """A Markdown table of every key: type, default, meaning (the README's config reference)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        cls = get_type_hints(Config)[section.name]
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "kwargs":
                rows.append(f"| `{section.name}.*` | any | | {f.metadata['doc']} |")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            required = default is None and "required" in f.metadata["doc"]
            shown = "required" if required else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            rows.append(f"| `{section.name}.{f.name}` | {type_name(hints[f.name])} | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # `python -m dist_train.config` prints the README's reference table
    print(config_reference())
