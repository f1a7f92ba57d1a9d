"""DeepSpeed ZeRO 0-3 behind the strategy interface.

We derive DeepSpeed's JSON from our own config (micro-batch, accumulation, clipping, precision,
ZeRO stage, offload) and pass `strategy.deepspeed_config` through for everything else; a passed
value that contradicts ours is an error, never a silent pick. The optimizer is ours (the same
`build_optimizer` as DDP, handed to `deepspeed.initialize`) and so is the LR (set on its param
groups every step), so a DeepSpeed run follows the DDP path step for step.

Accumulation: the loop already scales each micro-batch's loss, so backward runs with
`scale_wrt_gas=False`, and the loop's `no_sync()` marks the accumulation boundary explicitly
(`set_gradient_accumulation_boundary`): ZeRO-0/1 reduce gradients on the last micro-step only.
ZeRO-2/3 keep only their partition of the gradients, so DeepSpeed reduces every micro-step's
gradients as backward makes them (ZeRO-2 all-reduces its buckets, ZeRO-3 reduce-scatters), at
the boundary or not: by design, no setting defers it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import warnings
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..errors import UserError, on_every_rank
from ..imports import require
from ..optim import build_optimizer
from .base import Strategy, ensure_process_group, param_dtypes, refuse_scalar_parameters, require_one_param_dtype
from .ddp import fp32

OWNED = {  # DeepSpeed keys derived from our config: a passthrough may repeat them only with the same value
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x world size",
    "gradient_clipping": "train.grad_clip_norm",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "schedule.*",
}
CHECKPOINT_TAG = "deepspeed"
SCALAR_PARAMETERS = (
    "DeepSpeed's engine views every parameter as bytes to broadcast it"  # why a 0-d parameter is refused
)


def _passthrough(cfg: Config) -> dict:
    extra = cfg.strategy.deepspeed_config
    if extra is None:
        return {}
    if isinstance(extra, str):
        path = extra
        try:
            extra = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"strategy.deepspeed_config: file {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"strategy.deepspeed_config: {path} is not valid JSON ({err})") from None
        except OSError as err:  # a folder, say
            raise UserError(f"strategy.deepspeed_config: cannot read {path} ({err.strerror})") from None
        if not isinstance(extra, dict):
            raise UserError(
                f"strategy.deepspeed_config: {path} must hold a JSON object of DeepSpeed settings, "
                f"got a {type(extra).__name__}"
            )
    return dict(extra)


def _merge(ours: dict, theirs: dict, path: str = "") -> dict:
    """Deep-merge `theirs` into `ours`; a leaf both define must agree."""
    out = dict(ours)
    for key, value in theirs.items():
        where = f"{path}{key}"
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, where + ".")
        elif key in out and out[key] != value:
            owner = OWNED.get(path.split(".")[0] or key, "strategy.*")
            raise UserError(
                f"strategy.deepspeed_config sets {where}={value!r} but our config gives {out[key]!r} (from {owner}); "
                "set it through our config key instead, or drop it from deepspeed_config"
            )
        else:
            out[key] = value
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON a run passes to `deepspeed.initialize` (also shown by `dist-train check`)."""
    t, s = cfg.train, cfg.strategy
    zero: dict = {"stage": s.zero_stage}
    if t.precision == "fp16" and s.zero_stage == 0:
        # DeepSpeed's engine scales the loss for its ZeRO optimizers only, while its stage-0 fp16
        # optimizer divides the gradients by the loss scale: 2^16 times too small, and never clipped
        raise UserError(
            "train.precision=fp16 with strategy.zero_stage=0: DeepSpeed's stage-0 fp16 optimizer divides the "
            "gradients by its loss scale, which its engine never applied to the loss; use strategy.zero_stage "
            "1-3, or strategy.name=ddp (torch's GradScaler)"
        )
    if s.offload_optimizer:
        if s.zero_stage == 0:  # DeepSpeed would step our optimizer where it is, silently
            raise UserError(
                "strategy.offload_optimizer needs strategy.zero_stage >= 1 (stage 0 has no ZeRO optimizer to offload)"
            )
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload_params:
        if s.zero_stage != 3:
            raise UserError(
                "strategy.offload_params needs strategy.zero_stage=3 (parameters are only partitioned there)"
            )
        zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch optimizer, not DeepSpeed's
        "zero_force_ds_cpu_optimizer": False,  # ours under offload too (DeepSpeed would demand its CPU Adam)
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    # every precision section says whether it is on: a passthrough switching one on contradicts
    # train.precision (one line), where it would otherwise train in bf16/fp16 behind an fp32 config
    ours.update(bf16={"enabled": False}, fp16={"enabled": False}, torch_autocast={"enabled": False})
    if t.precision == "bf16":  # autocast like the DDP path; parameters and master weights stay fp32
        # and so do the gradients the ranks reduce: DeepSpeed would otherwise mark every Linear/Conv
        # parameter to be communicated in bf16 (DDP and FSDP reduce in fp32)
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif t.precision == "fp16":  # DeepSpeed's own fp16 with dynamic loss scaling (CUDA)
        # auto_cast: the engine casts floating inputs to its fp16 weights (an image or vector batch met
        # them as fp32: "mat1 and mat2 must have the same dtype" at the first step)
        # hysteresis 1: each skipped step halves the scale, as torch's GradScaler does (DeepSpeed's
        # default 2 keeps it on the first skip of a streak)
        ours["fp16"] = {"enabled": True, "initial_scale_power": 16, "auto_cast": True, "hysteresis": 1}
    extra = _passthrough(cfg)
    for key in ("optimizer", "scheduler"):
        if key in extra:
            raise UserError(f"strategy.deepspeed_config must not set `{key}`: it comes from our {OWNED[key]} keys")
    passed = extra.get("zero_optimization")
    for key, works, needs in (  # as our offload keys: DeepSpeed would ignore it at the other stages, silently
        ("offload_optimizer", s.zero_stage >= 1, "strategy.zero_stage >= 1 (stage 0 has no ZeRO optimizer to offload)"),
        ("offload_param", s.zero_stage == 3, "strategy.zero_stage=3 (parameters are only partitioned there)"),
    ):
        offload = passed.get(key) if isinstance(passed, dict) else None
        if not works and isinstance(offload, dict) and offload.get("device", "none") not in ("none", None):
            raise UserError(
                f"strategy.deepspeed_config sets zero_optimization.{key}, which needs {needs}; "
                f"strategy.zero_stage is {s.zero_stage}"
            )
    return _merge(ours, extra)


def schema_error(err) -> UserError:
    """The one-line error for a pydantic ValidationError of DeepSpeed's config schema (run and check)."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())
    return UserError(f"strategy.deepspeed_config: DeepSpeed's {err.title} refuses it: {problems}")


def check_torch_autocast(config: dict) -> None:
    """Our bf16 is DeepSpeed's `torch_autocast` section, right from DeepSpeed 0.17.6 on: 0.17.1 and
    older ignore the section without a word (the run trained in fp32, weights bit-identical to an fp32
    run), and 0.17.2-0.17.5 keep a loss scaler under it that bf16 does not need, whose scaled gradients
    they clip and report (grad_norm 65536 times too large, every step clipped at train.grad_clip_norm)."""
    if not config.get("torch_autocast", {}).get("enabled"):
        return
    import deepspeed

    if tuple(int(part) for part in re.findall(r"\d+", deepspeed.__version__)[:3]) < (0, 17, 6):
        raise on_every_rank(  # the same installation on every rank of a node: one line says it
            UserError(
                f"train.precision=bf16 with strategy.name=deepspeed needs DeepSpeed >= 0.17.6 (its torch_autocast); "
                f"DeepSpeed {deepspeed.__version__} would train wrongly: pip install -U 'dist-train[deepspeed]'"
            )
        )


def skip_shared_memory_allreduce_build() -> None:
    """On a CPU, DeepSpeed's comm layer builds its shared-memory all-reduce (`deepspeed_shm_comm`: g++,
    about a minute on 2 cores, once per environment) as it starts, for `inference_all_reduce`, which
    ZeRO training never calls: marked unavailable, it is neither built nor loaded, and no rank maps
    its shared-memory segments. Its collectives are torch.distributed's either way."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed once, then kept
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def check_schema(cfg: Config, config: dict) -> None:
    """DeepSpeed's own parse of `config`, as `deepspeed.initialize` runs it (`dist-train check`): a value
    it refuses is the run's UserError. Nothing when deepspeed is not installed; other errors are left
    to the run (this machine may not be the one that trains)."""
    if importlib.util.find_spec("deepspeed") is None:
        return
    quiet = io.StringIO()  # DeepSpeed's accelerator warnings: not check's report (stdout) nor its one error line
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            from deepspeed.runtime.config import DeepSpeedConfig  # noqa: F401 - imported quietly, once
    except Exception:  # noqa: BLE001 - a deepspeed that does not import here: the run says why where it trains
        return
    check_torch_autocast(config)
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        refuse_unparsable(cfg, config, 1, one_process=True)


def refuse_unparsable(cfg: Config, config: dict, world_size: int, one_process: bool = False) -> None:
    """A `strategy.deepspeed_config` DeepSpeed's config parser refuses is a UserError in one line: its
    schema's ValidationError, or an error of its own parser (`communication_data_type: int3`, a
    ValueError at deepspeed.initialize) where our config without the passthrough parses. Any other
    failure to parse is left alone (the environment's: the run meets it where it trains).
    `one_process`: parsed as world size 1 (`dist-train check`), without train_batch_size."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    def parse(settings: dict) -> None:
        DeepSpeedConfig(
            {k: copy.deepcopy(v) for k, v in settings.items() if not (one_process and k == "train_batch_size")}
        )

    try:
        parse(config)
    except ValidationError as err:
        raise schema_error(err) from None
    except Exception as err:  # noqa: BLE001 - DeepSpeed's parser raises ValueError, TypeError, its own errors
        if not _passthrough(cfg):
            return
        ours = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, deepspeed_config=None))
        try:
            parse(deepspeed_config(ours, world_size))
        except Exception:  # noqa: BLE001 - ours alone fails too: not the passthrough's doing
            return
        message = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"strategy.deepspeed_config: DeepSpeed refuses it ({type(err).__name__}: {message}); fix or drop the value"
        ) from None


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    reshards = False  # ZeRO partitions are tied to the world size they were written at

    def check_model(self, model: nn.Module) -> None:
        refuse_scalar_parameters(model, "deepspeed", SCALAR_PARAMETERS)
        require_one_param_dtype(model, "deepspeed")
        if self.cfg.strategy.zero_stage == 0 and torch.float64 in param_dtypes(model):
            raise on_every_rank(  # DeepSpeed's stage-0 all-reduce: "attempting to reduce an unsupported grad type"
                UserError(
                    "strategy.zero_stage=0 reduces fp32, bf16 and fp16 gradients only, the model's parameters are "
                    f"float64 ({param_dtypes(model)[torch.float64]}, ...): cast them in the factory (e.g. "
                    "`model.float()`), or use strategy.zero_stage 1-3, strategy.name=fsdp or ddp"
                )
            )

    def setup(self, model: nn.Module) -> None:
        self.check_model(model)
        if self.ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
        self._own_group = ensure_process_group(self.ctx.device)
        for key, value in (
            ("LOCAL_RANK", self.ctx.local_rank),
            ("RANK", self.ctx.rank),
            ("WORLD_SIZE", self.ctx.world_size),
        ):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads them even for one process
        deepspeed = require("deepspeed", "deepspeed", "strategy.name=deepspeed")
        # DeepSpeed's own calls of torch's deprecated collectives: a FutureWarning the user cannot act on,
        # printed by every rank, and at ZeRO-3 on CPU again on every step (its accelerator runs `numactl`
        # per step, and the subprocess call resets the registry that shows a warning once)
        warnings.filterwarnings(
            "ignore",
            r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            FutureWarning,
        )
        if self.cfg.train.precision == "fp16":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():  # DeepSpeed's own check raises a ValueError
                raise on_every_rank(
                    UserError(
                        f"train.precision=fp16 with strategy.name=deepspeed needs a device with DeepSpeed fp16 "
                        f"support (CUDA); {get_accelerator().device_name()} has none: use train.precision=bf16, "
                        "or strategy.name=ddp/fsdp (torch's GradScaler)"
                    )
                )
        if self.ctx.device.type == "cpu":
            skip_shared_memory_allreduce_build()
        config = deepspeed_config(self.cfg, self.ctx.world_size)
        check_torch_autocast(config)
        optimizer = build_optimizer(self.cfg, model, fused=False)  # ZeRO steps it on flat partitions
        from pydantic import ValidationError  # DeepSpeed's config schema

        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False
            )
        except ValidationError as err:  # a strategy.deepspeed_config value its schema refuses: ours are valid
            raise on_every_rank(schema_error(err)) from None
        except Exception:  # one its parser refuses (a ValueError, say): that one line; anything else as it is
            try:
                refuse_unparsable(self.cfg, config, self.ctx.world_size)
            except UserError as err:
                raise on_every_rank(err) from None
            raise
        self.model = self.engine
        self._skipped = 0
        self._scaler_at_min_skips()

    def _scaler_at_min_skips(self) -> None:
        """fp16: DeepSpeed's loss scaler raised ("Current loss scale already at minimum") at a skipped
        step that met its minimum scale, 1: the 17th in a row. It skips that step too, and the loop's
        train.max_nonfinite_steps (+16 under fp16) stops the run, with its own message, as under DDP."""
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if hasattr(scaler, "raise_error_at_min_scale"):
            scaler.raise_error_at_min_scale = False

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # the engine's forward applies `torch_autocast` itself

    @contextlib.contextmanager
    def no_sync(self):
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop normalised the loss already

    def clip_and_step(self, max_norm: float | None, clip_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        # DeepSpeed clips (config `gradient_clipping`), steps and zeroes in one call; ZeRO-1/2/3 skip a
        # step whose gradient norm is not finite (checked by tests/test_strategies.py), counted in skipped_steps.
        own_skip, stage_0 = False, self.cfg.strategy.zero_stage == 0 and self.cfg.train.precision != "fp16"
        if stage_0:
            # Stage 0 steps our torch optimizer as it is: DeepSpeed records no gradient norm and skips
            # nothing. The gradients are all-reduced by now (replicated): their norm is the global one.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads, foreach=True))
            own_skip = not math.isfinite(norm)
        if own_skip:  # the engine's step without the optimizer's (counters advance, gradients zeroed)
            self.engine.optimizer.step = lambda *args, **kwargs: None
            try:
                self.engine.step()
            finally:
                del self.engine.optimizer.step
        else:
            self.engine.step()
        if not stage_0:
            norm = self.engine.get_global_grad_norm()
            norm = float("nan") if norm is None else float(norm)  # a host float already (ZeRO reduces it on the host)
        skipped = self.engine.skipped_steps - self._skipped
        self._skipped = self.engine.skipped_steps
        values = torch.tensor([norm, float(own_skip or skipped > 0 or not math.isfinite(norm))], device=self.ctx.device)
        return values[0], values[1]

    def save(self, folder: Path) -> list[str]:
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)
        dist.barrier()  # every rank's shard is on disk before rank 0 lists them
        if not self.ctx.is_rank_zero:
            return []
        return sorted(str(p.relative_to(folder)) for p in (folder / CHECKPOINT_TAG).rglob("*") if p.is_file())

    def load(self, folder: Path) -> None:
        # DeepSpeed reads its files with pickle: the manifest's checksums were verified before this.
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise UserError(f"checkpoint {folder}: DeepSpeed could not load its state")
        self._skipped = self.engine.skipped_steps
        self._scaler_at_min_skips()  # ZeRO restores its loss scaler object from the checkpoint
        # ZeRO-1/2 (and fp16 at stage 0) restore the checkpoint's `gradient_clipping` too: a resume with
        # another train.grad_clip_norm (or null) clipped at the old one. The config's value holds, as for DDP.
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = self.engine.gradient_clipping()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master weights (gathered across ZeRO partitions) with the bare model's names."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # collective under ZeRO-3
            out[name] = (full if full is not None else param).detach().float().cpu().clone()
        for name, buffer in self.module.named_buffers():
            out[name] = fp32(buffer).cpu().clone()
        state_keys = self.module.state_dict().keys()  # tied weights appear under every name they have
        for key in state_keys:
            if key not in out:
                alias = _tied_source(self.module, key)
                out[key] = out[alias]
        return {k: out[k] for k in state_keys} if self.ctx.is_rank_zero else None

    def teardown(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        if self._own_group:
            dist.destroy_process_group()


def _tied_source(module: nn.Module, key: str) -> str:
    """The named_parameters() name of a state_dict key that is a tied alias (e.g. lm_head.weight)."""
    target = module.state_dict(keep_vars=True)[key]
    for name, param in module.named_parameters():  # the first (deduplicated) name of that tensor
        if param is target:
            return name
    raise KeyError(key)
