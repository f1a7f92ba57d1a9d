"""FLOPs per token, the GPU peak table and the MFU metric (dist_train/flops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dist_train import flops
from dist_train.distributed import DistContext
from dist_train.metrics import Throughput
from dist_train.models.transformer_lm import transformer_lm


def test_transformer_formula():
    assert flops.transformer_flops_per_token(1_000_000, 2, 64, 128) == 6 * 1_000_000 + 12 * 2 * 64 * 128


def test_transformer_lm_counts_every_matmul_parameter_but_the_position_embedding():
    vocab, seq, d, layers = 256, 64, 128, 2
    model = transformer_lm(vocab_size=vocab, seq_len=seq, d_model=d, n_layers=layers, n_heads=4)
    # per block: qkv 3d^2+3d, proj d^2+d, two LayerNorms 4d, MLP 4d^2+4d + 4d^2+d; tied embedding V*d; ln_f 2d
    n_params = vocab * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert n_params == sum(p.numel() for p in model.parameters()) - seq * d
    assert flops.model_flops_per_token(model, seq) == 6 * n_params + 12 * layers * seq * d


def test_gpt2_small_matches_the_usual_estimate():
    with torch.device("meta"):
        model = transformer_lm(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    n_params = sum(p.numel() for p in model.parameters())
    assert 124.0e6 < n_params < 124.5e6  # "124M", position embedding included
    per_token = flops.model_flops_per_token(model, 1024)
    # nanoGPT's estimate_mfu: 6 N (non-embedding N: position embedding left out) + 12 L d T
    assert per_token == pytest.approx(6 * (n_params - 1024 * 768) + 12 * 12 * 768 * 1024)
    assert 0.85e9 < per_token < 0.86e9


def test_models_say_how_or_report_nothing():
    class Counted(nn.Linear):
        def flops_per_token(self, seq_len: int) -> float:
            return 42.0 * seq_len

    assert flops.model_flops_per_token(Counted(2, 2), 10) == 420.0
    assert flops.model_flops_per_token(nn.Linear(2, 2), 10) is None  # no MFU for models that do not say


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-32GB", 112.0),
        ("NVIDIA L40S", None),  # not in the table: must not match "L4"
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_lookup(name, tflops):
    assert flops.peak_tflops(name) == tflops


def test_mfu_only_on_cuda_with_a_known_gpu_and_model(monkeypatch):
    model = transformer_lm(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)
    cpu = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")
    assert flops.mfu_per_token(model, 16, cpu) is None

    cuda = DistContext(0, 0, 2, 2, torch.device("cuda", 0), "nccl", "torchrun")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    per_token = flops.mfu_per_token(model, 16, cuda)
    assert per_token == pytest.approx(flops.model_flops_per_token(model, 16) / (989e12 * 2))
    assert flops.mfu_per_token(model, 1, cuda) is None  # inputs that are not tokens
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.mfu_per_token(model, 16, cuda) is None

    throughput = Throughput(mfu_per_token=1e-9)
    throughput.steps = 10
    row = throughput.rates(samples_per_step=4, tokens=640)
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 1e-9)
    assert "mfu" not in Throughput().rates(4, 640)


@pytest.mark.parametrize(
    "sample, tokens",
    [
        (torch.zeros(64, dtype=torch.int64), 64),  # token ids
        (torch.zeros(64, dtype=torch.int32), 64),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), 1),  # pixels: no tokens/s (it reported 192 tokens per image)
        (torch.zeros(64, dtype=torch.bool), 1),  # a mask
        (torch.zeros(3, 8, 8), 1),  # floats
    ],
)
def test_only_integer_id_inputs_count_as_tokens(sample, tokens):
    from dist_train.metrics import tokens_per_sample

    assert tokens_per_sample(sample) == tokens


def test_a_pause_on_cuda_lets_the_queued_training_work_finish_inside_the_window(monkeypatch):
    """Evaluation and checkpoints are left out of the window, but on CUDA the steps' kernels may still
    run when the pause begins: without a sync there, their time fell into the pause and the rates read
    high (here: 0.2 s of queued work left out, a 1.0 s step read as 0.8 s)."""
    clock = {"now": 0.0}
    monkeypatch.setattr("dist_train.metrics.time.perf_counter", lambda: clock["now"])

    def synchronize(device=None):  # the GPU finishes the training step still queued: 0.2 s
        clock["now"] += 0.2

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    throughput = Throughput(device=torch.device("cuda", 0))
    clock["now"] = 0.8  # the host queued the step's work
    with throughput.paused():
        clock["now"] += 5.0  # evaluation (its own reads wait for the queued step first)
    throughput.steps = 1
    assert throughput.rates(4)["step_time_s"] == pytest.approx(1.0)
