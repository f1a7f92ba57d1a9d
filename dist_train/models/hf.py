"""Hugging Face `transformers` models behind the zoo interface: forward(input_ids) -> logits.

Built from a config dict (`model.config: {model_type: gpt2, n_layer: 2, ...}`, random init) or a
local folder (`model.path`, with config.json; its weights are loaded when the folder has them).
Nothing is ever downloaded: the hub is switched off and every load is `local_files_only`.

The wrapper keeps the Hugging Face model as its attribute `hf`, so `state_dict` keys (and those of
`model.safetensors`) are the Hugging Face names prefixed with `hf.`; strip the prefix to load them
into the bare model (`AutoModel...from_config(cfg).load_state_dict(...)`).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from ..fused_loss import LMHead

log = logging.getLogger("dist_train")

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Config attributes that hold a dropout probability, by suffix (gpt2 `resid_pdrop`, bert
# `hidden_dropout_prob`, t5 `dropout_rate`, llama `attention_dropout`, ...).
DROPOUT_SUFFIXES = ("pdrop", "dropout", "dropout_prob", "dropout_rate", "dropout_ratio")
# train.fused_loss: the causal LMs (config.model_type) whose forward is their base model, then their
# output projection, and nothing more, so that the loss fused into the projection is theirs: read in
# transformers 5.24 and checked by tests/test_hf.py (a tiny model of each, fused against unfused).
FUSED_LOSS_MODEL_TYPES = frozenset(
    "biogpt bloom deepseek_v3 falcon gemma gemma2 gemma3_text gpt2 gpt_bigcode gpt_neox granite llama mamba "
    "mistral mixtral mpt olmo olmo2 openai-gpt opt phi3 qwen2 qwen2_moe qwen3 stablelm starcoder2 xglm".split()
)
# Config attributes by which a causal LM's forward changes its head's logits, with the values that
# leave them alone: Gemma 2's soft-capping, Cohere's scale, Granite's divisor and the like. A loss
# fused into the head would skip them.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logits_soft_cap": (None,),  # recurrent_gemma
    "output_logit_soft_cap": (None,),  # xlstm
    "logit_scale": (None, 1),  # cohere
    "logits_scaling": (None, 1),  # granite
    "lm_head_multiplier": (None, 1),  # falcon_h1
    "logits_mup_width_multiplier": (None, 1),
}


def _no_cache(module: nn.Module) -> dict:
    """No key/value cache while training: for a forward that takes `use_cache` (decoders; transformers
    5's **kwargs), not transformers 4's encoders (BertForSequenceClassification refuses the argument)."""
    params = inspect.signature(module.forward).parameters.values()
    takes = any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params)
    return {"use_cache": False} if takes else {}


class HFModel(nn.Module):
    """Returns `.logits` of the wrapped model; exposes what the framework's transforms look for.

    A causal LM can compute train.fused_loss: once `enable_fused_loss()` has made its output
    projection an LMHead, forward(input_ids, targets) runs the wrapped model's base model and returns
    the loss its head computes a chunk at a time: the (tokens, vocabulary) logits never exist whole."""

    def __init__(self, hf_model: nn.Module, pad_token_id: int | None, causal: bool = False):
        super().__init__()
        self.hf = hf_model
        self.pad_token_id = pad_token_id
        self.causal = causal
        self.no_cache = _no_cache(hf_model)
        self.base_no_cache: dict = {}  # the base model's, for the fused loss (enable_fused_loss)

    @property
    def supports_fused_loss(self) -> bool:
        """Whether forward(input_ids, targets) returns the fused loss (after enable_fused_loss)."""
        return type(self.hf.get_output_embeddings()) is LMHead

    def enable_fused_loss(self) -> str | None:
        """train.fused_loss, called once the factory has returned (a factory of yours may have resized
        the vocabulary meanwhile): the causal LM's output projection becomes an LMHead. None when it
        did, else why it cannot (build.require_fused_loss_support says it)."""
        if not self.causal:
            return (
                f"{type(self.hf).__name__} classifies whole sequences: it has no per-token head to fuse the loss into"
            )
        if refusal := _fused_head(self.hf):
            return refusal
        self.base_no_cache = _no_cache(self.hf.base_model)
        return None

    @property
    def config(self) -> Any:
        """The Hugging Face config (transforms.enable_grad_checkpointing looks for it)."""
        return self.hf.config

    @property
    def blocks(self) -> nn.ModuleList | None:
        """The decoder/encoder layers (for per-block FSDP sharding): the ModuleList holding most parameters."""
        lists = [m for m in self.hf.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Per-layer activation checkpointing of the wrapped model (kwargs go to torch's checkpoint)."""
        if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            self.hf.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
            )
        else:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        mask = None if self.pad_token_id is None else (input_ids != self.pad_token_id).long()
        if targets is None:
            return self.hf(input_ids=input_ids, attention_mask=mask, **self.no_cache).logits
        base = self.hf.base_model  # the causal LM's forward is its base model, then its head (_fused_head)
        hidden = base(input_ids=input_ids, attention_mask=mask, **self.base_no_cache)[0]
        # the head's own forward: FSDP2 and ZeRO-3 gather its (tied) weight around it
        return self.hf.get_output_embeddings()(hidden, targets, label_smoothing)


def _transformers():
    # Hub access off before transformers/huggingface_hub read their settings at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from ..imports import require

    return require("transformers", "hf", "model.name=hf_causal_lm / hf_seq_cls")


def _build(
    auto_class: str,
    config: dict | None,
    path: str | None,
    dropout: float | None,
    overrides: dict,
    attn_implementation: str | None,
) -> nn.Module:
    transformers = _transformers()
    overrides = {**(config or {}), **overrides}
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if path:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path {path!r} has no config.json: give a local Hugging Face model folder")
        overrides.pop("model_type", None)
        hf_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **overrides)
    else:
        overrides = dict(overrides)
        model_type = overrides.pop("model_type", None)
        if not model_type:
            raise UserError("hf models need `model.path` (a local folder) or `model.config` with a `model_type`")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **overrides)
        except ValueError as err:
            raise UserError(f"model.config: {err}") from None
    _warn_unknown_fields(hf_config, overrides)
    if dropout is not None:
        for key, value in list(hf_config.to_dict().items()):
            # a probability written as an integer (`attn_pdrop: 0` in YAML or config.json) is one too
            if key.endswith(DROPOUT_SUFFIXES) and (
                value is None or isinstance(value, float) or (type(value) is int and value in (0, 1))
            ):
                setattr(hf_config, key, float(dropout))
    auto = getattr(transformers, auto_class)
    # fp32 master weights whatever the checkpoint's or the config's dtype (`torch_dtype: bfloat16` in
    # most config.json files); train.precision handles autocast.
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    extra[dtype_key] = torch.float32
    # on the meta device (dist-train check: shapes only, a 70B folder costs no memory) the architecture
    # alone: from_pretrained refuses the meta device
    weights = path and any((Path(path) / name).is_file() for name in WEIGHT_FILES)
    if weights and torch.get_default_device().type != "meta":
        return _from_pretrained(transformers, auto, path, hf_config, extra)
    return auto.from_config(hf_config, **extra)


def _warn_unknown_fields(hf_config, overrides: dict) -> None:
    """model.config keys its config class does not have (a typo: `n_layers` for gpt2's `n_layer`):
    transformers keeps them as attributes that nothing reads, so the model was built without them."""
    try:
        default = type(hf_config)()
    except Exception:  # noqa: BLE001 - a config class that needs arguments: nothing to compare with
        return
    for key in overrides:
        if key != "model_type" and not hasattr(default, key):
            close = difflib.get_close_matches(key, list(default.to_dict()), n=1)
            log.warning(
                "model.config.%s is not a field of %s%s: nothing reads it",
                key,
                type(hf_config).__name__,
                f" (did you mean {close[0]}?)" if close else "",
            )


def _from_pretrained(transformers, auto, path: str, hf_config, extra: dict) -> nn.Module:
    """The folder's weights loaded, with transformers' load report (a table on stderr, before its own
    error when shapes differ) said in one line: weights the folder lacks (initialised fresh, a new
    classifier head say) and weights it has that the model does not use."""
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" on stderr, a line of its own before an error
    try:
        model, info = auto.from_pretrained(
            path, config=hf_config, local_files_only=True, output_loading_info=True, **extra
        )
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise UserError(
            f"model.path {path}: its weights' shapes differ from those its config.json (with model.config's changes) "
            "gives the model: make the config's sizes the weights' own"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for key, what in (("missing_keys", "not in the folder, initialised fresh"), ("unexpected_keys", "unused")):
        if names := sorted(info.get(key) or []):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            log.warning("model.path %s: %d weights %s (%s)", path, len(names), what, shown)
    return model


def _folder_config(path: str) -> dict:
    """A model folder's config.json as written (empty when it has none: `_build` says so)."""
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _version(text: str) -> tuple[int, int]:
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
    return major, minor


def hf_causal_lm(
    config: dict | None = None,
    path: str | None = None,
    dropout: float | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> HFModel:
    """AutoModelForCausalLM; logits (B, T, vocab). `pad_token_id` set: those tokens are masked out."""
    model = _build("AutoModelForCausalLM", config, path, dropout, {}, attn_implementation)
    return HFModel(model, pad_token_id, causal=True)


def _fused_head(model: nn.Module) -> str | None:
    """Makes the causal LM's output projection an LMHead, which given targets returns the fused loss
    (train.fused_loss); None when it did (or had), else why it cannot: the logits must be the head's
    product of the base model's hidden states and nothing more."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, LMHead) or head.bias is not None:
        return f"{name}'s output projection is not a linear layer without bias"
    if model.base_model is model:
        return f"{name} has no base model to give the hidden states its head projects"
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key, leaves_alone in LOGIT_TRANSFORMS.items():
        value = getattr(text_config, key, None)
        if value not in leaves_alone:
            return f"{name}'s forward transforms its head's logits ({key}={value})"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FUSED_LOSS_MODEL_TYPES:
        return (
            f"{name} (model_type {model_type!r}) is not among the causal LMs whose logits are known to be their "
            "head's product (dist_train.models.hf.FUSED_LOSS_MODEL_TYPES)"
        )
    head.__class__ = LMHead  # the same module, parameters (tied ones too) and hooks: a subclass's forward
    return None


def hf_seq_cls(
    config: dict | None = None,
    path: str | None = None,
    num_labels: int = 2,
    dropout: float | None = None,
    pad_token_id: int | None = 0,
    attn_implementation: str | None = None,
) -> HFModel:
    """AutoModelForSequenceClassification; logits (B, num_labels).

    `pad_token_id` (default 0, the byte tokenizer's) is masked out of attention and tells
    decoder models (gpt2, llama, ...) where each right-padded sequence ends.
    """
    if type(num_labels) is not int or num_labels < 1:  # 0 (or less: 0 outputs) failed the first step with a traceback
        raise UserError(f"hf_seq_cls: model.num_labels must be a whole number >= 1 (the classes), got {num_labels!r}")
    overrides: dict[str, Any] = {"num_labels": num_labels}
    if pad_token_id is not None:
        overrides["pad_token_id"] = pad_token_id
    for key, value in overrides.items():  # model.config's own would be overridden without a word
        if key in (config or {}) and config[key] != value:
            raise UserError(
                f"hf_seq_cls: model.config.{key}={config[key]!r} disagrees with model.{key}={value!r} (its "
                f"default: {'0' if key == 'pad_token_id' else '2'}), which sets the model's {key}: give "
                f"model.{key} the value and drop it from model.config"
            )
    if path and pad_token_id is not None and "pad_token_id" not in (config or {}):
        # a folder's pad id is its embeddings' padding row and (roberta) where its positions start:
        # replaced by the default 0, RoBERTa masked out its <s> and shifted every position
        saved = _folder_config(path).get("pad_token_id")
        if saved is not None and saved != pad_token_id:
            raise UserError(
                f"hf_seq_cls: model.path {path!r} has pad_token_id {saved} and model.pad_token_id is "
                f"{pad_token_id} (default 0): set model.pad_token_id={saved} (or null) to keep the folder's, "
                f"or model.config.pad_token_id={pad_token_id} as well to replace it"
            )
    model = _build("AutoModelForSequenceClassification", config, path, dropout, overrides, attn_implementation)
    if model.config.pad_token_id is None:  # transformers would refuse every batch of more than one sequence
        raise UserError(
            "hf_seq_cls: model.pad_token_id is null and the model's config has no pad_token_id: decoder "
            "classifiers (gpt2, llama, ...) need it to find each right-padded sequence's last token; set "
            "model.pad_token_id to the data's pad id (0 for the bytes tokenizer)"
        )
    return HFModel(model, model.config.pad_token_id)  # null: the config's own, masked out of attention too
