"""Hugging Face models (`hf_causal_lm`, `hf_seq_cls`) and datasets (`data.name: hf`): built offline
from configs and local folders, tokenised once on rank 0, trained on 2 ranks."""

import importlib.util
import json
import os
import random
import sys

import pytest
import torch
from helpers import read_rows, run_ranks

from dist_train.data import build_dataset
from dist_train.errors import UserError
from dist_train.models import build_model

HAVE_HF = all(importlib.util.find_spec(name) for name in ("transformers", "datasets"))
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs the hf extra (transformers, datasets)")
GPT2 = {"model_type": "gpt2", "vocab_size": 259, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
        "bos_token_id": 1, "eos_token_id": 1}  # fmt: skip


def test_missing_transformers_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'dist-train\[hf\]'"):
        build_model("hf_causal_lm", {"config": GPT2})


# ---------------------------------------------------------------- models


@needs_hf
def test_causal_lm_from_config_dict():
    torch.manual_seed(0)
    model = build_model("hf_causal_lm", {"config": GPT2, "dropout": 0.0})
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tokens = torch.randint(259, (2, 10))
    assert model(tokens).shape == (2, 10, 259)
    assert all(key.startswith("hf.") for key in model.state_dict())  # the documented prefix
    assert model.blocks is model.hf.transformer.h and len(model.blocks) == 2  # per-block FSDP finds the layers
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert build_model("hf_causal_lm", {"config": GPT2, "dropout": 0.3}).config.resid_pdrop == 0.3
    assert build_model("hf_causal_lm", {"config": GPT2}).config.resid_pdrop == 0.1  # the config's own default
    integers = build_model("hf_causal_lm", {"config": {**GPT2, "attn_pdrop": 0, "resid_pdrop": 1}, "dropout": 0.2})
    assert integers.config.attn_pdrop == integers.config.resid_pdrop == 0.2  # 0 and 1 written as integers
    assert integers.hf.transformer.h[0].attn.attn_dropout.p == 0.2
    from dist_train.transforms import enable_grad_checkpointing

    with pytest.raises(UserError, match="grad_checkpointing_every applies to the zoo's blocks"):
        enable_grad_checkpointing(model, every=2)  # was silently every layer
    assert enable_grad_checkpointing(model, every=1) == -1
    flag = (
        "is_activation_checkpointing"
        if hasattr(model.hf, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(model.hf, flag)  # transformers 5 renamed it (the old name warns)


@needs_hf
def test_model_from_local_folder_loads_its_weights(tmp_path):
    torch.manual_seed(0)
    saved = build_model("hf_causal_lm", {"config": GPT2})
    saved.hf.save_pretrained(tmp_path / "with_weights")
    loaded = build_model("hf_causal_lm", {"path": str(tmp_path / "with_weights")})
    for key, value in saved.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.config.n_layer == 2 and next(loaded.parameters()).dtype == torch.float32
    # config.json alone: the architecture, freshly initialised
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((tmp_path / "with_weights" / "config.json").read_text())
    fresh = build_model("hf_causal_lm", {"path": str(tmp_path / "config_only"), "config": {"n_layer": 1}})
    assert len(fresh.blocks) == 1  # model.config overrides the folder's config
    assert next(fresh.parameters()).dtype == torch.float32
    half = build_model("hf_causal_lm", {"path": str(tmp_path / "config_only"), "config": {"dtype": "bfloat16"}})
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # fp32 master weights, as from weights
    with pytest.raises(UserError, match="no config.json"):
        build_model("hf_causal_lm", {"path": str(tmp_path)})


@needs_hf
def test_a_model_config_key_its_config_class_lacks_is_warned_about(caplog):
    """`n_layers` for gpt2's `n_layer` built a 2-layer model without a word (transformers keeps any
    key as an attribute); its aliases (`hidden_size` for `n_embd`) and num_labels are fields."""
    config = {**GPT2, "n_layers": 6, "bogus_field": 1, "hidden_size": 32}
    with caplog.at_level("WARNING", logger="dist_train"):
        model = build_model("hf_causal_lm", {"config": config})
        build_model("hf_seq_cls", {"config": GPT2, "num_labels": 3})
    assert len(model.blocks) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "model.config.n_layers is not a field of GPT2Config (did you mean n_layer?): nothing reads it",
        "model.config.bogus_field is not a field of GPT2Config: nothing reads it",
    ]


@needs_hf
def test_weights_that_do_not_fit_the_folders_config_are_said_in_one_line(tmp_path, capfd, caplog):
    """transformers printed its load report, a table of every mismatched weight, before its own error
    (and a progress bar); weights the folder lacks were initialised fresh, said only in that table."""
    torch.manual_seed(0)
    build_model("hf_causal_lm", {"config": GPT2}).hf.save_pretrained(tmp_path / "gpt2")
    capfd.readouterr()
    with pytest.raises(UserError) as raised:
        build_model("hf_causal_lm", {"path": str(tmp_path / "gpt2"), "config": {"n_embd": 64}})
    assert str(raised.value) == (
        f"model.path {tmp_path / 'gpt2'}: its weights' shapes differ from those its config.json (with model.config's "
        "changes) gives the model: make the config's sizes the weights' own"
    )
    assert capfd.readouterr().err == ""
    with caplog.at_level("WARNING", logger="dist_train"):
        deeper = build_model("hf_causal_lm", {"path": str(tmp_path / "gpt2"), "config": {"n_layer": 3}})
    assert len(deeper.blocks) == 3 and capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records] == [
        f"model.path {tmp_path / 'gpt2'}: 12 weights not in the folder, initialised fresh (transformer.h.2.attn.c_attn"
        ".bias, transformer.h.2.attn.c_attn.weight, transformer.h.2.attn.c_proj.bias, ...)"
    ]
    with pytest.raises(UserError, match="model_type"):
        build_model("hf_causal_lm", {"config": {"n_layer": 2}})


LLAMA = {"model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip


@needs_hf
@pytest.mark.parametrize(
    "config, resized",
    [(GPT2, False), (LLAMA, False), (LLAMA, True)],
    ids=["gpt2-tied-head", "llama-own-head", "llama-resized-by-a-factory"],
)
def test_causal_lm_fused_loss_equals_the_loss_of_its_logits(config, resized, monkeypatch):
    """train.fused_loss on a Hugging Face causal LM: the base model's hidden states through the head's
    chunked loss (3 or 4 chunks here) give the loss and every gradient of cross_entropy on its logits,
    with right padding masked out, ignored targets and label smoothing. The head becomes an LMHead
    when the run enables the fused loss, after the factory: one that resized the vocabulary (a new
    head, untied) is served too; without the fused loss the model is left as transformers built it."""
    from dist_train import fused_loss

    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 4 * 259 * 12)  # 12 tokens a chunk: 3 chunks of 36 tokens
    torch.manual_seed(0)
    model = build_model("hf_causal_lm", {"config": config, "dropout": 0.0, "pad_token_id": 0})
    if resized:
        model.hf.resize_token_embeddings(300)
    assert type(model.hf.get_output_embeddings()) is torch.nn.Linear and not model.supports_fused_loss
    assert model.enable_fused_loss() is None and model.enable_fused_loss() is None  # twice: as check does
    assert model.supports_fused_loss and type(model.hf.get_output_embeddings()) is fused_loss.LMHead
    assert model.hf.get_output_embeddings().weight.shape[0] == (300 if resized else 259)
    assert (model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight) == (config is GPT2)
    tokens = torch.randint(3, 259, (3, 12))
    tokens[0, -3:] = 0  # right padding
    targets = torch.roll(tokens, -1, dims=1)
    targets[0, -4:] = -100
    results = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            loss = model(tokens, targets, 0.1)
        else:
            logits = model(tokens).flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(logits, targets.flatten(), reduction="sum", label_smoothing=0.1)
        loss.backward()
        results.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


# A tiny causal LM of any type: its sizes under every name the configs use, and what some types need besides.
TINY = {"vocab_size": 96, "hidden_size": 32, "n_embd": 32, "d_model": 32, "intermediate_size": 64, "ffn_dim": 64,
        "n_inner": 64, "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "num_attention_heads": 4,
        "n_head": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rotary_dim": 4,
        "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "word_embed_proj_dim": 32,
        "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip
TINY_EXTRA = {
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2, "head_dim": None},
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": None},
    "gemma3_text": {"sliding_window": 8},
    "mamba": {"state_size": 4, "expand": 2, "conv_kernel": 4, "time_step_rank": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "mpt": {"expansion_ratio": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "recurrent_gemma": {"lru_width": 32, "attention_window_size": 8, "block_types": ["recurrent", "attention"]},
}  # fmt: skip


def _tiny_causal_lm(model_type: str, **changes) -> dict:
    config = {"model_type": model_type, **TINY, **TINY_EXTRA.get(model_type, {}), **changes}
    return {key: value for key, value in config.items() if value is not None or key == "final_logit_softcapping"}


@needs_hf
def test_every_causal_lm_type_allowed_the_fused_loss_gets_the_loss_of_its_logits():
    """FUSED_LOSS_MODEL_TYPES is a list of architectures read to be 'base model, then head': a tiny
    model of each, tied and untied, with its head's weight scaled so that the logits are as large
    as a trained model's (a soft-cap or scale the fused loss skipped would show), gives the loss
    of its own logits."""
    from dist_train.models.hf import FUSED_LOSS_MODEL_TYPES

    wrong = {}
    for model_type in sorted(FUSED_LOSS_MODEL_TYPES):
        for tied in (False, True):
            torch.manual_seed(0)
            config = _tiny_causal_lm(model_type, tie_word_embeddings=tied)
            model = build_model("hf_causal_lm", {"config": config, "dropout": 0.0, "pad_token_id": 0}).eval()
            assert model.enable_fused_loss() is None, model_type
            with torch.no_grad():
                model.hf.get_output_embeddings().weight.mul_(20)
            tokens = torch.randint(3, 96, (2, 10))
            tokens[0, -3:] = 0
            targets = torch.roll(tokens, -1, dims=1)
            with torch.no_grad():
                plain = torch.nn.functional.cross_entropy(
                    model(tokens).flatten(0, 1), targets.flatten(), reduction="sum"
                )
                fused = model(tokens, targets)
            if abs(fused - plain) > 1e-5 * abs(plain):
                wrong[model_type, tied] = (fused.item(), plain.item())
    assert not wrong


@needs_hf
@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("gemma2", "Gemma2ForCausalLM's forward transforms its head's logits (final_logit_softcapping=30.0)"),
        ("recurrent_gemma", "RecurrentGemmaForCausalLM's forward transforms its head's logits (logits_soft_cap=30.0)"),
        ("cohere", "CohereForCausalLM's forward transforms its head's logits (logit_scale=0.0625)"),
        ("gptj", "GPTJForCausalLM's output projection is not a linear layer without bias"),
        (
            "modernbert-decoder",  # its output projection follows a prediction head of its own
            "ModernBertDecoderForCausalLM (model_type 'modernbert-decoder') is not among the causal LMs whose "
            "logits are known to be their head's product (dist_train.models.hf.FUSED_LOSS_MODEL_TYPES)",
        ),
    ],
)
def test_causal_lm_whose_logits_are_not_its_heads_product_refuses_the_fused_loss(tmp_path, model_type, reason):
    from dist_train.build import initial_model, require_fused_loss_support
    from dist_train.config import from_dict

    changes = {"decoder_bias": False, "local_attention": 8} if model_type == "modernbert-decoder" else {}
    config = {
        "run": {"output_dir": str(tmp_path)},
        "model": {"name": "hf_causal_lm", "config": _tiny_causal_lm(model_type, **changes)},
        "data": {"name": "synthetic_tokens", "vocab_size": 96, "seq_len": 8},
        "train": {"fused_loss": True},
    }
    if model_type == "gemma2":
        del config["model"]["config"]["final_logit_softcapping"]  # its default: 30.0
    cfg = from_dict(config)
    with pytest.raises(UserError) as raised:
        initial_model(cfg)  # the run's model: the fused loss enabled, or refused, once the factory returned
    assert str(raised.value) == (
        f"train.fused_loss: model 'hf_causal_lm' cannot compute its own loss: {reason}; set train.fused_loss=false"
    )
    if model_type == "gptj":  # and a sequence classifier, which has no per-token head at all
        config["model"] = {"name": "hf_seq_cls", "config": GPT2}
        cfg = from_dict(config)
        with pytest.raises(UserError, match="GPT2ForSequenceClassification classifies whole sequences: it has no"):
            require_fused_loss_support(cfg, build_model("hf_seq_cls", {"config": GPT2}))


@needs_hf
@pytest.mark.slow
def test_causal_lm_fused_loss_trains_as_the_unfused_one_under_fsdp2_and_zero3(tmp_path):
    """2 ranks, accumulation 2, label smoothing 0.1, GPT-2 with its tied head: unfused DDP against the
    fused loss under FSDP2 (the head's weight is the root's, gathered around the wrapper's forward)
    and ZeRO-3 (gathered around the head's own forward, after the base model's)."""
    from helpers import launch, load_weights, max_abs_diff, tiny_lm_config

    config = tiny_lm_config(tmp_path / "plain", train={"max_steps": 6, "loss_kwargs": {"label_smoothing": 0.1}})
    gpt2 = {**GPT2, "vocab_size": 64, "n_positions": 16}
    config["model"] = {"name": "hf_causal_lm", "config": gpt2, "dropout": 0.0}
    plain = launch(config, tmp_path, nproc=2, launcher="forked")
    assert plain.returncode == 0, plain.stderr[-3000:]
    expected = load_weights(tmp_path / "plain")
    losses = [row["loss"] for row in read_rows(tmp_path / "plain") if "loss" in row]
    assert len(losses) == 6
    runs = {"fsdp": ["strategy.name=fsdp"], "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}
    for name, overrides in runs.items():
        out = tmp_path / name
        result = launch(
            config, tmp_path, [f"run.output_dir={out}", "train.fused_loss=true", *overrides], nproc=2, launcher="forked"
        )
        assert result.returncode == 0, (name, result.stderr[-3000:])
        fused = [row["loss"] for row in read_rows(out) if "loss" in row]
        assert len(fused) == 6 and max(abs(a - b) for a, b in zip(fused, losses)) < 1e-5, (name, fused, losses)
        assert max_abs_diff(load_weights(out), expected) < 2e-5, name


def test_the_wrapper_passes_use_cache_only_to_a_forward_that_takes_it():
    """transformers 4's encoders (4.40, the hf extra's floor: BertForSequenceClassification) have no
    `use_cache` argument: every hf_seq_cls batch of configs/hf_seq_cls.yaml failed ('unexpected keyword
    argument use_cache', reported as a model that does not fit the data, status 2)."""
    from types import SimpleNamespace

    from dist_train.models.hf import HFModel

    class Encoder(torch.nn.Module):  # transformers 4.40's BertForSequenceClassification.forward, shortened
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
            return SimpleNamespace(logits=attention_mask.float())

    class Decoder(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, use_cache=None):
            assert use_cache is False  # training keeps no key/value cache
            return SimpleNamespace(logits=input_ids.float())

    ids = torch.tensor([[3, 4, 0]])
    assert HFModel(Encoder(), pad_token_id=0)(ids).tolist() == [[1.0, 1.0, 0.0]]
    assert HFModel(Decoder(), pad_token_id=0)(ids).tolist() == [[3.0, 4.0, 0.0]]


@needs_hf
def test_seq_cls_logits_do_not_depend_on_right_padding():
    torch.manual_seed(0)
    model = build_model("hf_seq_cls", {"config": GPT2, "num_labels": 3, "dropout": 0.0}).eval()
    short = torch.tensor([[5, 9, 14, 20]])
    padded = torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    other = torch.randint(3, 259, (1, 12))
    logits = model(torch.cat([padded, other]))
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[0], model(short)[0], atol=1e-5)
    assert model.config.pad_token_id == 0
    with pytest.raises(UserError, match="model.pad_token_id is null and the model's config has no pad_token_id"):
        build_model("hf_seq_cls", {"config": GPT2, "pad_token_id": None})  # was a traceback at the first step


@needs_hf
def test_seq_cls_pad_token_id_null_masks_the_configs_own_pad_id():
    """model.pad_token_id=null keeps the config's own (bert: 0): its tokens were not masked out of attention,
    so a bidirectional encoder's logits depended on how much padding the batch carried."""
    bert = {"model_type": "bert", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1}
    bert.update(num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)
    torch.manual_seed(0)
    model = build_model("hf_seq_cls", {"config": bert, "pad_token_id": None, "dropout": 0.0}).eval()
    assert model.config.pad_token_id == 0
    short = torch.tensor([[5, 6, 7, 8]])
    padded = torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded), model(short))


@needs_hf
def test_seq_cls_refuses_a_config_dict_whose_pad_token_id_or_num_labels_it_would_override():
    """model.config {pad_token_id: 299, num_labels: 5} became pad 0 and 2 labels (model.pad_token_id's
    and model.num_labels' defaults) without a word: the padding (299) was attended to and read as
    each sequence's last token, so the logits depended on it."""
    config = {**GPT2, "vocab_size": 300, "pad_token_id": 299}
    with pytest.raises(UserError, match=r"model.config.pad_token_id=299 disagrees with model.pad_token_id=0"):
        build_model("hf_seq_cls", {"config": config})
    with pytest.raises(UserError, match=r"model.config.num_labels=5 disagrees with model.num_labels=2"):
        build_model("hf_seq_cls", {"config": {**GPT2, "num_labels": 5}})
    torch.manual_seed(0)
    model = build_model("hf_seq_cls", {"config": config, "pad_token_id": 299, "num_labels": 5}).eval()
    assert model.hf.config.pad_token_id == 299 and model.hf.config.num_labels == 5
    padded = torch.full((1, 10), 299)
    padded[0, :3] = torch.tensor([5, 6, 7])
    assert torch.allclose(model(padded), model(padded[:, :3]), atol=1e-6)  # the padding is padding


@needs_hf
def test_seq_cls_from_a_folder_keeps_its_pad_token_id_or_says_why_not(tmp_path):
    """A RoBERTa folder pads with 1 (<s> is 0): the default model.pad_token_id=0 replaced it without a
    word, so <s> was masked out of attention, the embeddings' padding row and every position moved,
    and the folder's weights gave other logits than transformers' own model on the same batch."""
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.RobertaForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path / "roberta")
    folder = str(tmp_path / "roberta")
    with pytest.raises(UserError, match=r"has pad_token_id 1 and model.pad_token_id is 0 .*model.pad_token_id=1"):
        build_model("hf_seq_cls", {"path": folder})
    batch = torch.tensor([[0, 5, 6, 7, 2, 1, 1, 1], [0, 8, 9, 10, 11, 12, 13, 2]])  # <s> ... </s> <pad>...
    expected = reference(input_ids=batch, attention_mask=(batch != 1).long()).logits
    for kwargs in ({"pad_token_id": 1}, {"pad_token_id": None}):
        assert torch.allclose(build_model("hf_seq_cls", {"path": folder, **kwargs}).eval()(batch), expected, atol=1e-6)
    replaced = build_model("hf_seq_cls", {"path": folder, "config": {"pad_token_id": 0}})  # said twice: meant
    assert replaced.hf.config.pad_token_id == 0


@needs_hf
@pytest.mark.parametrize("num_labels", [0, -1, 2.5])
def test_seq_cls_num_labels_below_one_is_a_config_error(num_labels):
    """num_labels 0 or -1 built a classifier of no outputs, and the run's first step failed in the loss
    ('cannot reshape tensor of 0 elements into shape [-1, 0]') with a traceback, status 1. An integral
    float (2.0, as YAML reads 2e0) is that whole number, as for every factory argument annotated int."""
    said = (
        "num_labels must be a whole number, got"
        if num_labels == 2.5
        else "model.num_labels must be a whole number >= 1"
    )
    with pytest.raises(UserError, match=rf"{said} .*{num_labels}"):
        build_model("hf_seq_cls", {"config": GPT2, "num_labels": num_labels})
    assert sum(p.numel() for p in build_model("hf_seq_cls", {"config": GPT2, "num_labels": 2.0}).parameters()) > 0


@needs_hf
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_seq_cls"])
def test_example_configs_build_and_run_a_batch(name, tmp_path, monkeypatch):
    from helpers import REPO_ROOT

    from dist_train.config import load_config
    from dist_train.losses import build_loss

    monkeypatch.chdir(REPO_ROOT)  # the configs name repository files relative to the root
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml", [f"data.cache_dir={tmp_path}"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.kwargs)
    inputs, targets = build_dataset(cfg.data.name, "train", cfg.data.kwargs)[:4]
    loss = build_loss(cfg.train.loss)
    value = loss.sum(model(inputs), targets) / loss.count(targets)
    assert 0 < value.item() < 10


@needs_hf
def test_example_seq_cls_config_starts_from_local_weights_as_documented(tmp_path):
    """configs/hf_seq_cls.yaml with a local folder, as the README and the config say: its model.config
    dict must be dropped (`model.config=null`), or its small-BERT sizes override the folder's config and
    the folder's weights are refused (the README named model.path alone)."""
    from helpers import REPO_ROOT

    from dist_train.config import load_config

    example = REPO_ROOT / "configs" / "hf_seq_cls.yaml"
    assert "`model.path=/models/my-bert model.config=null`" in (REPO_ROOT / "README.md").read_text()
    assert "model.path=FOLDER model.config=null" in example.read_text()
    small_bert = load_config(example).model.kwargs["config"]
    torch.manual_seed(0)
    saved = build_model("hf_seq_cls", {"config": {**small_bert, "hidden_size": 48, "num_hidden_layers": 1}})
    saved.hf.save_pretrained(tmp_path / "my-bert")
    folder = f"model.path={tmp_path / 'my-bert'}"
    cfg = load_config(example, [folder, "model.config=null"])
    loaded = build_model(cfg.model.name, cfg.model.kwargs)
    for key, value in saved.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    alone = load_config(example, [folder]).model.kwargs
    with pytest.raises(UserError):  # what model.path alone did: the small BERT's sizes refuse the weights
        build_model(cfg.model.name, alone)


@needs_hf
def test_check_runs_the_documented_local_weights_recipe(tmp_path, capsys):
    """dist-train check builds the model on the meta device when it can: from_pretrained refuses
    the meta device, and check turned that into 'dist_train: error: ... the factory raised
    RuntimeError: You are using `from_pretrained` with a meta device context manager' (status 2)
    for a config the run trains; it builds the folder's weights on the CPU instead, as the run does."""
    from helpers import REPO_ROOT

    from dist_train.cli import main

    torch.manual_seed(0)
    build_model("hf_seq_cls", {"config": GPT2}).hf.save_pretrained(tmp_path / "my-gpt2")
    data = REPO_ROOT / "configs" / "data"
    code = main(
        ["check", str(REPO_ROOT / "configs" / "hf_seq_cls.yaml"), "--json", f"model.path={tmp_path / 'my-gpt2'}",
         "model.config=null", f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
         f"data.files.train={data / 'toy_sentiment_train.jsonl'}", f"data.files.eval={data / 'toy_sentiment_eval.jsonl'}"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["parameters"] == sum(
        p.numel() for p in build_model("hf_seq_cls", {"config": GPT2}).parameters()
    )
    assert 0 < report["first_batch"]["loss"] < 10
    from dist_train.config import load_config
    from dist_train.tools.memory import build_for_inspection

    cfg = load_config(
        REPO_ROOT / "configs" / "hf_seq_cls.yaml", [f"model.path={tmp_path / 'my-gpt2'}", "model.config=null"]
    )
    assert build_for_inspection(cfg)[1] == "meta"  # the folder's architecture, its weights unread: no memory


@needs_hf
def test_check_estimates_the_activations_of_hf_models(tmp_path, capsys):
    """transformers' mask code reads a tensor's value, which the meta device cannot give: check's
    activation estimate was 'n/a (RuntimeError: Tensor.item() cannot be called on meta tensors)' for
    every Hugging Face model, both example configs included; it is measured on the CPU instead."""
    from helpers import REPO_ROOT

    from dist_train.cli import main

    config = REPO_ROOT / "configs" / "hf_gpt2.yaml"
    common = [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.micro_batch_size=2"]
    estimates = []
    for checkpointing in ("false", "true"):
        code = main(
            ["check", str(config), "--json", f"data.files.train={REPO_ROOT / 'README.md'}", *common,
             f"train.grad_checkpointing={checkpointing}"]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        memory = json.loads(out)["memory"]
        assert memory["activation_note"] == "estimated on the cpu device", memory["activation_note"]
        estimates.append(memory["activations"])
    assert 0 < estimates[1] < estimates[0]  # activation checkpointing keeps less


# ---------------------------------------------------------------- datasets


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _builds(folder) -> list[str]:
    log = folder / ".dist_train_cache" / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


@needs_hf
def test_lm_blocks_pack_the_byte_stream(tmp_path):
    docs = ["héllo", "world!\nline two"]
    files = {"train": _write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in docs])}
    dataset = build_dataset("hf", "train", {"files": files, "task": "lm", "block_size": 4})
    stream = [b + 3 for b in docs[0].encode()] + [1] + [b + 3 for b in docs[1].encode()] + [1]  # eos = 1
    blocks = (len(stream) - 1) // 4
    assert len(dataset) == blocks
    inputs = torch.stack([dataset[i][0] for i in range(blocks)]).flatten().tolist()
    targets = torch.stack([dataset[i][1] for i in range(blocks)]).flatten().tolist()
    assert inputs == stream[: blocks * 4] and targets == stream[1 : blocks * 4 + 1]
    assert build_dataset("hf", "eval", {"files": files}) is None  # no eval file: no eval split
    for none in (None, []):  # a split without files (data.files.eval=null): no eval split; was a TypeError, IndexError
        assert build_dataset("hf", "eval", {"files": {**files, "eval": none}, "block_size": 4}) is None
        assert len(build_dataset("hf", "train", {"files": {**files, "eval": none}, "block_size": 4})) == blocks


@needs_hf
def test_classification_from_jsonl_csv_and_parquet(tmp_path):
    import datasets

    rows = [{"text": "good day", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "x" * 50, "label": "meh"}]
    jsonl = _write_jsonl(tmp_path / "train.jsonl", rows)
    kwargs = {"task": "classification", "max_length": 8}
    dataset = build_dataset("hf", "train", {"files": {"train": jsonl, "eval": jsonl}, **kwargs})
    labels = json.loads(next((tmp_path / ".dist_train_cache").glob("*/meta.json")).read_text())["labels"]
    assert labels == {"meh": 0, "neg": 1, "pos": 2}  # string labels numbered in sorted order
    assert [int(dataset[i][1]) for i in range(3)] == [2, 1, 0]
    first = dataset[0][0].tolist()
    assert first == [b + 3 for b in b"good day"]  # exactly max_length 8, no padding needed
    assert dataset[1][0].tolist() == [b + 3 for b in b"bad"] + [0] * 5  # right-padded with 0
    assert dataset[2][0].tolist() == [b"x"[0] + 3] * 8  # truncated
    csv = tmp_path / "train.csv"
    csv.write_text("sentence,target\nhello,1\nbye,0\n")
    from_csv = build_dataset("hf", "train", {"files": {"train": str(csv)}, "text_column": "sentence",
                                             "label_column": "target", **kwargs})  # fmt: skip
    assert [int(from_csv[i][1]) for i in range(2)] == [1, 0]  # integer labels kept as they are
    datasets.Dataset.from_dict({"text": ["a", "bb"], "label": [0, 1]}).to_parquet(tmp_path / "train.parquet")
    from_parquet = build_dataset("hf", "train", {"files": {"train": str(tmp_path / "train.parquet")}, **kwargs})
    assert from_parquet[1][0][:3].tolist() == [b"b"[0] + 3] * 2 + [0]


@needs_hf
def test_a_label_written_as_float_in_one_split_and_int_in_the_other_is_one_label(tmp_path):
    """train.jsonl writes 1.0, eval.jsonl 1: the mapping held "1.0" and looked up "1" (KeyError)."""
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}]),
        "eval": _write_jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}]),
    }
    for split in ("train", "eval"):
        dataset = build_dataset("hf", split, {"files": files, "task": "classification", "max_length": 4})
        assert dataset.tensors[1].tolist() == [1, 0]


@needs_hf
def test_a_label_that_is_a_list_is_one_line_saying_one_label_a_row(tmp_path):
    """A multi-label row ("label": [1]) was "the factory raised TypeError: unhashable type: 'list'"."""
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": [1, 0]}]
    files = {"train": _write_jsonl(tmp_path / "train.jsonl", rows)}
    with pytest.raises(UserError) as raised:
        build_dataset("hf", "train", {"files": files, "task": "classification", "max_length": 4})
    assert "data.label_column 'label' of the train split holds lists ([1, 0]): each row needs one label" in str(
        raised.value
    )


@needs_hf
def test_numeric_labels_are_numbered_in_numeric_order_and_eval_only_labels_are_warned_about(tmp_path, caplog):
    """jsonl labels "2" and "10" (strings) sorted as text gave "10" id 0; and a label found only in
    the eval split renumbered the train labels without a word."""
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": t} for t in ("10", "2", "1")]),
        "eval": _write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "33"}, {"text": "y", "label": "2"}]),
    }
    with caplog.at_level("WARNING", logger="dist_train"):
        train = build_dataset("hf", "train", {"files": files, "task": "classification", "max_length": 4})
    assert train.tensors[1].tolist() == [2, 1, 0]  # 1 -> 0, 2 -> 1, 10 -> 2, 33 -> 3
    assert "label(s) 33 appear only outside the train split" in caplog.text and "num_labels >= 4" in caplog.text


@needs_hf
def test_tsv_gz_is_tab_separated(tmp_path):
    import gzip

    with gzip.open(tmp_path / "train.tsv.gz", "wt") as f:
        f.write("text\tlabel\n" + "".join(f"sample, number {i}\t{i % 2}\n" for i in range(8)))
    dataset = build_dataset(
        "hf", "train", {"files": {"train": str(tmp_path / "train.tsv.gz")}, "task": "classification"}
    )
    assert len(dataset) == 8 and [int(dataset[i][1]) for i in range(4)] == [0, 1, 0, 1]


@needs_hf
def test_csv_texts_are_read_as_written(tmp_path):
    """pandas' defaults read the texts `NA`, `null`, `None` as missing (an all-padding input) and an
    all-numeric text column as numbers (`007` -> 7, or a crash); an empty label is still an error."""
    kwargs = {"task": "classification", "max_length": 4}
    (tmp_path / "words.csv").write_text("text,label\nNA,pos\nnull,neg\nNone,pos\nnan,neg\n,pos\n")
    words = build_dataset("hf", "train", {"files": str(tmp_path / "words.csv"), **kwargs})
    assert [row[row > 0].tolist() for row in words.tensors[0]] == [
        [b + 3 for b in text.encode()] for text in ("NA", "null", "None", "nan", "")
    ]
    (tmp_path / "numbers.csv").write_text("text,label\n007,1\n42,0\n")
    numbers = build_dataset("hf", "train", {"files": str(tmp_path / "numbers.csv"), **kwargs})
    assert numbers.tensors[0][0, :3].tolist() == [b + 3 for b in b"007"] and numbers.tensors[1].tolist() == [1, 0]
    (tmp_path / "unlabelled.csv").write_text("text,label\na,1\nb,\n")
    with pytest.raises(UserError, match="empty labels"):
        build_dataset("hf", "train", {"files": str(tmp_path / "unlabelled.csv"), **kwargs})


@needs_hf
def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 10)
    kwargs = {"files": {"train": str(path)}, "block_size": 8}
    first = build_dataset("hf", "train", kwargs)
    assert len(_builds(tmp_path)) == 1
    again = build_dataset("hf", "train", kwargs)
    assert len(_builds(tmp_path)) == 1 and torch.equal(first.tensors[0], again.tensors[0])
    build_dataset("hf", "train", {**kwargs, "block_size": 4})  # other settings: another cache
    assert len(_builds(tmp_path)) == 2
    path.write_text("zyxwvuts" * 10)
    os.utime(path, ns=(0, 10**18))  # a new mtime even on a coarse-grained filesystem
    changed = build_dataset("hf", "train", kwargs)
    assert len(_builds(tmp_path)) == 3 and changed[0][0][0] == ord("z") + 3


@needs_hf
def test_a_cache_cut_short_is_one_line_naming_its_folder(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 10)
    kwargs = {"files": {"train": str(path)}, "block_size": 8}
    build_dataset("hf", "train", kwargs)
    data_file = next((tmp_path / ".dist_train_cache").glob("*/data.pt"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # what a node crash before the fsync could leave
    with pytest.raises(UserError, match=f"cannot be read .*delete the folder {data_file.parent}"):
        build_dataset("hf", "train", kwargs)


@needs_hf
@pytest.mark.parametrize("rank", [0, 1])
def test_a_wait_for_rank_zeros_preprocessing_that_times_out_names_dist_timeout_s(tmp_path, monkeypatch, rank):
    """README: the barrier waits at most dist.timeout_s, raise it for corpora that take longer. A rank
    that timed out left; rank 0 then said only 'dataset 'hf': the factory raised RuntimeError: ...
    Connection closed by peer' (the waiting rank's words are not printed: one message per node)."""
    import torch.distributed as dist

    def barrier(**kwargs):
        raise RuntimeError("[gloo] Timed out waiting 1000ms" if rank else "Connection closed by peer")

    for name, value in {"is_initialized": True, "get_rank": rank, "get_backend": "gloo"}.items():
        monkeypatch.setattr(dist, name, lambda *args, value=value: value)
    monkeypatch.setattr(dist, "barrier", barrier)
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 10)
    with pytest.raises(UserError, match=r"rank 0 to preprocess into .* gave up after dist.timeout_s .*raise dist"):
        build_dataset("hf", "train", {"files": str(path), "block_size": 8})
    if rank == 0:
        with pytest.raises(UserError, match="too few for one block"):  # its own failure comes first
            build_dataset("hf", "train", {"files": str(path), "block_size": 800})


def test_two_builders_with_one_pid_each_publish_a_whole_cache(tmp_path, monkeypatch):
    """Ranks of two nodes that do not see rank 0's cache yet build into the shared folder, and may
    have the same pid (containers): both wrote `data.pt.tmp-<pid>`, and the one that renamed it
    second failed with FileNotFoundError (its file was already renamed by the other)."""
    from dist_train.data import hf

    folder, built = tmp_path / "cache", ({"x": torch.arange(10)}, {"items": 10})
    real_save, saved = torch.save, []

    def save_while_the_other_builder_finishes(obj, path):
        real_save(obj, path)
        saved.append(path)
        if len(saved) == 1:  # this builder is between its save and its rename: the other one runs whole
            hf._build_atomic(folder, lambda scratch: built, 1)

    monkeypatch.setattr(torch, "save", save_while_the_other_builder_finishes)
    hf._build_atomic(folder, lambda scratch: built, 0)
    assert torch.load(folder / "data.pt")["x"].tolist() == list(range(10))
    assert not list(folder.glob("data.pt.tmp*")) and len(saved) == 2


@needs_hf
def test_local_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "good": 3, "bad": 4, "day": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    ).save_pretrained(tmp_path / "tok")
    rows = [{"text": "good day", "label": 1}, {"text": "bad weather", "label": 0}]
    files = {"train": _write_jsonl(tmp_path / "train.jsonl", rows)}
    dataset = build_dataset(
        "hf", "train", {"files": files, "tokenizer": str(tmp_path / "tok"), "task": "classification", "max_length": 4}
    )
    assert dataset[0][0].tolist() == [3, 5, 0, 0] and dataset[1][0].tolist() == [4, 1, 0, 0]
    lm = build_dataset("hf", "train", {"files": files, "tokenizer": str(tmp_path / "tok"), "block_size": 2})
    assert torch.cat([lm[0][0], lm[1][0]]).tolist() == [3, 5, 2, 4]  # eos after each text


@needs_hf
def test_lm_texts_a_tokenizer_closes_with_eos_get_no_second_eos(tmp_path):
    """A T5/ByT5-style tokenizer ends every text with </s> itself: packing added another, so the LM
    trained on `text </s> </s> text` (and learnt eos -> eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "good": 3, "bad": 4, "day": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    ).save_pretrained(tmp_path / "tok")
    files = {"train": _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in ("good day", "bad day", "good")])}
    lm = build_dataset("hf", "train", {"files": files, "tokenizer": str(tmp_path / "tok"), "block_size": 7})
    assert lm[0][0].tolist() == [3, 5, 2, 4, 5, 2, 3] and lm[0][1].tolist() == [5, 2, 4, 5, 2, 3, 2]


@needs_hf
def test_classification_truncation_keeps_the_closing_special_token(tmp_path):
    """A BERT-style tokenizer ([CLS] text [SEP]) truncates a long text itself: [SEP] stays last."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "day": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(tmp_path / "tok")
    files = {"train": _write_jsonl(tmp_path / "train.jsonl", [{"text": "good day good day", "label": 1}])}
    settings = {"files": files, "tokenizer": str(tmp_path / "tok"), "task": "classification", "max_length": 4}
    assert build_dataset("hf", "train", settings)[0][0].tolist() == [2, 4, 5, 3]


@needs_hf
def test_bad_data_settings_are_user_errors(tmp_path):
    files = {"train": _write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "label": 1}])}
    with pytest.raises(UserError, match="no column 'text'"):
        build_dataset("hf", "train", {"files": files, "task": "classification"})
    with pytest.raises(UserError, match="no file"):
        build_dataset("hf", "train", {"files": {"train": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(UserError, match="task"):
        build_dataset("hf", "train", {"files": files, "task": "translation"})
    with pytest.raises(UserError, match="too few"):
        build_dataset("hf", "train", {"files": files, "text_column": "body", "block_size": 64})
    with pytest.raises(UserError, match="tokenizer"):
        build_dataset("hf", "train", {"files": files, "tokenizer": "gpt2"})  # a hub name: never downloaded
    with pytest.raises(UserError, match="data.format must be one of csv, json, parquet, text or null"):
        build_dataset("hf", "train", {"files": files, "format": "foo"})  # was a hub lookup of a builder `foo`


@needs_hf
@pytest.mark.parametrize("key, value", [("block_size", 0), ("block_size", -5), ("block_size", 2.5), ("max_length", 0)])
def test_block_size_and_max_length_below_one_token_are_config_errors(tmp_path, key, value):
    """data.max_length=0 built empty items and the run's first step failed with a traceback (status 1);
    block_size=0 was a ZeroDivisionError, -5 'too few for one block of -5', 2.5 a TypeError."""
    files = {"train": _write_jsonl(tmp_path / "t.jsonl", [{"text": "some words", "label": 1}] * 4)}
    said = (
        "block_size must be a whole number," if value == 2.5 else f"data.{key} must be a whole number of tokens >= 1,"
    )
    with pytest.raises(UserError, match=rf"{said} got {value}"):
        build_dataset("hf", "train", {"files": files, "task": "classification", key: value})


@needs_hf
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "has no rows"),  # was StopIteration with no message
        ("header.csv", b"text,label\n", "has no rows"),  # was 'Instruction "train" corresponds to no data!'
        ("broken.jsonl", b'{"text": "a", "label": 1}\n{"text": oops\n', "as json .*JSON parse error"),
        ("latin1.csv", b"text,label\nd\xe9j\xe0 vu,1\n", "as csv .*UnicodeDecodeError"),  # both were:
        ("fields.csv", b"text,label\na,1\nb,0,extra\n", "as csv .*Expected 2 fields in line 3"),  # "An error occurred"
        ("numbers.jsonl", b'{"text": 7, "label": 1}\n', "column 'text' holds .*int64.*, not text"),
    ],
    ids=["empty", "header-only", "broken-json", "latin1", "extra-field", "numeric-text"],
)
def test_unreadable_files_say_what_is_wrong(tmp_path, capfd, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        build_dataset("hf", "train", {"files": str(tmp_path / name), "task": "classification"})
    assert "\n" not in str(error.value) and "DatasetGenerationError" not in str(error.value)
    assert "Failed to load" not in capfd.readouterr().err  # datasets' own log line came before ours


# ---------------------------------------------------------------- 2 ranks


def _config(output_dir, model: dict, data: dict) -> dict:
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "model": model,
        "data": {"name": "hf", **data},
        "train": {"max_steps": 25, "micro_batch_size": 8, "lr": 3e-3, "grad_clip_norm": 1.0},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }


def _write_corpora(root) -> tuple[dict, dict]:
    """A text corpus from a tiny grammar (LM) and a jsonl classification set (letters decide the label)."""
    rng = random.Random(0)
    words = ["the cat", "a dog", "my bird"], ["sees", "likes", "chases"], ["the ball.", "a stick.", "the sun."]
    text = "\n".join(" ".join(rng.choice(options) for options in words) for _ in range(400))
    (root / "lm").mkdir()
    (root / "lm" / "train.txt").write_text(text)
    (root / "lm" / "eval.txt").write_text(text[:2000])
    lm = {"train": str(root / "lm" / "train.txt"), "eval": str(root / "lm" / "eval.txt")}

    def row() -> dict:
        label = rng.choice(["yes", "no"])
        letters = "abcde" if label == "yes" else "vwxyz"
        return {"text": "".join(rng.choice(letters) for _ in range(rng.randint(3, 20))), "label": label}

    (root / "cls").mkdir()
    cls = {
        "train": _write_jsonl(root / "cls" / "train.jsonl", [row() for _ in range(256)]),
        "eval": _write_jsonl(root / "cls" / "eval.jsonl", [row() for _ in range(64)]),
    }
    return lm, cls


def _train_all(rank: int, world_size: int, configs: list[dict]) -> None:
    from helpers import ctx_from_env

    from dist_train.config import from_dict
    from dist_train.trainer import train

    for config in configs:
        train(from_dict(config), ctx_from_env())


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """gpt2 LM on a text file and gpt2 sequence classification on jsonl, 25 steps each on 2 ranks."""
    root = tmp_path_factory.mktemp("hf")
    lm, cls = _write_corpora(root)
    configs = [
        _config(root / "lm" / "run", {"name": "hf_causal_lm", "config": GPT2, "dropout": 0.0},
                {"files": lm, "block_size": 32}),
        _config(root / "cls" / "run", {"name": "hf_seq_cls", "config": GPT2, "num_labels": 2, "dropout": 0.0},
                {"files": cls, "task": "classification", "max_length": 24}),
    ]  # fmt: skip
    run_ranks(_train_all, 2, configs)
    return root


def _drop(rows: list[dict]) -> tuple[float, float]:
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 25
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "cls"])
def test_preprocessed_once_on_rank_zero(hf_runs, task):
    builds = _builds(hf_runs / task)
    assert len(builds) == 1 and " rank 0 " in builds[0], builds  # once, on rank 0, for both splits


@needs_hf
@pytest.mark.slow
def test_gpt2_lm_loss_falls_on_two_ranks(hf_runs):
    rows = read_rows(hf_runs / "lm" / "run")
    first, last = _drop(rows)
    print(f"hf_causal_lm: loss {first:.3f} -> {last:.3f}, eval {rows[-1]}")
    assert last < 0.7 * first
    assert rows[-1]["eval_perplexity"] < 20  # bytes: 259 ids, uniform would be 259


@needs_hf
@pytest.mark.slow
def test_gpt2_seq_cls_learns_on_two_ranks(hf_runs):
    rows = read_rows(hf_runs / "cls" / "run")
    first, last = _drop(rows)
    print(f"hf_seq_cls: loss {first:.3f} -> {last:.3f}, eval {rows[-1]}")
    assert last < 0.7 * first
    assert rows[-1]["eval_accuracy"] > 0.8


def test_a_cache_folder_it_cannot_write_is_one_line_naming_data_cache_dir(tmp_path):
    """The default cache sits beside the data files, often read-only: the factory's PermissionError
    (here: a file where a folder would be) was the message, without a word on data.cache_dir."""
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 10)
    (tmp_path / "cache").write_text("")
    kwargs = {"files": {"train": str(path)}, "block_size": 8, "cache_dir": str(tmp_path / "cache" / "sub")}
    with pytest.raises(UserError, match=r"cannot write the preprocessing cache .*; set data.cache_dir to a folder"):
        build_dataset("hf", "train", kwargs)
