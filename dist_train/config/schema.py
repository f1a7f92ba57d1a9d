"""The run configuration's schema: typed, nested dataclasses, one per YAML section.

Every field carries its documentation in `metadata["doc"]`; `config_reference()` renders the
README's config table from it, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


def _f(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


REQUIRED = None  # marker default for the three keys the contract makes mandatory
REQUIRED_KEYS = ("run.output_dir", "model.name", "data.name")
MAX_SEED = 2**32  # |run.seed| below it: the per-rank and per-epoch seeds derived from it stay in torch's range
MAX_TIMEOUT_S = 30 * 24 * 3600  # a collective or save timeout longer than 30 days overflows deadlines (time_t)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # train.compile_mode values that replay CUDA graphs


@dataclass
class RunConfig:
    output_dir: str = _f(REQUIRED, "everything the run writes goes here (required)")
    seed: int = _f(0, "one seed drives every RNG on every rank (-2**32 < seed < 2**32)")


@dataclass
class ModelConfig:
    name: str = _f(
        REQUIRED, "registry name (`transformer_lm`, `mlp`, `resnet`, ...) or `package.module:factory` (required)"
    )
    init: Literal["default", "kaiming", "xavier", "normal"] = _f(
        "default",
        "re-initialise after the factory: every >= 2-D parameter from the scheme, parameters named `*bias` to 0 (`default`: keep)",
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
    fused_loss: bool = _f(
        False,
        "language models: the output projection and `cross_entropy` in one, a chunk of tokens at a time; the "
        "whole logits never exist (`transformer_lm`, `hf_causal_lm`, or a model with `supports_fused_loss`)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "`bf16` autocast (CPU, CUDA); `fp16` autocast + GradScaler")
    grad_checkpointing: bool = _f(False, "recompute activations in backward (per block, non-reentrant)")
    grad_checkpointing_every: int = _f(
        1,
        "with train.grad_checkpointing: checkpoint every k-th block only (1: every block; Hugging Face models: 1 only)",
    )
    sync_batchnorm: bool = _f(False, "convert every BatchNorm to a synchronised one")
    compile: bool = _f(
        False, "torch.compile the model (in place, before the strategy, static shapes) and the training loss"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "default",
        "torch.compile mode under `train.compile`: `max-autotune*` tunes kernels (slow to compile); "
        "`reduce-overhead` and `max-autotune` replay the model as CUDA graphs (CUDA, ddp only)",
    )
    sdpa_backend: Literal["torch", "cudnn", "flash", "efficient", "math"] = _f(
        "torch",
        "the `F.scaled_dot_product_attention` kernel tried first, torch's order after it (a preference: "
        "what it cannot serve falls back); `torch`: torch's own order (torch 2.11 on an H100 picks cuDNN "
        "for causal bf16 attention, older releases flash)",
    )
    max_nonfinite_steps: int = _f(
        5, "skip a step whose loss or grad norm is not finite; stop after this many in a row (fp16: 16 more)"
    )


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimizer")
    weight_decay: float = _f(
        0.01, "decoupled (adamw) or L2 (adam, sgd) decay; never applied to biases and norm weights"
    )
    betas: list = _f([0.9, 0.999], "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon")
    momentum: float = _f(0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = _f(False, "SGD Nesterov momentum (needs `optim.momentum` > 0)")
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
        None,
        "step (from 0, below train.max_steps) where the target sparsity is reached "
        "(null: train.max_steps // 2, not before prune_start_step)",
    )
    prune_every_steps: int = _f(100, "update the masks every this many steps between start and end")
    prune_ramp: Literal["cubic", "linear"] = _f("cubic", "sparsity ramp: `cubic` (Zhu & Gupta 2017) or `linear`")
    prune_norm: float = _f(2.0, "`structured`: the n of the Ln norm that ranks channels")
    prune_dim: int = _f(0, "`structured`: the weight dimension whose slices are pruned (0: output channels)")
    qat: bool = _f(False, "quantization-aware training (fake int8); exports `model_int8.pt` at the end")
    qat_start_step: int = _f(0, "step from which fake quantization and observers are on")
    qat_backend: Literal["x86", "fbgemm", "qnnpack"] = _f("x86", "quantized engine of the int8 model")
    dynamic_quant_export: bool = _f(False, "also export `model_dynamic_int8.pt`: Linear weights int8")


@dataclass
class LoaderConfig:
    num_workers: int = _f(
        0, "DataLoader worker processes per rank; each reseeds per batch, so random transforms resume exactly"
    )
    pin_memory: Union[bool, None] = _f(None, "pin host memory (null: on exactly when training on CUDA)")
    persistent_workers: bool = _f(False, "keep workers alive between epochs")
    prefetch_factor: int = _f(2, "batches each worker loads ahead (when num_workers > 0)")
    shuffle: bool = _f(True, "reshuffle the train split every epoch (seeded by run.seed and the epoch)")
    drop_last: bool = _f(
        True,
        "drop the tail of an epoch that does not fill a global batch (`false`: every step still takes a "
        "full global batch, so a train split that is not a multiple of it is refused)",
    )


@dataclass
class EvalConfig:
    every_steps: Union[int, None] = _f(None, "evaluate on the `eval` split every K steps (null: never during training)")
    at_end: bool = _f(True, "evaluate once more after the last step, when an eval split exists")
    micro_batch_size: Union[int, None] = _f(None, "eval samples per rank per forward (null: train.micro_batch_size)")
    metric: str = _f(
        "eval_loss",
        "metric that early stopping watches: `eval_loss`, `eval_accuracy` (classification losses), "
        "`eval_perplexity` (cross_entropy/focal on LM outputs)",
    )
    mode: Literal["min", "max"] = _f("min", "whether `metric` improves downwards or upwards")
    early_stopping_patience: Union[int, None] = _f(
        None,
        "stop after this many evaluations without improvement (the `eval.every_steps` ones: it needs "
        "`eval.every_steps`; the at-end evaluation is not counted); a run started from an early-stopped "
        "checkpoint stays stopped unless this is null or larger than the evaluations it already counted; "
        "one watching another eval.metric or eval.mode than its checkpoint counts afresh",
    )
    min_delta: float = _f(0.0, "smallest change of `metric` that counts as an improvement")


@dataclass
class StrategyConfig:
    name: Literal["ddp", "deepspeed", "fsdp"] = _f("ddp", "`ddp` (also world size 1), `deepspeed` or `fsdp` (FSDP2)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage, 0-3")
    offload_optimizer: bool = _f(False, "DeepSpeed ZeRO 1-3: keep optimizer state on the CPU")
    offload_params: bool = _f(False, "DeepSpeed ZeRO-3: keep parameters on the CPU")
    deepspeed_config: Union[dict, str, None] = _f(None, "extra DeepSpeed config (dict or JSON path), merged into ours")
    find_unused_parameters: bool = _f(
        False,
        "DDP: allow parameters that get no gradient (without it, at several ranks, a parameter that got none "
        "in the first step is one line, status 2, naming it; one left unused in a later step fails that run, "
        "status 1)",
    )
    bucket_cap_mb: int = _f(25, "DDP: gradient bucket size")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward (ZeRO-3 style)")


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "process-group backend (auto: nccl with CUDA, else gloo)")
    timeout_s: float = _f(
        600.0, "collective timeout (s, at most 30 days); a dead or hung rank fails the others after this long"
    )


@dataclass
class CheckpointConfig:
    every_steps: Union[int, None] = _f(500, "write a checkpoint every K steps (null: only at the end)")
    keep_last: int = _f(3, "keep the newest K checkpoints (older ones are deleted after a new one is complete)")
    keep_every: Union[int, None] = _f(None, "also keep every checkpoint whose step is a multiple of M")
    resume: str = _f("auto", "`auto` (newest valid checkpoint, else fresh), `never`, or a checkpoint/run path")
    at_end: bool = _f(True, "write a checkpoint after the last step")
    save_timeout_s: float = _f(
        1800.0, "how long ranks wait for a checkpoint save to complete before failing (s, at most 30 days)"
    )


@dataclass
class LogConfig:
    every_steps: int = _f(
        10, "write a metrics row (and a console line) every K steps and at the last step (early stopping included)"
    )
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
