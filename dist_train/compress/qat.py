"""Quantization-aware training and int8 export, in torch.ao.quantization's eager mode (CPU kernels).

QAT (`compress.qat`), applied at build time before any wrapping:
1. fuse the groups the model declares in `qat_fusion()` (conv+bn+relu, linear+relu, ...); a model
   opts in by defining that method (the zoo `mlp` and `cnn` do) and by using only ops that have
   quantized kernels between its input and output;
2. quantize the input and dequantize the output (a QuantStub/DeQuantStub pair attached to the model
   as `qat_quant`/`qat_dequant`, called from forward hooks: parameter names stay the model's own);
3. insert fake-quant modules with observers (`get_default_qat_qconfig(backend)`), switched off
   until `compress.qat_start_step` (their enable flags are buffers: a resumed run keeps them).

Export. `model.safetensors` keeps the float weights under the bare model's names (observer buffers
dropped, a fused BatchNorm's `<conv>.bn.*` back under its own name), loadable into the unfused
model. `model_int8.pt` (QAT) and `model_dynamic_int8.pt` (`compress.dynamic_quant_export`: int8
Linear weights, activations quantized on the fly) are `torch.save` dicts:
    {"format": "dist_train.int8/1", "kind": "qat" | "dynamic", "backend": "x86",
     "model": {"name": ..., "kwargs": {...}}, "state_dict": <the quantized model's state_dict>}
readable with `torch.load(..., weights_only=True)`; `load_quantized(path)` rebuilds the model from
its factory, quantizes the skeleton the same way and loads the state_dict: a CPU module, eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import atomic_file
from ..config import Config
from ..errors import UserError
from ..fused_loss import LMHead
from ..patterns import FUSED_NAMES

log = logging.getLogger("dist_train")

FORMAT = "dist_train.int8/1"
FILES = {"qat": "model_int8.pt", "dynamic": "model_dynamic_int8.pt"}
SUFFIX = {"qat": "int8", "dynamic": "dynamic_int8"}
# Linear only: dynamic LSTM/GRU keep their packed weights in TorchScript objects, which
# torch.load(weights_only=True) refuses; their float weights stay as they are.
DYNAMIC_TYPES = {nn.Linear}
QUANT, DEQUANT = "qat_quant", "qat_dequant"
OBSERVER_SEGMENTS = {"weight_fake_quant", "activation_post_process"}


@contextlib.contextmanager
def quiet():
    """torch.ao.quantization warns on every call (deprecated upstream in favour of torchao, still
    shipped in torch 2.13) and about observers that have not run yet in a skeleton: keep logs readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _ao():
    try:
        with quiet():
            import torch.ao.quantization as tq
    except ImportError as err:  # pragma: no cover - depends on the torch build
        raise UserError(f"compress: this torch build has no torch.ao.quantization ({err})") from None
    return tq


def use_backend(backend: str) -> None:
    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise UserError(f"compress.qat_backend={backend!r} is not supported by this torch build (supported: {engines})")
    torch.backends.quantized.engine = backend


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, QUANT)(args[0]), *args[1:])


def _dequantize_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, DEQUANT)(output)


def prepare_qat_model(model: nn.Module, backend: str) -> dict[str, str]:
    """Fuse, attach the stubs and insert fake quantization, in place (train mode).

    Returns the export renames: a fused BatchNorm's `<first>.bn.` prefix -> its own name's prefix.
    """
    tq = _ao()
    use_backend(backend)
    fuse = getattr(model, "qat_fusion", None)
    if not callable(fuse):
        raise UserError(
            f"compress.qat: model {type(model).__name__} does not declare qat_fusion(); QAT needs a model written "
            "for eager-mode quantization (zoo: mlp with relu, cnn) that lists its fusable modules (or [])"
        )
    groups = [list(group) for group in fuse()]
    renames = {}
    for group in groups:
        for member in group:
            try:
                module = model.get_submodule(member)
            except AttributeError:
                raise UserError(f"compress.qat: qat_fusion() names {member!r}, which the model does not have") from None
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and member != group[0]:
                renames[f"{group[0]}.bn."] = f"{member}."
    model.train()
    with quiet():
        for group in groups:
            kinds = ", ".join(type(model.get_submodule(member)).__name__ for member in group)
            try:
                tq.fuse_modules_qat(model, group, inplace=True)
            except (AssertionError, NotImplementedError):  # torch has no fused module for these types
                raise UserError(
                    f"compress.qat: qat_fusion() group {group} ({kinds}) cannot be fused: torch fuses a Conv or "
                    "Linear with the BatchNorm and/or ReLU that follows it; leave other modules out of the groups"
                ) from None
        setattr(model, QUANT, tq.QuantStub())
        setattr(model, DEQUANT, tq.DeQuantStub())
        model.register_forward_pre_hook(_quantize_input)
        model.register_forward_hook(_dequantize_output)
        model.qconfig = tq.get_default_qat_qconfig(backend)
        tq.prepare_qat(model, inplace=True)
    setattr(model, FUSED_NAMES, renames)  # optim.param_groups rules match the fused BatchNorm by its own name
    return renames


def float_export(tensors: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """The QAT model's float weights under the unfused model's names, without observer state."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] in (QUANT, DEQUANT) or OBSERVER_SEGMENTS.intersection(parts):
            continue
        for fused, original in renames.items():
            if key.startswith(fused):
                key = original + key[len(fused) :]
                break
        out[key] = value
    return out


class QAT:
    """Prepares `model` for QAT at build time and turns fake quantization on at `qat_start_step`."""

    def __init__(self, cfg: Config, model: nn.Module):
        self.model, self.backend, self.start = model, cfg.compress.qat_backend, cfg.compress.qat_start_step
        self.renames = prepare_qat_model(model, self.backend)
        if self.start > 0:
            self._switch(False)
        log.info("compress.qat: fake int8 quantization (%s) from step %d", self.backend, self.start)

    def _switch(self, on: bool) -> None:
        tq = _ao()
        self.model.apply(tq.enable_fake_quant if on else tq.disable_fake_quant)
        self.model.apply(tq.enable_observer if on else tq.disable_observer)

    def on_step(self, step: int) -> None:
        if self.start > 0 and step == self.start:
            self._switch(True)
            log.info("step %d: fake quantization and observers on", step)


def observed(model: nn.Module) -> bool:
    """Whether the fake-quant observers were switched on (the run reached compress.qat_start_step)."""
    return any(bool(m.observer_enabled.any()) for m in model.modules() if isinstance(m, _ao().FakeQuantizeBase))


def build_skeleton(name: str, kwargs: dict, kind: str, backend: str) -> nn.Module:
    """A float model in the structure a quantized state_dict comes from (eval mode; weights to be loaded)."""
    from ..models import build_model

    with torch.random.fork_rng():  # the factory's random init is overwritten: leave the caller's RNG alone
        model = build_model(name, kwargs)
    if kind == "qat":
        prepare_qat_model(model, backend)
    else:
        use_backend(backend)
    return model.eval()


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """The int8 model of a float one (a new module; CPU)."""
    tq = _ao()
    model = model.cpu().eval()
    with quiet():
        if kind == "qat":
            return tq.convert(model, inplace=False)
        model = copy.deepcopy(model)
        for module in model.modules():  # torch maps exact types: a language model's head is a Linear too
            if isinstance(module, LMHead):  # (the int8 model computes logits; the fused loss is for training)
                module.__class__ = nn.Linear
        return tq.quantize_dynamic(model, DYNAMIC_TYPES, dtype=torch.qint8, inplace=True)


def save_quantized(model: nn.Module, path: Path, kind: str, cfg: Config) -> None:
    payload = {
        "format": FORMAT,
        "kind": kind,
        "backend": cfg.compress.qat_backend,
        "model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)},
        "state_dict": model.state_dict(),
    }
    with atomic_file(path) as f:
        torch.save(payload, f)


def load_quantized(path: str | Path) -> nn.Module:
    """Load `model_int8.pt` / `model_dynamic_int8.pt`: the int8 model, on the CPU, in eval mode."""
    with quiet():
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a dist_train int8 export ({FORMAT})")
    spec = payload["model"]
    model = quantize(build_skeleton(spec["name"], spec["kwargs"], payload["kind"], payload["backend"]), payload["kind"])
    with quiet():
        model.load_state_dict(payload["state_dict"])
    return model.eval()


class _OnCPU(nn.Module):
    """Runs the int8 model on the CPU for callers whose batches live on another device."""

    def __init__(self, inner: nn.Module, device: torch.device):
        super().__init__()
        self.inner, self.device = inner, device

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs.cpu()).to(self.device)


class _Runner:
    """What evaluation.evaluate needs from a strategy: `model` and `autocast()`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def autocast(self):
        return contextlib.nullcontext()


def evaluate_quantized(model: nn.Module, loss_fn, eval_data, ctx) -> dict[str, float]:
    """The eval split's metrics for the int8 model: sharded over the ranks and reduced, like evaluate()."""
    from ..evaluation import evaluate

    with quiet():
        return evaluate(_Runner(_OnCPU(model, ctx.device)), loss_fn, eval_data, ctx)
