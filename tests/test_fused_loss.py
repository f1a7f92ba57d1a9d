"""`train.fused_loss`: the output projection and cross-entropy computed a chunk of tokens at a time
inside the model (dist_train/fused_loss.py) give the unfused loss and gradients, refuse what they
cannot serve in one line, keep no logits, and train alike under DDP (resumed, compiled), FSDP2 and
ZeRO-3."""

import pytest
import torch
import torch.nn.functional as F
from helpers import PYTHON, launch, load_weights, max_abs_diff, read_rows, run_cli, tiny_lm_config, write_config

from dist_train import fused_loss
from dist_train.config import from_dict
from dist_train.errors import UserError
from dist_train.losses import IGNORE_INDEX, build_loss
from dist_train.misfit import ForwardError
from dist_train.models.transformer_lm import transformer_lm


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 tokens at a vocabulary of 11: 37 tokens make 8 chunks, the last one short."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 5 * 4 * 11)


def _tokens(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 6, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(11, (37,), generator=gen)
    targets[[0, 4, 5, 36]] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_chunked_loss_and_gradients_equal_torch_cross_entropy(small_chunks, smoothing):
    assert fused_loss.chunk_rows(11) == 5
    hidden, weight, targets = _tokens()
    fused = fused_loss.linear_cross_entropy(hidden, weight, targets, smoothing)
    (fused * 0.7).backward()  # backward scales the gradients found in forward by the incoming one
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(
        hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing
    )
    (reference * 0.7).backward()
    assert fused.dtype == torch.float64 and fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-12, atol=1e-12)
    assert got[0][[0, 4, 5, 36]].abs().max() == 0  # ignored tokens send no gradient back
    assert torch.autograd.gradcheck(
        lambda h, w: fused_loss.linear_cross_entropy(h, w, targets, smoothing),
        (hidden.detach().requires_grad_(), weight.detach().requires_grad_()),
    )


def _loss_and_grads(smoothing: float):
    hidden, weight, targets = _tokens(torch.float32)
    loss = fused_loss.linear_cross_entropy(hidden, weight, targets, smoothing)
    loss.backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_compiled_form_of_the_target_term_gives_the_same_bits(small_chunks, monkeypatch, smoothing):
    """Under torch.compile the one-hot term is a comparison with the column index (fused into one
    pass, no fp32 gradient written), in eager a scatter: the same additions, the same bits."""
    scatter = _loss_and_grads(smoothing)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    comparison = _loss_and_grads(smoothing)
    for a, b in zip(scatter, comparison):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_compiled_loss_follows_the_eager_one(small_chunks):
    """Inductor's compiled loss (8 chunks, the last one short, label smoothing on) gives the eager loss
    and gradients to rounding."""
    eager = _loss_and_grads(0.2)
    hidden, weight, targets = _tokens(torch.float32)
    compiled = torch.compile(fused_loss.linear_cross_entropy)(hidden, weight, targets, 0.2)
    compiled.backward()
    for got, want in zip((compiled, hidden.grad, weight.grad), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_gradients_only_the_loss_is_computed(small_chunks):
    """Under no_grad (evaluation) one product per chunk, not the three of training."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, targets = _tokens()
    product = 2 * 37 * 6 * 11
    for grad, products in ((False, 1), (True, 3)):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as flops:
            loss = fused_loss.linear_cross_entropy(hidden, weight, targets)
        assert flops.get_total_flops() == products * product and loss.requires_grad == grad
    reference = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_forward_with_targets_equals_the_loss_of_its_logits(small_chunks, precision):
    """transformer_lm(tokens, targets) against train.loss on transformer_lm(tokens): same loss, same
    gradients (bf16 autocast: the same bf16 products, so equal to fp32 rounding of the loss)."""
    torch.manual_seed(0)
    model = transformer_lm(vocab_size=11, seq_len=8, d_model=16, n_layers=2, n_heads=2)
    tokens, targets = torch.randint(11, (3, 8)), torch.randint(11, (3, 8))
    targets[0, :3] = IGNORE_INDEX
    loss_fn = build_loss("cross_entropy", label_smoothing=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(tokens, targets=targets, label_smoothing=0.1) if fused else model(tokens)
        loss = outputs if fused else loss_fn.sum(outputs, targets)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused.dim() == 0 and fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, grad in plain_grads.items():
        if precision == "fp32":
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)
        else:  # the weight's gradient: 8 chunks' bf16 products summed in fp32, not one bf16 product
            assert (fused_grads[name] - grad).norm() <= 5e-3 * grad.norm(), name


def test_a_target_past_the_vocabulary_is_a_misfit_said_in_one_line():
    model = transformer_lm(vocab_size=11, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    tokens, targets = torch.randint(11, (2, 8)), torch.randint(11, (2, 8))
    targets[1, 2] = 11
    with pytest.raises(RuntimeError) as raised:
        model(tokens, targets=targets)
    error = ForwardError(raised.value, tokens, targets, None)
    assert error.is_misfit()  # exit 2 and this line, as torch's own cross_entropy's IndexError
    assert "does not fit the data" in str(error.as_user_error())
    with pytest.raises(UserError, match=r"outputs \(2, 8, 16\) do not fit targets \(2, 7\)"):
        model(tokens, targets=targets[:, :7])
    with pytest.raises(UserError, match="LMHead computes the loss of a projection without bias"):
        fused_loss.LMHead(16, 11, bias=True)(torch.randn(2, 16), torch.zeros(2, dtype=torch.long))


def test_the_dynamic_int8_export_quantizes_the_language_model_head():
    """LMHead is a Linear to torch's dynamic quantization too (it maps exact types): the int8 model's
    head is an int8 Linear computing the float model's logits to int8 accuracy."""
    from dist_train.compress.qat import quantize

    torch.manual_seed(0)
    model = transformer_lm(vocab_size=11, seq_len=8, d_model=16, n_layers=1, n_heads=2).eval()
    int8 = quantize(model, "dynamic")
    assert type(int8.lm_head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(model.lm_head, fused_loss.LMHead)  # the float model is left as it was
    tokens = torch.randint(11, (2, 8))
    with torch.no_grad():
        assert (int8(tokens) - model(tokens)).abs().max() < 0.05 * model(tokens).abs().max()


def test_fused_loss_is_refused_with_another_loss_or_a_model_that_cannot_compute_it(tmp_path):
    config = tiny_lm_config(tmp_path / "run", train={"fused_loss": True, "loss": "focal"})
    with pytest.raises(UserError, match="train.fused_loss computes cross_entropy inside the model; train.loss is"):
        from_dict(config)
    config = {
        "run": {"output_dir": str(tmp_path / "mlp")},
        "model": {"name": "mlp", "input_dim": 4, "num_classes": 3},
        "data": {"name": "synthetic_vectors", "input_dim": 4, "num_classes": 3, "num_samples": 64},
        "train": {"max_steps": 2, "micro_batch_size": 4, "fused_loss": True},
    }
    config_path = write_config(tmp_path / "mlp.yaml", config)
    for command in (["-m", "dist_train"], ["-m", "dist_train", "check"]):  # the run, and check beforehand
        result = run_cli([PYTHON, *command, "--config", str(config_path)])
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "train.fused_loss: model 'mlp' (MLP) does not compute its own loss" in lines[0]
    assert not (tmp_path / "mlp" / "metrics.jsonl").exists()


def test_check_estimates_no_logits_with_the_fused_loss(tmp_path):
    """The activation estimate of `dist-train check` runs the fused forward: the log-softmax of the
    logits that cross_entropy saves (64 x 16 x 4,000 fp32) is gone from it, less the two gradients
    the fused forward keeps for backward (the hidden states' and the weight's, 0.6 MB)."""
    from dist_train.tools import memory

    results = {}
    for fused in (False, True):
        config = tiny_lm_config(tmp_path, train={"fused_loss": fused, "micro_batch_size": 64})
        config["model"]["vocab_size"] = config["data"]["vocab_size"] = 4000
        cfg = from_dict(config)
        model, where = memory.build_for_inspection(cfg)
        results[fused] = memory.activation_bytes(model, torch.zeros(16, dtype=torch.long), cfg, where)
    logits = 64 * 16 * 4000 * 4
    assert 0.9 * logits <= results[False] - results[True] <= logits, results


@pytest.mark.slow
def test_fused_loss_trains_as_the_unfused_one_under_ddp_fsdp2_and_zero3(tmp_path):
    """2 ranks, accumulation 2, label smoothing 0.1: unfused DDP against the fused loss under DDP
    (resumed at step 5, so its first step rebuilds DDP's buckets with the targets, and compiled),
    FSDP2 and ZeRO-3 (the tied head's weight is gathered around the head's own forward)."""
    smoothing = {"loss_kwargs": {"label_smoothing": 0.1}}
    config = tiny_lm_config(tmp_path / "plain", train=smoothing, checkpoint={"every_steps": 5})
    plain = launch(config, tmp_path, nproc=2, launcher="forked")
    assert plain.returncode == 0, plain.stderr[-3000:]
    step_5 = f"checkpoint.resume={tmp_path / 'plain'}/checkpoints/step-00000005"
    runs = {
        "ddp": ["train.compile=true", step_5],
        "fsdp": ["strategy.name=fsdp"],
        "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    }
    expected = load_weights(tmp_path / "plain")
    losses = {row["step"]: row["loss"] for row in read_rows(tmp_path / "plain") if "loss" in row}
    for name, overrides in runs.items():
        out = tmp_path / name
        result = launch(
            config,
            tmp_path,
            [f"run.output_dir={out}", "train.fused_loss=true", *overrides],
            nproc=2,
            launcher="forked",
        )
        assert result.returncode == 0, (name, result.stderr[-3000:])
        rows = [row for row in read_rows(out) if "loss" in row]
        assert [row["step"] for row in rows] == (list(range(6, 11)) if name == "ddp" else list(range(1, 11)))
        assert max(abs(row["loss"] - losses[row["step"]]) for row in rows) < 1e-5, name
        assert max_abs_diff(load_weights(out), expected) < 2e-5, name
