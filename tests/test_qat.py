"""Quantization-aware training and int8 exports on the CPU: the exported models load and run, their
eval accuracy is within 2 points of the float model's, their files are smaller, and the float export
keeps the bare model's names."""

import json

import pytest
import torch
from helpers import load_weights, max_abs_diff, read_rows

import dist_train.state as run_state
from dist_train.compress import load_quantized
from dist_train.config import from_dict
from dist_train.data import build_dataset
from dist_train.distributed import DistContext
from dist_train.errors import UserError
from dist_train.models import build_model
from dist_train.trainer import train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")
MLP = {"name": "mlp", "hidden_dim": 64}
VECTORS = {"name": "synthetic_vectors", "num_samples": 2048, "eval_samples": 512}
CNN = {"name": "cnn", "channels": [16, 32], "num_classes": 4}
IMAGES = {"name": "synthetic_images", "num_classes": 4, "image_size": 8, "num_samples": 1024, "eval_samples": 512}
IMAGES["noise"] = 3.0  # hard enough that accuracy is not saturated


def raw_config(output_dir, model, data, steps, compress, **sections):
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 3},
        "model": model,
        "data": data,
        "train": {"max_steps": steps, "micro_batch_size": 32, "lr": 1e-2},
        "compress": compress,
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 50, "plot": False},
    }
    raw.update(sections)
    return raw


def run(output_dir, *args, **kwargs):
    train(from_dict(raw_config(output_dir, *args, **kwargs)), SINGLE)
    rows = read_rows(output_dir)
    float_row = [r for r in rows if "eval_accuracy" in r][-1]
    int8_row = [r for r in rows if any(k.endswith("int8") for k in r)][-1]
    return float_row, int8_row


def accuracy(model, data):
    dataset = build_dataset(data["name"], "eval", {k: v for k, v in data.items() if k != "name"})
    inputs, targets = dataset.tensors
    with torch.no_grad():  # in the eval loop's batches of 32: dynamic quantization ranges are per batch
        predictions = torch.cat([model(batch).argmax(-1) for batch in inputs.split(32)])
    return (predictions == targets).float().mean().item()


def quantized_modules(model):
    return {type(m).__module__.split(".")[3] for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.")}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat_mlp")
    return out, *run(out, MLP, VECTORS, 150, {"qat": True})


def test_mlp_int8_accuracy_within_two_points_of_float(mlp_run):
    out, float_row, int8_row = mlp_run
    assert float_row["eval_accuracy"] > 0.8  # a learnable task, learnt
    assert abs(int8_row["eval_accuracy_int8"] - float_row["eval_accuracy"]) <= 0.02
    assert int8_row["step"] == float_row["step"] == 150


def test_mlp_int8_export_loads_runs_and_is_smaller(mlp_run):
    out, _, int8_row = mlp_run
    model = load_quantized(out / "model_int8.pt")
    assert "quantized" in quantized_modules(model)  # real int8 kernels, not fake quantization
    assert accuracy(model, VECTORS) == pytest.approx(int8_row["eval_accuracy_int8"], abs=1e-9)
    payload = torch.load(out / "model_int8.pt", weights_only=True)  # plain tensors and containers only
    assert payload["format"] == "dist_train.int8/1" and payload["kind"] == "qat"
    assert (out / "model_int8.pt").stat().st_size < 0.75 * (out / "model.safetensors").stat().st_size


def test_float_export_keeps_the_bare_names(mlp_run):
    out, float_row, _ = mlp_run
    weights = load_weights(out)
    fresh = build_model("mlp", {"hidden_dim": 64})
    fresh.load_state_dict(weights)  # strict: no observer buffers, no stub entries
    # the float weights alone (no fake quantization) still solve the task
    assert accuracy(fresh.eval(), VECTORS) == pytest.approx(float_row["eval_accuracy"], abs=0.03)


def test_cnn_qat_from_a_later_step_with_fused_batchnorm(tmp_path):
    float_row, int8_row = run(
        tmp_path, CNN, IMAGES, 60, {"qat": True, "qat_start_step": 5}, checkpoint={"every_steps": 4, "keep_last": 20}
    )
    assert float_row["eval_accuracy"] > 0.6
    assert abs(int8_row["eval_accuracy_int8"] - float_row["eval_accuracy"]) <= 0.02
    # fake quantization switched on at step 5, and the switch is part of the checkpointed state
    flags = {step: torch.load(tmp_path / f"checkpoints/step-{step:08d}/model.pt", weights_only=True) for step in (4, 8)}
    enabled = {step: [v.item() for k, v in s.items() if k.endswith("fake_quant_enabled")] for step, s in flags.items()}
    assert enabled[4] and set(enabled[4]) == {0} and set(enabled[8]) == {1}
    model = load_quantized(tmp_path / "model_int8.pt")
    assert type(model.blocks[0].conv).__name__ == "ConvReLU2d" and "quantized" in quantized_modules(model)
    assert accuracy(model, IMAGES) == pytest.approx(int8_row["eval_accuracy_int8"], abs=1e-9)
    assert (tmp_path / "model_int8.pt").stat().st_size < 0.75 * (tmp_path / "model.safetensors").stat().st_size
    # model.safetensors: conv and BatchNorm under their own names again, loadable into the unfused cnn
    fresh = build_model("cnn", {"channels": [16, 32], "num_classes": 4})
    fresh.load_state_dict(load_weights(tmp_path))
    assert accuracy(fresh.eval(), IMAGES) == pytest.approx(float_row["eval_accuracy"], abs=0.03)


def test_dynamic_quant_export(tmp_path):
    float_row, int8_row = run(tmp_path, MLP, VECTORS, 150, {"dynamic_quant_export": True})
    assert abs(int8_row["eval_accuracy_dynamic_int8"] - float_row["eval_accuracy"]) <= 0.02
    model = load_quantized(tmp_path / "model_dynamic_int8.pt")
    assert type(model.head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert accuracy(model, VECTORS) == pytest.approx(int8_row["eval_accuracy_dynamic_int8"], abs=1e-9)
    size = (tmp_path / "model_dynamic_int8.pt").stat().st_size
    assert size < 0.75 * (tmp_path / "model.safetensors").stat().st_size
    assert not (tmp_path / "model_int8.pt").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]).keys() == int8_row.keys()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"strategy": {"name": "deepspeed"}}, "compress.qat needs strategy.name=ddp"),
        ({"train": {"compile": True}}, "train.compile"),
        ({"train": {"precision": "bf16"}}, "precision"),
        ({"compress": {"qat": True, "dynamic_quant_export": True}}, "dynamic_quant_export"),
    ],
)
def test_unsupported_combinations_are_start_up_errors(sections, message):
    raw = raw_config("x", MLP, VECTORS, 10, {"qat": True})
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=message):
        from_dict(raw)


def test_model_without_qat_fusion_is_a_user_error(tmp_path):
    raw = raw_config(tmp_path, {"name": "resnet", "widths": [4], "num_classes": 4}, IMAGES, 2, {"qat": True})
    with pytest.raises(UserError, match="does not declare qat_fusion"):
        train(from_dict(raw), SINGLE)


@pytest.mark.parametrize(
    "factory, data, reason",
    [
        ("residual", VECTORS, "Could not run 'aten::add"),
        ("embedding_lm", {"name": "synthetic_tokens", "vocab_size": 32, "seq_len": 8}, "Embedding quantization"),
    ],
)
def test_model_with_an_op_without_int8_kernel_is_refused_before_training(tmp_path, factory, data, reason):
    # it trained to the end, then its int8 export failed with NotImplementedError (and again on every restart)
    raw = raw_config(tmp_path, {"name": f"userpkg.residual:{factory}"}, data, 2, {"qat": True})
    with pytest.raises(UserError, match=f"int8 model of 'userpkg.residual:{factory}' cannot run \\({reason}"):
        train(from_dict(raw), SINGLE)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_pruning_and_qat_together_export_sparse_int8_weights(tmp_path):
    compress = {"qat": True, "prune": "unstructured", "prune_sparsity": 0.5, "prune_end_step": 40}
    compress.update(prune_every_steps=10, prune_exclude=["head"])
    float_row, int8_row = run(tmp_path, MLP, VECTORS, 80, compress)
    assert abs(int8_row["eval_accuracy_int8"] - float_row["eval_accuracy"]) <= 0.02
    model, weights = load_quantized(tmp_path / "model_int8.pt"), load_weights(tmp_path)
    for i, block in enumerate(model.blocks):
        pruned = weights[f"blocks.{i}.0.weight"] == 0
        assert pruned.sum().item() == round(0.5 * pruned.numel())  # the float export: exactly the target
        assert not block[0].weight().dequantize()[pruned].any()  # the masks survived quantization


def test_early_stopping_before_qat_starts_leaves_no_int8_model(tmp_path):
    # early stopping at step 4, before compress.qat_start_step: the int8 export of observers that never ran
    # failed (an AssertionError traceback, status 1), and so did every restart of the early-stopped run
    never = {"every_steps": 2, "early_stopping_patience": 1, "min_delta": 100.0}  # no evaluation improves
    raw = raw_config(tmp_path, MLP, VECTORS, 40, {"qat": True, "qat_start_step": 30}, eval=never)
    for _ in range(2):  # the run, then the same command again
        assert train(from_dict(raw), SINGLE) == {"status": "early_stopped", "step": 4}
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model_int8.pt").exists()
    assert not any(key.endswith("int8") for row in read_rows(tmp_path) for key in row)


def test_no_int8_model_after_early_stopping_is_said_by_rank_0_alone(tmp_path, monkeypatch):
    """Every rank exports, and each said the observers never saw a batch (8 lines per node at 8 ranks)."""
    import dist_train.compress as compress
    from dist_train.build import initial_model

    cfg = from_dict(raw_config(tmp_path, MLP, VECTORS, 40, {"qat": True, "qat_start_step": 30}))
    model = initial_model(cfg)
    compression = compress.Compression(cfg, model)
    said = []
    monkeypatch.setattr(compress.log, "warning", lambda message, *args: said.append(message % args))
    for rank in (1, 0):  # nothing to export: no collective is reached
        said.clear()
        ctx = DistContext(rank, rank, 2, 2, torch.device("cpu"), None, "single")
        compression.export(model, ctx, tmp_path, None, None, print)
        assert ["never saw a batch" in line for line in said] == ([True] if rank == 0 else [])


def test_pruning_a_batchnorm_that_qat_fuses_is_refused_and_excluded_by_its_own_name(tmp_path):
    # a pruned BatchNorm scale of 0 made torch's fused ConvBn divide its conv's output by zero: NaN after the
    # first mask update, then "zero_point must be between quant_min and quant_max" (status 1); and
    # prune_exclude matched only the fused name (blocks.0.conv.bn), not the one model.safetensors has
    compress = {"qat": True, "prune": "unstructured", "prune_end_step": 4, "prune_every_steps": 2}
    compress["prune_modules"] = ["Conv2d", "BatchNorm2d"]
    cnn = {**CNN, "channels": [8]}
    with pytest.raises(UserError, match="mask the BatchNorm blocks.0.norm.weight, which compress.qat fuses"):
        train(from_dict(raw_config(tmp_path / "refused", cnn, IMAGES, 8, compress)), SINGLE)
    compress["prune_exclude"] = ["blocks.*.norm"]
    train(from_dict(raw_config(tmp_path / "excluded", cnn, IMAGES, 8, compress)), SINGLE)
    weights = load_weights(tmp_path / "excluded")
    assert (weights["blocks.0.conv.weight"] == 0).sum().item() == round(0.5 * weights["blocks.0.conv.weight"].numel())
    assert not (weights["blocks.0.norm.weight"] == 0).any()


def _qat_two_ranks(rank, world, output_dir):
    from helpers import ctx_from_env

    raw = raw_config(output_dir, MLP, VECTORS, 60, {"qat": True})
    raw["train"]["micro_batch_size"] = 16
    train(from_dict(raw), ctx_from_env())


@pytest.mark.slow
def test_qat_at_two_ranks(tmp_path):
    from helpers import run_ranks

    run_ranks(_qat_two_ranks, 2, str(tmp_path))
    rows = read_rows(tmp_path)
    float_row = [r for r in rows if "eval_accuracy" in r][-1]
    int8_row = [r for r in rows if "eval_accuracy_int8" in r][-1]
    assert float_row["eval_accuracy"] > 0.7
    assert abs(int8_row["eval_accuracy_int8"] - float_row["eval_accuracy"]) <= 0.02
    model = load_quantized(tmp_path / "model_int8.pt")
    assert accuracy(model, VECTORS) == pytest.approx(int8_row["eval_accuracy_int8"], abs=1e-9)


class Crash(BaseException):
    pass


def test_qat_resume_is_exact(tmp_path, monkeypatch):
    sections = {"checkpoint": {"every_steps": 6}, "eval": {"every_steps": 6}}
    args = (CNN, IMAGES, 16, {"qat": True, "qat_start_step": 4, "prune": "structured", "prune_end_step": 8})
    args[3].update(prune_every_steps=2, prune_modules=["Conv2d"])
    run(tmp_path / "reference", *args, **sections)
    original = run_state.save

    def save_then_crash(cfg, ctx, control, strategy, state, *rest):
        original(cfg, ctx, control, strategy, state, *rest)
        if state.step == 6:  # observers running, masks mid-ramp
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(run_state, "save", save_then_crash)
        with pytest.raises(Crash):
            run(tmp_path / "resumed", *args, **sections)
    run(tmp_path / "resumed", *args, **sections)
    assert {"resumed_from": "step-00000006", "step": 6} in read_rows(tmp_path / "resumed")
    assert max_abs_diff(load_weights(tmp_path / "reference"), load_weights(tmp_path / "resumed")) == 0.0
    reference = torch.load(tmp_path / "reference/model_int8.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "resumed/model_int8.pt", weights_only=True)["state_dict"]
    assert reference.keys() == resumed.keys()
    for key in reference:  # observers resumed too: identical scales and int8 weights
        assert _plain(reference[key]) == _plain(resumed[key]), key


def _plain(value):
    """Quantized tensors, packed (weight, bias) tuples and scalars as comparable Python values."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.dequantize() if value.is_quantized else value
        return value.tolist()
    return value


def test_evaluation_leaves_the_qat_observers_alone(tmp_path):
    """Fake-quant observers run in eval mode too: evaluating must not move their ranges, so a run
    with evaluations trains, and exports, exactly what the same run without them does."""
    for name, eval_section in (("with", {"every_steps": 10, "at_end": True}), ("without", {"at_end": False})):
        train(from_dict(raw_config(tmp_path / name, MLP, VECTORS, 30, {"qat": True}, eval=eval_section)), SINGLE)
    assert max_abs_diff(load_weights(tmp_path / "with"), load_weights(tmp_path / "without")) == 0.0
    with_int8 = torch.load(tmp_path / "with" / "model_int8.pt", weights_only=True)["state_dict"]
    without_int8 = torch.load(tmp_path / "without" / "model_int8.pt", weights_only=True)["state_dict"]
    assert with_int8.keys() == without_int8.keys()
    for key, value in with_int8.items():
        other = without_int8[key]
        if isinstance(value, torch.Tensor) and value.is_quantized:
            assert torch.equal(value.int_repr(), other.int_repr()) and value.q_scale() == other.q_scale(), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key


def test_dynamic_export_of_a_recurrent_model_loads_with_weights_only(tmp_path):
    model = {"name": "rnn_classifier", "vocab_size": 16, "num_classes": 2, "embed_dim": 8, "hidden_dim": 8}
    data = {"name": "synthetic_sequences", "vocab_size": 16, "num_classes": 2, "max_len": 8, "num_samples": 128}
    train(from_dict(raw_config(tmp_path, model, data, 3, {"dynamic_quant_export": True})), SINGLE)
    payload = torch.load(tmp_path / "model_dynamic_int8.pt", weights_only=True)  # refused ScriptObjects before
    assert payload["kind"] == "dynamic"
    loaded = load_quantized(tmp_path / "model_dynamic_int8.pt")
    assert type(loaded.head).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_a_qat_fusion_group_torch_cannot_fuse_is_a_user_error(tmp_path):
    raw = raw_config(tmp_path, {"name": "userpkg.unfusable:unfusable"}, VECTORS, 2, {"qat": True})
    # torch's AssertionError ("did not find fuser method") was a traceback
    with pytest.raises(UserError, match=r"group \['fc', 'act'\] \(Linear, GELU\) cannot be fused"):
        train(from_dict(raw), SINGLE)
