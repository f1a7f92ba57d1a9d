"""The CUDA paths, checked where a GPU exists (`pytest -m gpu`; skipped elsewhere, CI included).

One command runs these and the GPU benchmark on a GPU machine: `bash bench/gpu_session.sh OUT_DIR`.
What they pin down: a one-GPU run picks CUDA and logs MFU and CUDA memory; GPU and CPU runs of the
same fp32 config agree; no CUDA synchronisation inside a training step (torch's sync debug mode set
to error); fp16 with the GradScaler and bf16 with torch.compile train; CUDA graphs (compile mode
reduce-overhead) follow the default mode; train.fused_loss trains as the unfused loss, compiled
and as CUDA graphs; cuDNN attention runs when `train.sdpa_backend=cudnn`
asks for it and trains like flash attention; FSDP2 on one GPU matches DDP;
SyncBatchNorm becomes torch's own on CUDA; a model that does not fit the data is one line, status 2;
and, with two GPUs, 2 ranks x b equal 1 rank x 2b (NCCL).
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import launch, load_weights, max_abs_diff, read_rows, tiny_lm_config

from dist_train import trainer
from dist_train.config import from_dict
from dist_train.distributed import DistContext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def gpu_ctx() -> DistContext:
    return DistContext(0, 0, 1, 1, torch.device("cuda", 0), None, "single")


def train_ok(config: dict, tmp_path, launcher: str = "single", **kwargs) -> list[dict]:
    proc = launch(config, tmp_path, launcher=launcher, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in read_rows(config["run"]["output_dir"]) if "loss" in r]


def test_one_gpu_bf16_run_logs_mfu_and_cuda_memory(tmp_path):
    from dist_train.flops import peak_tflops

    config = tiny_lm_config(tmp_path / "run", train={"precision": "bf16"}, log={"every_steps": 5, "plot": False})
    rows = train_ok(config, tmp_path)
    assert [r["step"] for r in rows] == [5, 10]
    assert all(r["cuda_max_allocated_mb"] > 0 for r in rows)
    if peak_tflops(torch.cuda.get_device_name(0)) is not None:  # GPUs in dist_train/flops.py's table
        assert all(0 < r["mfu"] < 1 for r in rows), rows
    weights = load_weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in weights.values() if t.is_floating_point())


def test_gpu_and_cpu_fp32_runs_agree(tmp_path):
    runs = {}
    for name, backend in (("gpu", "auto"), ("cpu", "gloo")):  # dist.backend=gloo keeps one process on the CPU
        config = tiny_lm_config(tmp_path / name, dist={"backend": backend})
        runs[name] = train_ok(config, tmp_path)
    for gpu, cpu in zip(runs["gpu"], runs["cpu"], strict=True):
        assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    assert "cuda_max_allocated_mb" in runs["gpu"][0] and "cuda_max_allocated_mb" not in runs["cpu"][0]
    assert max_abs_diff(load_weights(tmp_path / "gpu"), load_weights(tmp_path / "cpu")) < 5e-3


def test_no_cuda_synchronisation_inside_a_training_step(tmp_path, monkeypatch):
    """torch raises on any synchronising CUDA call inside train_step (forward, backward, clip, skip
    flag, optimizer step); the host reads of logging steps happen outside it."""
    from test_hot_loop import _check_events, instrumented_train

    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 64, "depth": 2, "num_classes": 4},
        "data": {"name": "synthetic_vectors", "input_dim": 32, "num_classes": 4, "num_samples": 512},
        "train": {"max_steps": 12, "micro_batch_size": 8, "grad_accum_steps": 2, "grad_clip_norm": 1.0},
        "optim": {"name": "adamw"},
        "eval": {"every_steps": None, "at_end": False},
        "checkpoint": {"every_steps": None, "at_end": False},
        "log": {"every_steps": 5, "plot": False, "progress": "lines"},
    }
    original = trainer.train_step

    def strict_step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(trainer, "train_step", strict_step)
    logging.disable(logging.INFO)
    try:
        events = instrumented_train(from_dict(config), gpu_ctx())
    finally:
        logging.disable(logging.NOTSET)
    _check_events(events, world_size=1)


def test_fp16_with_grad_scaler_and_bf16_with_compile_train(tmp_path):
    fp16 = train_ok(tiny_lm_config(tmp_path / "fp16", train={"precision": "fp16", "max_steps": 20}), tmp_path)
    assert fp16[-1]["loss"] < fp16[0]["loss"]
    assert fp16[-1]["skipped_steps"] <= 5  # the scaler's first overflow steps at most
    compiled = tiny_lm_config(tmp_path / "compiled", train={"precision": "bf16", "compile": True, "max_steps": 20})
    rows = train_ok(compiled, tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    from dist_train.models import build_model

    bare = build_model("transformer_lm", {k: v for k, v in compiled["model"].items() if k != "name"})
    assert set(load_weights(tmp_path / "compiled")) == set(bare.state_dict())


def test_cuda_graph_compile_mode_follows_the_default_mode(tmp_path):
    """train.compile_mode=reduce-overhead replays the model as CUDA graphs: with accumulation (the
    micro-steps' losses kept until the optimizer step) and evaluations (a short last batch) between
    steps, the run logs the losses and eval losses of the default mode."""
    runs = {}
    for mode in ("default", "reduce-overhead"):
        train = {"precision": "bf16", "compile": True, "compile_mode": mode, "grad_accum_steps": 2, "max_steps": 12}
        config = tiny_lm_config(tmp_path / mode, train=train, eval={"every_steps": 4}, log={"every_steps": 2})
        proc = launch(config, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = read_rows(config["run"]["output_dir"])
    for key in ("loss", "eval_loss"):
        default = [r[key] for r in runs["default"] if key in r]
        graphs = [r[key] for r in runs["reduce-overhead"] if key in r]
        assert len(default) >= 3 and graphs == pytest.approx(default, rel=2e-2), key


def test_fused_loss_on_cuda_trains_as_the_unfused_one_compiled_and_as_cuda_graphs(tmp_path):
    """train.fused_loss under bf16 and torch.compile on a GPU, in the default mode and replayed as CUDA
    graphs (the loss is then the graphs' own output, kept until the optimizer step): the losses and
    eval losses of the unfused loss."""
    runs = {}
    for name, mode, fused in (
        ("plain", "default", False),
        ("fused", "default", True),
        ("graphs", "reduce-overhead", True),
    ):
        train = {"precision": "bf16", "compile": True, "compile_mode": mode, "fused_loss": fused, "grad_accum_steps": 2}
        config = tiny_lm_config(tmp_path / name, train={**train, "max_steps": 12}, eval={"every_steps": 4})
        proc = launch(config, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = read_rows(config["run"]["output_dir"])
    for key in ("loss", "eval_loss"):
        plain = [r[key] for r in runs["plain"] if key in r]
        for name in ("fused", "graphs"):
            assert [r[key] for r in runs[name] if key in r] == pytest.approx(plain, rel=2e-2), (name, key)


def test_cudnn_attention_runs_when_preferred_and_trains_like_flash(tmp_path):
    """train.sdpa_backend=cudnn/flash: causal bf16 attention runs torch's cuDNN/flash op (torch's own
    order picks one of them: torch 2.11 on an H100 picks cuDNN), and a bf16 run on cuDNN's kernel
    logs the losses of one on flash's."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from dist_train.transforms import preferred_attention

    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ops = {}
    for backend in ("torch", "cudnn", "flash"):
        with preferred_attention(backend), profile(activities=[ProfilerActivity.CPU]) as prof:
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            torch.cuda.synchronize()
        ops[backend] = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    flash, cudnn = "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention"
    assert flash in ops["flash"] and cudnn not in ops["flash"], ops
    assert cudnn in ops["cudnn"] and flash not in ops["cudnn"], ops
    assert {flash, cudnn} & ops["torch"], ops
    rows = {}
    for backend in ("flash", "cudnn"):
        train = {"precision": "bf16", "sdpa_backend": backend, "max_steps": 12}
        rows[backend] = train_ok(tiny_lm_config(tmp_path / backend, train=train), tmp_path)
    assert [r["loss"] for r in rows["cudnn"]] == pytest.approx([r["loss"] for r in rows["flash"]], rel=2e-2)


def test_fsdp2_on_one_gpu_matches_ddp(tmp_path):
    for strategy in ("ddp", "fsdp"):
        train_ok(tiny_lm_config(tmp_path / strategy, strategy={"name": strategy}), tmp_path)
    assert max_abs_diff(load_weights(tmp_path / "ddp"), load_weights(tmp_path / "fsdp")) <= 1e-4


def test_deepspeed_zero2_on_one_gpu_matches_ddp(tmp_path):
    pytest.importorskip("deepspeed")
    for name, strategy in (("ddp", {"name": "ddp"}), ("zero2", {"name": "deepspeed", "zero_stage": 2})):
        train_ok(tiny_lm_config(tmp_path / name, strategy=strategy), tmp_path)
    assert max_abs_diff(load_weights(tmp_path / "ddp"), load_weights(tmp_path / "zero2")) <= 1e-4


def test_a_model_that_does_not_fit_the_data_is_one_line_on_cuda(tmp_path):
    """A shape misfit raises at the kernel launch on CUDA too: status 2, one line, the batch described
    from its host tensors. (An out-of-range index is a device-side assert there: status 1.)"""
    config = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 16, "depth": 2, "num_classes": 4},
        "data": {"name": "synthetic_vectors", "input_dim": 20, "num_classes": 4, "num_samples": 64},
        "train": {"max_steps": 2, "micro_batch_size": 8},
        "log": {"plot": False},
    }
    proc = launch(config, tmp_path, launcher="single")
    lines = [line for line in proc.stderr.splitlines() if "dist_train: error:" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "does not fit the data" in lines[0] and "inputs (8, 20) float32" in lines[0]
    assert "Traceback" not in proc.stderr


def test_sync_batchnorm_is_torchs_own_on_cuda():
    from dist_train.models import build_model
    from dist_train.transforms import apply_transforms

    cfg = from_dict(
        {
            "run": {"output_dir": "unused"},
            "model": {"name": "resnet", "widths": [8, 16], "num_classes": 4},
            "data": {"name": "synthetic_images"},
            "train": {"sync_batchnorm": True},
        }
    )
    model = apply_transforms(build_model("resnet", cfg.model.kwargs), cfg, gpu_ctx())
    kinds = {type(m) for m in model.modules() if "BatchNorm" in type(m).__name__}
    assert kinds == {torch.nn.SyncBatchNorm}, kinds


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_match_one_gpu_with_the_same_global_batch(tmp_path):
    runs = {}
    for name, shape, nproc in (("one", {"micro_batch_size": 8}, 1), ("two", {"micro_batch_size": 4}, 2)):
        config = tiny_lm_config(tmp_path / name, train=shape)
        launcher = "torchrun" if nproc > 1 else "single"
        runs[name] = train_ok(config, tmp_path, launcher=launcher, nproc=nproc)
    assert max_abs_diff(load_weights(tmp_path / "one"), load_weights(tmp_path / "two")) <= 1e-4
    for a, b in zip(runs["one"], runs["two"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
