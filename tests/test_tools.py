"""Operator tools: `dist-train check` (report, warnings, memory vs a real DDP run), `doctor` (alone and
on 2 torchrun ranks), `verify` (passes, and fails with dropout), metrics.png and TensorBoard events."""

import json
import re

import pytest
import torch
from helpers import (
    PYTHON,
    as_plain_user,
    ctx_from_env,
    free_port,
    launch,
    read_rows,
    run_cli,
    run_ranks,
    tiny_lm_config,
    write_config,
)

from dist_train import checkpoint as ckpt
from dist_train.cli import main
from dist_train.config import from_dict
from dist_train.optim import lr_at
from dist_train.state import training_config


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys, config_path, *argv):
    code, out, err = run_main(capsys, "check", str(config_path), "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def resnet_config(output_dir, **sections):
    config = {
        "run": {"output_dir": str(output_dir)},
        "model": {"name": "resnet", "widths": [8, 16], "num_classes": 10},
        "data": {"name": "synthetic_images", "num_samples": 100, "image_size": 8},
        "train": {"micro_batch_size": 4, "max_steps": 20},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


# --- check ------------------------------------------------------------------------------------------------


def test_check_reports_batch_steps_schedule_and_model_state_formulas(tmp_path, capsys):
    raw = tiny_lm_config(tmp_path / "run", schedule={"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1})
    path = write_config(tmp_path / "c.yaml", raw)
    report = check_json(capsys, path, "--world-size", "2", "train.max_steps=40")
    cfg = from_dict(raw | {"train": raw["train"] | {"max_steps": 40}})
    assert report["batch"] == {"micro_batch_size": 4, "grad_accum_steps": 2, "global_batch": 16, "tokens_per_step": 256}
    assert report["steps"]["steps_per_epoch"] == 512 // 16 and report["steps"]["total"] == 40
    assert report["steps"]["epochs"] == pytest.approx(40 / 32) and report["steps"]["dropped_per_epoch"] == 0
    points = {p["step"]: p["lr"] for p in report["lr_schedule"]["points"]}
    assert set(points) >= {1, 3, 20, 40}
    assert all(lr == pytest.approx(lr_at(cfg, step - 1)) for step, lr in points.items())
    assert points[3] == pytest.approx(1e-3) and points[40] == pytest.approx(1e-4)
    from dist_train.models import build_model

    psi = sum(p.numel() for p in build_model(cfg.model.name, cfg.model.kwargs).parameters())
    assert report["model"]["parameters"] == psi  # tied embedding counted once
    mem = report["memory"]["per_rank"]
    # fp32 Adam: params 4, grads 4, moments 8 bytes per parameter; N = 2
    assert [mem["ddp"][k] for k in ("params", "grads", "optimizer")] == [4 * psi, 4 * psi, 8 * psi]
    assert mem["zero1"]["total"] == 8 * psi + 6 * psi  # ZeRO adds its fp32 master copy: 12 bytes / N
    assert mem["zero2"]["total"] == 4 * psi + 8 * psi
    # ZeRO-3 also keeps each parameter of at most 1e5 elements whole on every rank: all of the tiny LM's
    assert mem["zero3"]["total"] == 10 * psi + 4 * psi and mem["fsdp"]["total"] == 8 * psi
    assert report["memory"]["configured"] == "ddp" and report["memory"]["activations"] > 0
    assert report["deepspeed_config"] is None and report["warnings"] == []


def test_check_step_schedule_points_are_where_the_lr_drops(tmp_path, capsys):
    schedule = {"name": "step", "warmup_steps": 2, "step_size": 3, "gamma": 0.5}
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", schedule=schedule))
    points = {p["step"]: p["lr"] for p in check_json(capsys, path)["lr_schedule"]["points"]}
    assert points[2] == pytest.approx(1e-3) and points[6] == pytest.approx(5e-4) and points[9] == pytest.approx(2.5e-4)
    assert points[5] == pytest.approx(1e-3) and max(points) == 10  # step 5 still trains at the peak


@pytest.mark.parametrize("warmup, warns", [(10, False), (11, True)])
def test_check_warns_of_a_warm_up_longer_than_the_run_only(tmp_path, capsys, warmup, warns):
    """Step k (from 1) trains at lr x k / warmup_steps: a warm-up as long as the run ends at train.lr."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", schedule={"warmup_steps": warmup}))
    report = check_json(capsys, path)
    assert (report["lr_schedule"]["points"][-1]["lr"] == pytest.approx(1e-3)) is not warns
    assert any("never reaches train.lr" in w for w in report["warnings"]) is warns


def test_check_warns_of_a_warm_up_longer_than_a_run_that_train_epochs_ends(tmp_path, capsys):
    """40 samples, global batch 8, train.epochs=1: the run is 5 steps, a warm-up of 6 never ends (it
    was compared with train.max_steps=10 only: no warning)."""
    raw = tiny_lm_config(tmp_path / "run", schedule={"warmup_steps": 6}, train={"epochs": 1})
    raw["data"]["num_samples"] = 40
    report = check_json(capsys, write_config(tmp_path / "c.yaml", raw))
    assert report["steps"]["total"] == 5 and report["lr_schedule"]["points"][-1]["lr"] < 1e-3
    assert any("(6) > the run's 5 steps" in w and "never reaches train.lr" in w for w in report["warnings"])


def test_check_multistep_points_are_at_the_milestones(tmp_path, capsys):
    schedule = {"name": "multistep", "warmup_steps": 0, "milestones": [4, 7, 30], "gamma": 0.1}
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", schedule=schedule))
    points = {p["step"]: p["lr"] for p in check_json(capsys, path)["lr_schedule"]["points"]}
    assert points[4] == pytest.approx(1e-3) and points[5] == pytest.approx(1e-4)
    assert points[7] == pytest.approx(1e-4) and points[8] == pytest.approx(1e-5)
    assert max(points) == 10  # a milestone past the last step adds nothing


def test_check_zero3_row_counts_the_parameters_deepspeed_keeps_whole_on_every_rank(tmp_path, capsys):
    """DeepSpeed's ZeRO-3 gathers each parameter of at most stage3_param_persistence_threshold (1e5)
    elements once and never releases it: check showed 4 bytes / N for all of them (a 1.67 MiB model's
    ZeRO-3 parameters at 214 KiB per rank on 8 ranks, where DeepSpeed holds 1.61 MiB)."""
    raw = tiny_lm_config(tmp_path / "run")
    raw["model"] |= {"vocab_size": 4096}  # the tied embedding: 4096 x 32 = 131,072 elements, partitioned
    raw["data"] |= {"vocab_size": 4096}
    path = write_config(tmp_path / "c.yaml", raw)
    report = check_json(capsys, path, "--world-size", "4")
    from dist_train.models import build_model

    kwargs = {k: v for k, v in raw["model"].items() if k != "name"}
    sizes = [p.numel() for p in build_model("transformer_lm", kwargs).parameters()]
    psi = report["model"]["parameters"]
    assert sum(sizes) == psi and max(sizes) == 4096 * 32
    assert report["memory"]["per_rank"]["zero3"]["params"] == psi + 4 * (psi - 4096 * 32)
    for passed in (0, 32, 10**6):  # strategy.deepspeed_config's threshold: none whole, the norms only, all
        zero = {"zero_optimization": {"stage3_param_persistence_threshold": passed}}
        args = ("strategy.name=deepspeed", "strategy.zero_stage=3", f"strategy.deepspeed_config={json.dumps(zero)}")
        mem = check_json(capsys, path, "--world-size", "4", *args)["memory"]["per_rank"]["zero3"]
        assert mem["params"] == psi + 4 * sum(n for n in sizes if n <= passed), passed
    assert 0 < sum(n for n in sizes if n <= 32) < psi - 4096 * 32


def test_check_mixed_precision_uses_the_zero_paper_split(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", train={"precision": "fp16"}))
    report = check_json(capsys, path, "--world-size", "4")
    psi = report["model"]["trainable_parameters"]
    mem = report["memory"]["per_rank"]
    assert mem["ddp"]["total"] == 16 * psi
    assert mem["zero1"]["total"] == 4 * psi + 12 * psi // 4
    assert mem["zero2"]["total"] == 2 * psi + 14 * psi // 4
    assert mem["zero2"]["params"] == 2 * psi
    assert mem["zero3"]["total"] == 16 * psi // 4 + 2 * psi  # + its 2-byte weights, all whole (<= 1e5 each)
    assert "mixed-precision" in report["memory"]["precision_note"]
    # bf16 is autocast over fp32 weights under every strategy, DeepSpeed included: no 2-byte split
    bf16 = check_json(capsys, path, "--world-size", "4", "train.precision=bf16")["memory"]
    assert bf16["per_rank"]["zero2"]["params"] == 4 * psi and "mixed-precision" not in bf16["precision_note"]


def frozen_body_config(output_dir):
    return {
        "run": {"output_dir": str(output_dir)},
        "model": {"name": "userpkg.broken:model_half_frozen"},
        "data": {"name": "userpkg.edges:vectors"},
        "train": {"micro_batch_size": 4, "max_steps": 4},
    }


def test_check_counts_frozen_weights_in_the_params_column_only(tmp_path, capsys):
    """Frozen weights are held (params) but get no gradient or optimizer state: the params column
    counted only the trainable ones."""
    report = check_json(capsys, write_config(tmp_path / "c.yaml", frozen_body_config(tmp_path / "run")))
    numel, trainable = report["model"]["parameters"], report["model"]["trainable_parameters"]
    assert (numel, trainable) == (32 * 64 + 64 + 64 * 2 + 2, 64 * 2 + 2)
    mem = report["memory"]["per_rank"]
    assert [mem["ddp"][k] for k in ("params", "grads", "optimizer")] == [4 * numel, 4 * trainable, 8 * trainable]
    assert mem["fsdp"]["params"] == 4 * numel and mem["zero1"]["optimizer"] == 12 * trainable


def test_check_activation_estimate_scales_with_batch_and_checkpointing(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", model={"n_layers": 8}))
    acts = {
        name: check_json(capsys, path, *argv)["memory"]["activations"]
        for name, argv in {
            "b4": ["train.micro_batch_size=4"],
            "b8": ["train.micro_batch_size=8"],
            "ckpt": ["train.micro_batch_size=4", "train.grad_checkpointing=true"],
            "bf16": ["train.micro_batch_size=4", "train.precision=bf16"],
        }.items()
    }
    assert acts["b8"] == pytest.approx(2 * acts["b4"], rel=0.05)
    assert acts["ckpt"] < 0.3 * acts["b4"]  # 8 blocks: their inputs plus one block recomputed
    assert 0.4 * acts["b4"] < acts["bf16"] < 0.8 * acts["b4"]


def test_check_text_report_and_config_flag(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    code, out, _ = run_main(capsys, "check", "--config", str(path), "train.micro_batch_size=8", "--world-size", "2")
    assert code == 0
    assert re.search(r"global batch:\s+32 samples \(512 tokens\)", out)
    assert re.search(r"steps:\s+10 \(16 steps per epoch -> 0\.62 epochs", out)
    for label in ("DDP *", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP"):
        assert re.search(rf"^\s+{re.escape(label)}\s+[\d.]+ KiB", out, re.M), label
    assert "DeepSpeed config: n/a (strategy.name=ddp)" in out and "No warnings." in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.micro_batch_size=0"], "`train.micro_batch_size` must be > 0"),
        (["train.micro_batch_size=400"], "is larger than the train split"),
        # 1 x 1 x 8 ranks on 4 samples: lowering the micro-batch or accumulation, all it said, cannot help
        (
            ["--world-size", "8", "data.num_samples=4", "train.micro_batch_size=1", "train.grad_accum_steps=1"],
            "or train.grad_accum_steps, or run on at most 4 ranks",
        ),
        (["eval.every_steps=5", "data.eval_samples=0"], "eval.every_steps set, but dataset 'synthetic_tokens' has no"),
        (
            ["eval.every_steps=5", "data.eval_samples=0"],
            "(data.eval_samples for the synthetic datasets), or set eval.every_steps=null",
        ),
        (["--world-size", "0"], "--world-size must be >= 1"),
        (["compress.prune=unstructured", "compress.prune_modules=[Linearr]"], "'Linearr' is not a torch.nn module"),
        (["compress.prune=structured", "compress.prune_dim=2"], "blocks.0.attn.qkv.weight has only 2 dimensions"),
        (["compress.qat=true"], "model TransformerLM does not declare qat_fusion()"),
        (["compress.prune=unstructured", "compress.prune_modules=[Conv2d]"], "no module of type Conv2d to prune"),
        # the run's own refusal of a run.output_dir it cannot create (check said "No warnings")
        (["run.output_dir={config}"], "run.output_dir {config}: cannot create it (File exists); choose another"),
        (["run.output_dir={config}/run"], "cannot create it (Not a directory); choose another"),
    ],
)
def test_check_exits_2_on_an_invalid_config(tmp_path, capsys, argv, message):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    code, out, err = run_main(capsys, "check", str(path), *(arg.format(config=path) for arg in argv))
    assert code == 2 and out == ""
    message = message.format(config=path)
    assert err.startswith("dist_train: error:") and message in err and len(err.strip().splitlines()) == 1


def test_check_exits_2_on_eval_items_the_run_cannot_batch(tmp_path, capsys):
    """An eval split whose items cannot be stacked into one eval micro-batch: the run refuses it as it
    starts (status 2, tests/test_loop_edges.py), check said 'No warnings' and exited 0."""
    raw = tiny_lm_config(tmp_path / "run")
    raw.update(model={"name": "torch.nn:Linear", "in_features": 1, "out_features": 1}, eval={"micro_batch_size": 2})
    raw["data"] = {"name": "userpkg.edges:varying_series", "eval_n": 8}
    raw["train"].update(micro_batch_size=1, loss="mse")
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and out == "", err
    assert err.startswith("dist_train: error: the eval split's items cannot be batched: the first eval batch's")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy", [{"name": "fsdp"}, {"name": "deepspeed", "zero_stage": 2}])
def test_check_exits_2_on_parameters_of_several_dtypes_under_sharding(tmp_path, capsys, strategy):
    """An fp64 parameter among fp32 ones: FSDP2's and ZeRO's set-up refuse it (status 2), check said
    'No warnings' and exited 0."""
    raw = tiny_lm_config(tmp_path / "run")
    raw.update(model={"name": "userpkg.buffers:float64_scale"}, data={"name": "synthetic_vectors"}, strategy=strategy)
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and out == "", err
    assert f"strategy.name={strategy['name']} needs the model's parameters in one floating dtype" in err
    assert len(err.strip().splitlines()) == 1


def test_check_exits_2_on_a_batchnorm_subclass_train_sync_batchnorm_cannot_convert(tmp_path, capsys):
    """A BatchNorm subclass with its own forward under train.sync_batchnorm: the run refuses it as it
    builds (status 2), check said 'No warnings' and exited 0."""
    raw = tiny_lm_config(tmp_path / "run")
    raw.update(model={"name": "userpkg.buffers:clamped_batchnorm"}, data={"name": "synthetic_vectors"})
    raw["train"]["sync_batchnorm"] = True
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and out == "", err
    assert err.startswith("dist_train: error: train.sync_batchnorm replaces 1 (ClampedBatchNorm, a subclass of")
    assert len(err.strip().splitlines()) == 1


def test_check_exits_2_on_a_folder_in_the_way_of_a_file_the_run_writes(tmp_path, capsys):
    """As the run refuses it (check said 'No warnings')."""
    (tmp_path / "run" / "model.safetensors").mkdir(parents=True)
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    code, out, err = run_main(capsys, "check", str(path))
    assert code == 2 and err.strip().splitlines() == [
        f"dist_train: error: run.output_dir {tmp_path / 'run'}: model.safetensors is a folder, where the run keeps "
        "its file of that name; move it away or choose another run.output_dir"
    ]


def test_check_exits_2_on_an_output_dir_inside_a_checkpoint_folder(tmp_path, capsys):
    """As the run refuses it: its files would damage that checkpoint (check said 'No warnings')."""
    step = tmp_path / "old" / "checkpoints" / "step-00000004"
    (step / "deepspeed").mkdir(parents=True)
    (step / ckpt.MANIFEST).write_text("{}")
    for out in (step, step / "deepspeed", step / "new"):
        path = write_config(tmp_path / "c.yaml", tiny_lm_config(out))
        code, _, err = run_main(capsys, "check", str(path))
        where = "is" if out == step else "lies inside"
        assert code == 2 and err.startswith(
            f"dist_train: error: run.output_dir {out} {where} the checkpoint folder {step}:"
        )
    assert not (step / "new").exists()


def test_check_and_doctor_on_an_output_dir_this_user_may_not_enter(tmp_path):
    """run.output_dir inside (or being) another user's folder (mode 700): the run says one line, status 2;
    check and doctor's disk line raised PermissionError from Path.exists (a traceback, status 1)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(locked / "run"))
    locked.chmod(0)
    try:
        for out, what in ((locked / "run", "create"), (locked, "write in")):
            cmd = [*as_plain_user(), PYTHON, "-m", "dist_train", "check", str(path), f"run.output_dir={out}"]
            proc = run_cli(cmd, timeout=120)
            assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
                f"dist_train: error: run.output_dir {out}: cannot {what} it (Permission denied); choose another"
            ], proc.stderr[-2000:]
        cmd = [*as_plain_user(), PYTHON, "-m", "dist_train", "doctor", "--output-dir", str(locked / "run"), "--json"]
        proc = run_cli(cmd, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["disk"]["measured_at"] == str(locked)
    finally:
        locked.chmod(0o755)


def test_check_exits_2_on_an_attention_preference_this_torch_cannot_set(tmp_path, capsys, monkeypatch):
    """train.sdpa_backend=cudnn on a torch without attention priorities (< 2.6, still supported) stops
    the run with exit 2: check said 'No warnings'."""
    import contextlib

    import torch.nn.attention

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", contextlib.contextmanager(lambda backends: (yield)))
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", train={"sdpa_backend": "cudnn"}))
    code, out, err = run_main(capsys, "check", str(path))
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("dist_train: error: train.sdpa_backend=cudnn needs torch >= 2.6"), err
    assert run_main(capsys, "check", str(path), "train.sdpa_backend=torch")[0] == 0


def test_check_exits_2_on_a_qat_model_the_run_refuses(tmp_path, capsys):
    config = resnet_config(tmp_path / "run", compress={"qat": True})
    config["model"], config["data"] = {"name": "userpkg.residual:residual"}, {"name": "synthetic_vectors"}
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", config)))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("dist_train: error: compress.qat: the int8 model of 'userpkg.residual:residual' cannot run")


def test_check_warns_about_batchnorm_fp16_and_a_dropped_tail(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", resnet_config(tmp_path / "run", train={"precision": "fp16"}))
    warnings = check_json(capsys, path, "--world-size", "2")["warnings"]
    assert any("BatchNorm" in w and "train.sync_batchnorm" in w for w in warnings)
    assert any("fp16" in w for w in warnings) == (not torch.cuda.is_available())
    assert any("does not divide the train split (100): the last 4 samples" in w for w in warnings)
    synced = check_json(capsys, path, "--world-size", "2", "train.sync_batchnorm=true", "train.micro_batch_size=5")
    assert not any("BatchNorm" in w or "divide" in w for w in synced["warnings"])


def _fake_checkpoint(run_dir, step, world_size, strategy, config_hash, trainer=None):
    folder = run_dir / "checkpoints" / ckpt.step_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    files = {"model.pt": {"size": 7, "sha256": ckpt.sha256_file(folder / "model.pt")}}
    manifest = {"step": step, "world_size": world_size, "strategy": strategy, "config_hash": config_hash}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest | {"trainer": trainer or {}, "files": files}))
    (run_dir / "checkpoints" / "latest").write_text(folder.name + "\n")


def test_check_warns_about_a_checkpoint_from_another_run(tmp_path, capsys):
    raw = tiny_lm_config(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", raw)
    _fake_checkpoint(tmp_path / "run", 4, world_size=4, strategy="ddp", config_hash="0123456789abcdef")
    warnings = check_json(capsys, path, "--world-size", "2")["warnings"]
    assert len(warnings) == 2
    assert "written at world size 4, at world size 2: DDP continues" in warnings[0]
    assert "config hash differs" in warnings[1]
    # a ZeRO checkpoint of 4 ranks at 2: the run stops with status 2; check said "DDP continues with fresh RNG
    # streams (not bit-exact); sharded strategies that cannot reshard stop with an error"
    zero = tmp_path / "zero"
    _fake_checkpoint(zero, 4, world_size=4, strategy="deepspeed", config_hash="0123456789abcdef")
    overrides = ("strategy.name=deepspeed", f"checkpoint.resume={zero}")
    warning = check_json(capsys, path, "--world-size", "2", *overrides)["warnings"][1]  # [0]: run's step 4 set aside
    assert warning.endswith(
        "DeepSpeed cannot reshard its ZeRO partitions, so it will stop with an error (resume at world size 4)"
    )

    same_hash = ckpt.config_hash(training_config(from_dict(raw)))
    other = tmp_path / "other"
    _fake_checkpoint(other, 12, world_size=2, strategy="fsdp", config_hash=same_hash)
    warnings = check_json(capsys, path, "--world-size", "2", f"checkpoint.resume={other}")["warnings"][1:]
    assert len(warnings) == 2
    assert "strategy 'fsdp'" in warnings[0] and "will stop with an error" in warnings[0]
    assert "at step 12 >= 10: the run has nothing left to do" in warnings[1]
    code, _, err = run_main(capsys, "check", str(path), f"checkpoint.resume={tmp_path / 'missing'}")
    assert code == 2 and "does not exist" in err
    # paths the run refuses (exit 2) are refused by check too, in the run's words (check said "No warnings")
    (other / "checkpoints" / "step-00000012" / "model.pt").write_bytes(b"trunc")
    for resume, message in (
        (path, "is neither a checkpoint folder nor a run folder with checkpoints/latest"),
        (other, "step-00000012: file model.pt has 5 bytes, manifest says 7"),
    ):
        code, out, err = run_main(capsys, "check", str(path), f"checkpoint.resume={resume}")
        assert code == 2 and out == "" and message in err and len(err.splitlines()) == 1, err


def test_check_names_the_checkpoints_a_run_sets_aside(tmp_path, capsys):
    """A rewind by path to step 4 of a run that saved 4, 8 and 12 sets 8 and 12 aside; a fresh start
    (resume=never) sets aside all three; a plain resume of the newest, none (check said nothing, or that
    the checkpoints "mix")."""
    raw = tiny_lm_config(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", raw)
    same_hash = ckpt.config_hash(training_config(from_dict(raw)))
    for step in (4, 8, 12):
        _fake_checkpoint(tmp_path / "run", step, world_size=1, strategy="ddp", config_hash=same_hash)
    root = tmp_path / "run" / "checkpoints"
    for resume, names in (
        (
            root / "step-00000004",
            "2 checkpoint(s) in " + str(root) + " that this run does not continue (step-00000008, step-00000012)",
        ),
        (
            "never",
            "3 checkpoint(s) in "
            + str(root)
            + " that this run does not continue (step-00000004, step-00000008, step-00000012)",
        ),
    ):
        warnings = check_json(capsys, path, "--world-size", "1", f"checkpoint.resume={resume}")["warnings"]
        assert [w for w in warnings if "set aside" in w] == [
            names + " are set aside once its first step ran, as .abandoned-<name>-<pid>: kept, not counted by "
            "checkpoint.keep_last, never resumed by auto; delete them when no longer needed"
        ], warnings
    assert not [w for w in check_json(capsys, path, "--world-size", "1")["warnings"] if "set aside" in w]
    # a set-aside folder resumed by path is another trajectory: check raised AttributeError (no step-N name)
    (root / "step-00000008").rename(root / ".abandoned-step-00000008-1")
    warnings = check_json(capsys, path, "--world-size", "1", f"checkpoint.resume={root}/.abandoned-step-00000008-1")
    assert "2 checkpoint(s) in " + str(root) + " that this run does not continue (step-00000004, step-00000012)" in (
        " ".join(warnings["warnings"])
    )
    # a link to a step folder (`best`) is that step: only the later ones go (check raised AttributeError)
    (root / "best").symlink_to("step-00000004")
    warnings = check_json(capsys, path, "--world-size", "1", f"checkpoint.resume={root}/best")["warnings"]
    assert "1 checkpoint(s) in " + str(root) + " that this run does not continue (step-00000012)" in " ".join(warnings)


def test_check_warns_that_a_checkpoint_of_another_optimizer_stops_the_run(tmp_path, capsys):
    """An SGD checkpoint resumed by an AdamW config: the run stops with status 2 naming optim.name, while
    check said only 'config hash differs', as of a config the run resumes and trains on."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    _fake_checkpoint(tmp_path / "run", 4, world_size=1, strategy="ddp", config_hash="0123456789abcdef")
    manifest_path = tmp_path / "run" / "checkpoints" / "step-00000004" / ckpt.MANIFEST
    manifest_path.write_text(json.dumps(json.loads(manifest_path.read_text()) | {"optimizer": "sgd"}))
    warnings = check_json(capsys, path)["warnings"]
    assert any(
        "written with optim.name=sgd; this config uses adamw, so it will stop with an error" in w for w in warnings
    )
    assert not [w for w in check_json(capsys, path, "optim.name=sgd")["warnings"] if "optim.name" in w]


def test_check_says_where_train_epochs_ends_a_run_resumed_at_another_global_batch(tmp_path, capsys):
    """40 samples, 5 steps at global batch 4 (20 samples into epoch 0), resumed at global batch 8 with
    train.epochs=2: the run trains to step 5 + 2 + 5 = 12; check's step count (10, from scratch) said
    nothing of it."""
    raw = tiny_lm_config(tmp_path / "run", train={"epochs": 2, "max_steps": 100, "grad_accum_steps": 1})
    raw["data"]["num_samples"] = 40
    path = write_config(tmp_path / "c.yaml", raw)
    same_hash = ckpt.config_hash(training_config(from_dict(raw)))
    trainer = {"step": 5, "epoch": 0, "samples_in_epoch": 20}
    _fake_checkpoint(tmp_path / "run", 5, world_size=1, strategy="ddp", config_hash=same_hash, trainer=trainer)
    report = check_json(capsys, path, "--world-size", "2")
    assert report["steps"]["total"] == 10
    assert [
        w for w in report["warnings"] if "counted on from where it left the data ends the run at step 12, not 10" in w
    ]
    assert not [w for w in check_json(capsys, path)["warnings"] if "counted on" in w]  # 5 + 5 + 10 = 20 either way


@pytest.mark.parametrize("manifest", ["[1]", '{"step": "x", "trainer": 5}', "{"])
def test_check_warns_of_a_damaged_checkpoint_the_run_skips_and_of_the_one_it_falls_back_to(tmp_path, capsys, manifest):
    """A manifest in `latest` that is JSON but no dist_train manifest (edited, foreign): the run skips it and
    resumes the older one; check raised AttributeError/TypeError (a traceback, status 1)."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    _fake_checkpoint(tmp_path / "run", 2, world_size=4, strategy="ddp", config_hash="0123456789abcdef")
    _fake_checkpoint(tmp_path / "run", 4, world_size=2, strategy="ddp", config_hash="0123456789abcdef")
    damaged = tmp_path / "run" / "checkpoints" / "step-00000004"
    (damaged / ckpt.MANIFEST).write_text(manifest)
    warnings = check_json(capsys, path, "--world-size", "2")["warnings"]
    assert len(warnings) == 4, warnings
    assert warnings[0].startswith(f"the run will skip the damaged checkpoint {damaged} (")
    assert warnings[1].startswith(
        f"1 checkpoint(s) in {damaged.parent} that this run does not continue (step-00000004)"
    )
    assert "step-00000002, written at world size 4" in warnings[2] and "config hash differs" in warnings[3]
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.pt").write_bytes(b"trunc")
    warnings = check_json(capsys, path, "--world-size", "2")["warnings"]
    assert len(warnings) == 4 and "model.pt has 5 bytes" in warnings[1], warnings
    assert (
        warnings[2] == f"no intact checkpoint left in {tmp_path / 'run' / 'checkpoints'}: the run starts from scratch"
    )
    assert warnings[3].startswith(f"2 checkpoint(s) in {damaged.parent} that this run does not continue")


def test_a_resume_with_loader_shuffle_flipped_is_another_training_config(tmp_path, capsys):
    """loader.shuffle was not in the config hash: a run resumed mid-epoch with it flipped read the rest of
    the epoch in another order (37 distinct samples of 48, some twice) without a warning, in the run or
    here. Loader settings that keep the order (workers) keep the hash."""
    raw = tiny_lm_config(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", raw)
    _fake_checkpoint(
        tmp_path / "run", 4, world_size=1, strategy="ddp", config_hash=ckpt.config_hash(training_config(from_dict(raw)))
    )
    assert check_json(capsys, path)["warnings"] == []
    assert check_json(capsys, path, "loader.num_workers=2")["warnings"] == []
    warnings = check_json(capsys, path, "loader.shuffle=false")["warnings"]
    assert len(warnings) == 1 and "config hash differs" in warnings[0]


def test_check_warns_that_a_resume_mid_epoch_at_a_world_size_that_cannot_split_it_stops(tmp_path, capsys):
    """A checkpoint 12 samples into an epoch (1 rank x 4 x 3 steps): the run at world size 8 stops with
    status 2; check said 'DDP continues with fresh RNG streams' and exited 0 as if it would train."""
    raw = tiny_lm_config(tmp_path / "run", train={"micro_batch_size": 4, "grad_accum_steps": 1})
    path = write_config(tmp_path / "c.yaml", raw)
    same = ckpt.config_hash(training_config(from_dict(raw)))
    trainer = {"step": 3, "epoch": 0, "samples_in_epoch": 12}
    _fake_checkpoint(tmp_path / "run", 3, world_size=1, strategy="ddp", config_hash=same, trainer=trainer)
    (warning,) = check_json(capsys, path, "--world-size", "8")["warnings"]
    assert "12 samples into an epoch, which world size 8 cannot split evenly, so it will stop with an error" in warning
    assert "resume at world size 1" in warning
    (warning,) = check_json(capsys, path, "--world-size", "2")["warnings"]  # 12 splits in 2: the run goes on
    assert "written at world size 1, at world size 2: DDP continues" in warning


def test_check_deepspeed_section(tmp_path):
    from dist_train.tools.check import deepspeed_json

    cfg = from_dict(tiny_lm_config(tmp_path, strategy={"name": "deepspeed", "zero_stage": 2}))
    config, note = deepspeed_json(cfg, 2)
    try:
        from dist_train.strategies.deepspeed import deepspeed_config
    except ImportError:
        assert config is None and note.startswith("n/a")
    else:
        assert config == deepspeed_config(cfg, 2) and isinstance(config, dict)
    assert deepspeed_json(from_dict(tiny_lm_config(tmp_path)), 2) == (None, "n/a (strategy.name=ddp)")


def test_check_exits_2_on_a_deepspeed_config_value_its_schema_refuses(tmp_path, capsys):
    """The run stops on a strategy.deepspeed_config value DeepSpeed's schema refuses (exit 2, one line):
    check said 'No warnings' (exit 0). A valid passthrough still passes, its JSON report unspoilt."""
    pytest.importorskip("deepspeed")
    capsys.readouterr()  # DeepSpeed's import warning (stdout) is not check's output
    for value, code in (("maybe", 2), ("tag", 2), (True, 0)):
        passthrough = {"zero_optimization": {"overlap_comm": value}}
        if value == "tag":  # not the schema's: an error of DeepSpeed's own parser
            passthrough = {"checkpoint": {"tag_validation": "bogus"}}
        strategy = {"name": "deepspeed", "zero_stage": 1, "deepspeed_config": passthrough}
        path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run", strategy=strategy))
        if code == 0:
            assert check_json(capsys, path, "--world-size", "2")["deepspeed_config"]["zero_optimization"] == {
                "stage": 1,
                "overlap_comm": True,
            }
            continue
        returned, out, err = run_main(capsys, "check", str(path))
        assert returned == 2 and out == "", err
        assert err == (
            "dist_train: error: strategy.deepspeed_config: DeepSpeed's DeepSpeedZeroConfig refuses it: overlap_comm: "
            "Input should be a valid boolean, unable to interpret input (got 'maybe')\n"
            if value == "maybe"
            else "dist_train: error: strategy.deepspeed_config: DeepSpeed refuses it (DeepSpeedConfigError: Checkpoint "
            "config contains invalid tag_validation value of BOGUS, expecting one of ['WARN', 'IGNORE', 'FAIL']); fix "
            "or drop the value\n"
        )


def _after_one_real_step(raw: dict, keep_grads: bool = False):
    """The strategy of `raw`, built as trainer.train builds it, after one real optimizer step (in a rank
    of run_ranks); `keep_grads` leaves the gradients in place to count them."""
    from dist_train.data import build_train_data
    from dist_train.losses import build_loss
    from dist_train.models import build_model
    from dist_train.rng import seed_everything
    from dist_train.strategies import build_strategy
    from dist_train.trainer import train_step
    from dist_train.transforms import apply_transforms

    cfg, ctx = from_dict(raw), ctx_from_env()
    seed_everything(cfg.run.seed)
    strategy = build_strategy(cfg, ctx)
    strategy.setup(apply_transforms(build_model(cfg.model.name, cfg.model.kwargs), cfg, ctx))
    if keep_grads:
        strategy.optimizer.zero_grad = lambda set_to_none=True: None
    batches = build_train_data(cfg, ctx).epoch_batches(0, 0)
    micro_batches = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
    train_step(strategy, build_loss(cfg.train.loss), micro_batches, cfg, ctx)
    return strategy


def _measured_model_state_bytes(rank, world, raws):
    """Bytes of parameters, .grad and optimizer state after one real optimizer step (as trainer.train builds them)."""
    measured = []
    for raw in raws:
        strategy = _after_one_real_step(raw, keep_grads=True)
        params = list(strategy.module.parameters())
        optimizer_state = [t for s in strategy.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        measured.append(
            {
                "params": sum(p.nbytes for p in params),
                "grads": sum(p.grad.nbytes for p in params if p.grad is not None),
                "optimizer": sum(t.nbytes for t in optimizer_state),
            }
        )
    return measured


@pytest.mark.slow
def test_check_memory_matches_a_real_two_rank_ddp_run(tmp_path, capsys):
    raws = [
        tiny_lm_config(tmp_path / "lm"),  # AdamW, tied embeddings
        tiny_lm_config(tmp_path / "lm16", train={"precision": "bf16"}),  # autocast keeps fp32 states under DDP
        resnet_config(tmp_path / "rn", optim={"name": "sgd", "momentum": 0.9}, train={"sync_batchnorm": True}),
        frozen_body_config(tmp_path / "frozen"),  # frozen weights: held, without grads or optimizer state
    ]
    measured = run_ranks(_measured_model_state_bytes, 2, raws)
    assert measured[0] == measured[1]
    for raw, real in zip(raws, measured[0]):
        estimate = check_json(capsys, write_config(tmp_path / "c.yaml", raw), "--world-size", "2")
        ddp = estimate["memory"]["per_rank"]["ddp"]
        for key in ("params", "grads", "optimizer"):
            assert ddp[key] == pytest.approx(real[key], rel=0.10), (raw["model"]["name"], key, ddp[key], real[key])
        assert ddp["total"] == pytest.approx(sum(real.values()), rel=0.10)


def _measured_zero_state_bytes(rank, world, raws):
    """Bytes of the module's parameters and of the ZeRO optimizer (its fp32 master partitions and their
    state) after one real DeepSpeed step."""
    measured = []
    for raw in raws:
        strategy = _after_one_real_step(raw)
        zero = strategy.engine.optimizer
        inner = zero.optimizer  # the torch optimizer ZeRO steps on its fp32 partitions
        # ZeRO-3 hands its fp32 partitions to the torch optimizer's groups only while it steps
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or [
            p for group in inner.param_groups for p in group["params"]
        ]
        state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
        measured.append(
            {
                # ZeRO-3: a parameter's partition (ds_tensor) and, where DeepSpeed keeps it whole, its data
                "params": sum(p.nbytes + getattr(p, "ds_tensor", p[:0]).nbytes for p in strategy.module.parameters()),
                "optimizer": sum(t.nbytes for t in masters + state),
            }
        )
    return measured


@pytest.mark.slow
def test_check_zero_rows_match_a_real_two_rank_deepspeed_run(tmp_path, capsys):
    """bf16 runs ZeRO under torch autocast (fp32 weights), and ZeRO keeps an fp32 master partition
    even of fp32 weights: check said 2-byte params for bf16 and no master copy for fp32. ZeRO-3 keeps
    the tiny LM's parameters (each <= 1e5 elements) whole on every rank besides their partitions."""
    pytest.importorskip("deepspeed")
    capsys.readouterr()  # DeepSpeed's import warning (stdout) is not check's output
    raws = [
        tiny_lm_config(
            tmp_path / f"{precision}{stage}",
            strategy={"name": "deepspeed", "zero_stage": stage},
            train={"precision": precision, "grad_accum_steps": 1},
        )
        for precision, stage in (("bf16", 1), ("fp32", 2), ("fp32", 3))
    ]
    measured = run_ranks(_measured_zero_state_bytes, 2, raws)
    assert measured[0] == measured[1]
    for raw, real in zip(raws, measured[0]):
        estimate = check_json(capsys, write_config(tmp_path / "c.yaml", raw), "--world-size", "2")
        row = estimate["memory"]["per_rank"][estimate["memory"]["configured"]]
        for key in ("params", "optimizer"):
            assert row[key] == pytest.approx(real[key], rel=0.01), (raw["train"]["precision"], key, row[key], real[key])


@pytest.mark.slow
def test_check_checkpoint_bytes_match_a_real_zero2_checkpoint(tmp_path, capsys):
    """ZeRO-1/2 checkpoints hold the fp32 weights and the fp32 master partitions + moments (16 bytes per
    parameter with AdamW): check said 12, as for DDP."""
    pytest.importorskip("deepspeed")
    capsys.readouterr()  # DeepSpeed's import warning (stdout) is not check's output
    raw = tiny_lm_config(tmp_path / "run", strategy={"name": "deepspeed", "zero_stage": 2}, train={"max_steps": 1})
    proc = launch(raw, tmp_path, nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(1) / "deepspeed"
    written = sum(p.stat().st_size for p in folder.glob("*.pt"))
    estimate = check_json(capsys, write_config(tmp_path / "c.yaml", raw), "--world-size", "2")
    assert estimate["checkpoint_bytes"] == 16 * estimate["model"]["trainable_parameters"]
    assert estimate["checkpoint_bytes"] == pytest.approx(written, rel=0.1)


@pytest.mark.slow
def test_check_checkpoint_bytes_count_the_frozen_weights_a_zero3_checkpoint_holds(tmp_path, capsys):
    """ZeRO-3 saves frozen parameters as frozen_param_fragments beside the trainable ones' fp32 master
    partitions: check counted no weights at all at stage 3 (a frozen backbone's checkpoints: far too small)."""
    pytest.importorskip("deepspeed")
    capsys.readouterr()  # DeepSpeed's import warning (stdout) is not check's output
    raw = frozen_body_config(tmp_path / "run") | {"strategy": {"name": "deepspeed", "zero_stage": 3}}
    raw["train"] |= {"max_steps": 1}
    proc = launch(raw, tmp_path, nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(1) / "deepspeed"
    saved = 0
    for path in folder.glob("*.pt"):  # the tensors' bytes (each tiny file carries kilobytes of pickle)
        payload = torch.load(path, map_location="cpu", weights_only=False)
        saved += sum(t.nbytes for t in payload.get("frozen_param_fragments", {}).values())
        for group in payload.get("optimizer_state_dict", {}).get("fp32_flat_groups", []):
            saved += group.nbytes
        for state in payload.get("optimizer_state_dict", {}).get("optimizer_state_dict", {}).get("state", {}).values():
            saved += sum(t.nbytes for t in state.values() if torch.is_tensor(t) and t.dim())
    estimate = check_json(capsys, write_config(tmp_path / "c.yaml", raw), "--world-size", "2")
    frozen = estimate["model"]["parameters"] - estimate["model"]["trainable_parameters"]
    assert estimate["checkpoint_bytes"] == 4 * frozen + 12 * estimate["model"]["trainable_parameters"]
    assert estimate["checkpoint_bytes"] == pytest.approx(saved, rel=0.05)


# --- doctor -----------------------------------------------------------------------------------------------


def test_doctor_single_process(tmp_path, capsys):
    code, out, _ = run_main(capsys, "doctor", "--json", "--output-dir", str(tmp_path / "not-yet"))
    assert code == 0
    report = json.loads(out)
    assert report["world_size"] == 1 and report["allreduce"] == [] and report["problems"] == []
    assert report["versions"]["torch"] == torch.__version__
    assert report["disk"]["free"] > 0 and report["disk"]["path"].endswith("not-yet")
    assert report["disk"]["exists"] is False and report["disk"]["measured_at"] == str(tmp_path)
    assert report["matmul_flops"][0] > 0 and report["environment"]["launcher"] == "single"
    for bad in ("0", "-1", "nan", "inf", "1e308"):  # under torchrun 0 was every rank's TCPStore timeout traceback
        code, out, err = run_main(capsys, "doctor", "--timeout-s", bad)
        assert code == 2 and out == "" and err.startswith("dist_train: error: `--timeout-s` must be a number"), err


def test_doctor_whose_peers_never_join_fails_in_one_line(tmp_path):
    """Rank 0 of 2 started alone (its peer never came): doctor ended with init_distributed's JoinError
    traceback (status 1), where a training rank says the same in one line."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    cmd = [PYTHON, "-m", "dist_train", "doctor", "--timeout-s", "2", "--backend", "gloo", "--output-dir", str(tmp_path)]
    proc = run_cli(cmd, env={**env, "MASTER_PORT": str(free_port())}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("dist-train doctor:")]
    assert "rank 0 of 2: not every rank joined the process group within --timeout-s=2 s" in line


@pytest.mark.slow
def test_doctor_on_two_torchrun_ranks(tmp_path):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "-m", "dist_train", "doctor", "--max-bytes", "1048576", "--iters", "3"]
    proc = run_cli([*cmd, "--output-dir", str(tmp_path)], env={"GLOO_SOCKET_IFNAME": "lo"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("dist-train doctor: 2 rank(s), launcher torchrun") == 1  # only rank 0 prints
    assert re.search(r"torchrun: RANK=0 LOCAL_RANK=0 WORLD_SIZE=2", out)
    assert re.search(r"^\s+\S+\s+0-1\s+2\s+[\d.]+ [KMGT]iB\s+cpu$", out, re.M)  # both ranks on this host
    number = r"([\d.]+(?:e[+-]\d+)?)"
    rows = re.findall(rf"^\s+(\d+ [KM]B)\s+{number}\s+{number}\s+{number}\s+(\w+)$", out, re.M)
    assert [r[0] for r in rows] == ["1 KB", "4 KB", "16 KB", "64 KB", "256 KB", "1 MB"]
    for _, time_us, algbw, busbw, result in rows:
        assert float(time_us) > 0 and float(busbw) > 0 and result == "ok"
        assert float(busbw) == pytest.approx(float(algbw), rel=0.01, abs=2e-3)  # 2(n-1)/n = 1 for n = 2
    assert "No problems found." in out


# --- verify -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_passes_on_the_tiny_lm(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "unused"))
    proc = run_cli([PYTHON, "-m", "dist_train", "verify", str(path), "--steps", "6", "--json"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) == {"ranks", "accum", "resume"} and report["passed"]
    assert checks["ranks"]["tolerance"] == checks["accum"]["tolerance"] == 1e-5  # max(1e-5, 0.01 x lr 1e-3)
    assert checks["ranks"]["max_abs_diff"] <= 1e-5 and checks["accum"]["max_abs_diff"] <= 1e-5
    assert checks["resume"]["max_abs_diff"] == 0.0 and checks["resume"]["tolerance"] == 0.0
    assert report["runs"]["reference"]["micro_batch_size"] == 8 and report["runs"]["accum"]["grad_accum_steps"] == 4
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_verify_keeps_the_evaluations_a_plateau_schedule_reads(tmp_path):
    config = tiny_lm_config(
        tmp_path / "unused", schedule={"name": "plateau", "plateau_patience": 0}, eval={"every_steps": 1}
    )
    path = write_config(tmp_path / "c.yaml", config)
    proc = run_cli([PYTHON, "-m", "dist_train", "verify", str(path), "--steps", "4", "--checks", "accum", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["passed"]


@pytest.mark.slow
def test_verify_fails_with_dropout_and_explains_why(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "unused"))
    cmd = [PYTHON, "-m", "dist_train", "verify", str(path), "model.dropout=0.2", "--steps", "4"]
    work = tmp_path / "work #1"  # the runs' overrides are YAML: the folder was cut at the `#` (a traceback)
    proc = run_cli([*cmd, "--checks", "ranks,resume", "--work-dir", str(work)], timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    ranks = re.search(r"^\s+2 ranks vs 1 rank .*?\s([\d.e+-]+)\s+1e-05\s+FAIL$", proc.stdout, re.M)
    assert ranks and float(ranks.group(1)) > 1e-4, proc.stdout
    assert re.search(r"^\s+resume vs uninterrupted .*\s0\s+0 \(exact\)\s+pass$", proc.stdout, re.M), proc.stdout
    assert "the model uses dropout (p=0.2)" in proc.stdout and "model.dropout=0" in proc.stdout
    assert read_rows(work / "resumed")[0] == {"resumed_from": "step-00000002", "step": 2}


def test_verify_names_qat_observers_as_the_cause_of_a_parity_failure(tmp_path):
    """QAT's observers see each forward's micro-batch (2 ranks x 6 vs 1 x 12: weights 4e-2 apart)."""
    from dist_train.tools.verify import explain, model_traits

    config = {
        "run": {"output_dir": str(tmp_path / "unused")},
        "model": {"name": "mlp", "input_dim": 8, "hidden_dim": 16, "depth": 2, "num_classes": 3},
        "data": {"name": "synthetic_vectors", "input_dim": 8, "num_classes": 3, "num_samples": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4},
        "compress": {"qat": True},
    }
    cfg = from_dict(config)
    for check in ("ranks", "accum"):
        cause = explain(check, model_traits(cfg), cfg, excess=1000.0)
        assert "compress.qat" in cause and "compress.qat=false" in cause, cause


def test_verify_names_low_precision_as_the_cause_of_a_parity_failure(tmp_path):
    """bf16: 2 ranks vs 1 gave 0.0157 against 3e-5 on a tiny LM, explained as a non-deterministic op or
    data that depend on the rank; the cause is bf16's rounding, and the fix is verifying in fp32."""
    from dist_train.tools.verify import explain, model_traits

    for precision in ("bf16", "fp16"):
        cfg = from_dict({**tiny_lm_config(tmp_path / "unused"), "train": {"precision": precision}})
        for check in ("ranks", "accum"):
            cause = explain(check, model_traits(cfg), cfg, excess=1000.0)
            assert f"train.precision {precision}" in cause and "train.precision=fp32" in cause, cause
            assert "non-deterministic" not in cause
        assert "train.precision" not in explain("resume", model_traits(cfg), cfg, excess=1000.0)
    cfg = from_dict(tiny_lm_config(tmp_path / "unused"))
    assert "train.precision" not in explain("ranks", model_traits(cfg), cfg, excess=1000.0)


def test_verify_rejects_bad_arguments(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    for argv, message in (
        (["--world-size", "1"], "--world-size must be >= 2"),
        (["--checks", "ranks,speed"], "--checks: unknown speed"),
        (["train.lr=fast"], "`train.lr` must be a finite number"),
        (["--work-dir", str(path)], f"--work-dir {path}: cannot create the folder"),  # was a traceback, exit 1
        (["--timeout-s", "0"], "--timeout-s must be > 0"),  # was every run "took longer", exit 1
        (["--tol", "nan"], "--tol must be >= 0, got nan"),  # was every parity check failing, exit 1
    ):
        code, _, err = run_main(capsys, "verify", str(path), "--checks", "ranks", "--steps", "2", *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


# --- plots and TensorBoard --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A short single-process run with metrics.png and TensorBoard on."""
    tmp = tmp_path_factory.mktemp("logged")
    config = tiny_lm_config(tmp / "run", log={"plot": True, "tensorboard": True, "every_steps": 1})
    proc = launch(config, tmp, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _assert_is_a_drawn_plot(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (700, 1100)
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    line_color = torch.tensor([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour: the curves are drawn
    close = (torch.from_numpy(rgb.copy()) - line_color).abs().max(dim=-1).values < 0.05
    assert close.sum() > 500


def test_run_writes_metrics_png_and_plot_command_redraws_it(logged_run, tmp_path, capsys):
    _assert_is_a_drawn_plot(logged_run / "metrics.png")
    out_path = tmp_path / "again.png"
    code, out, err = run_main(capsys, "plot", str(logged_run), "--out", str(out_path))
    assert code == 0, err
    assert out.strip() == str(out_path)
    _assert_is_a_drawn_plot(out_path)
    code, _, err = run_main(capsys, "plot", str(tmp_path))
    assert code == 2 and "has no metrics.jsonl" in err
    code, _, err = run_main(capsys, "plot", str(logged_run), "--out", str(tmp_path / "no" / "such" / "m.png"))
    assert code == 2 and err.startswith("dist_train: error: cannot write the plot to") and "Traceback" not in err
    # a FILE without a suffix is that file (a PNG), not FILE.png beside the path printed; a folder is refused
    code, out, err = run_main(capsys, "plot", str(logged_run), "--out", str(tmp_path / "plot"))
    assert code == 0 and out.strip() == str(tmp_path / "plot") and not (tmp_path / "plot.png").exists(), err
    _assert_is_a_drawn_plot(tmp_path / "plot")
    code, out, err = run_main(capsys, "plot", str(logged_run), "--out", str(tmp_path))
    assert code == 2 and err.startswith(f"dist_train: error: cannot write the plot to {tmp_path}: "), err
    assert not tmp_path.with_name(tmp_path.name + ".png").exists()


def test_plot_series_after_a_resume_keeps_one_value_per_step():
    from dist_train.plots import series

    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"resumed_from": "step-00000003", "step": 3}]
    rows += [{"step": s, "loss": 100.0 + s} for s in range(4, 7)] + [{"step": 6, "eval_loss": "nan"}]
    assert series(rows, "loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert series(rows, "eval_loss") == []
    # a run killed before its first checkpoint and started again logs from step 1 again (no resumed_from row)
    again = [{"step": s, "loss": 10.0 - s} for s in range(1, 5)] + [{"step": s, "loss": 20.0 + s} for s in range(1, 7)]
    again.append({"step": 6, "eval_loss": 1.5})
    assert series(again, "loss") == [(s, 20.0 + s) for s in range(1, 7)]
    assert series(again, "eval_loss") == [(6, 1.5)]


def test_plot_skips_lines_that_are_not_rows(tmp_path, capsys):
    """A torn last line, or a JSON value that is not an object, is skipped (a list made the plot a traceback)."""
    from dist_train.plots import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n7\n{"step": 2, "loss": 1')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    code, out, err = run_main(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "m.png"))
    assert code == 0 and "Traceback" not in err, err
    # garbage a crash left (bytes that are not UTF-8) and rows without an integer step were tracebacks
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(
            b'\n\xff\xfe\x00\x00\n{"step": 3, "loss": 0.5}\n{"loss": 1.0}\n{"resumed_from": "step-1"}\n{"step": "4"}\n'
        )
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 0.5}]
    code, out, err = run_main(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "m.png"))
    assert code == 0 and "Traceback" not in err, err
    # finite values whose axis range overflows matplotlib's arithmetic ("arange: cannot compute length")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lr": 1e308}\n{"step": 5, "lr": -1e308}\n{"step": 6, "lr": 1e300}\n')
    from dist_train.plots import series

    assert series(read_metrics(tmp_path), "lr") == [(6, 1e300)]
    code, out, err = run_main(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "m.png"))
    assert code == 0 and "Traceback" not in err, err


def test_plot_of_a_metrics_file_it_cannot_read_is_one_line(tmp_path):
    """Another user's run: reading metrics.jsonl raised PermissionError (a traceback, status 1)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "metrics.jsonl").chmod(0)
    proc = run_cli([*as_plain_user(), PYTHON, "-m", "dist_train", "plot", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dist_train: error: cannot read {tmp_path / 'metrics.jsonl'} (Permission denied)"
    ], proc.stderr[-2000:]
    # a run inside a folder this user may not enter: Path.is_file raised PermissionError (a traceback, status 1)
    run_dir = tmp_path / "locked" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "locked").chmod(0)
    try:
        proc = run_cli([*as_plain_user(), PYTHON, "-m", "dist_train", "plot", str(run_dir)], timeout=120)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dist_train: error: cannot read {run_dir / 'metrics.jsonl'} (Permission denied)"
    ], proc.stderr[-2000:]


def _tb_scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_events_hold_the_logged_series(logged_run):
    events, loss = _tb_scalars(logged_run / "tb", "loss")
    rows = [r for r in read_rows(logged_run) if "loss" in r]
    assert [step for step, _ in loss] == list(range(1, 11))
    assert [value for _, value in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    _, lr = _tb_scalars(logged_run / "tb", "lr")
    assert [v for _, v in lr] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    _, eval_loss = _tb_scalars(logged_run / "tb", "eval_loss")
    assert [s for s, _ in eval_loss] == [10]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_tensorboard_resume_replaces_the_interrupted_runs_steps(tmp_path):
    from dist_train.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, True, 6, 0, "lines", True)
    for step in range(1, 6):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, True, 6, 3, "lines", True)  # resumed from a checkpoint at step 3
    resumed.write({"resumed_from": "step-00000003", "step": 3})
    for step in range(4, 7):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    _, loss = _tb_scalars(tmp_path / "tb", "loss")
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_tensorboard_a_run_started_again_before_its_first_checkpoint_replaces_the_earlier_attempt(tmp_path):
    """Killed before any checkpoint, the same command starts from step 0 again: the first attempt's
    events stayed, two values per step."""
    from dist_train.metrics import MetricsLogger

    for attempt, last in ((1, 4), (2, 6)):
        logger = MetricsLogger(tmp_path, True, 6, 0, "lines", True)
        for step in range(1, last + 1):
            logger.write({"step": step, "loss": 10.0 * attempt + step})
        logger.close()
    _, loss = _tb_scalars(tmp_path / "tb", "loss")
    assert loss == [(step, 20.0 + step) for step in range(1, 7)]


def test_tensorboard_a_config_refused_at_its_first_batch_hides_no_events(tmp_path):
    """Started over (checkpoint.resume=never) with sequences longer than the model's, the config is refused
    at its first batch (status 2) and leaves metrics.jsonl as it was; its SummaryWriter, opened before
    that, had purged every event from step 1 on: TensorBoard showed none of the finished run's scalars."""
    from dist_train.distributed import DistContext
    from dist_train.errors import UserError
    from dist_train.trainer import train

    single = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")
    config = tiny_lm_config(tmp_path / "run", train={"max_steps": 4}, log={"every_steps": 1, "tensorboard": True})
    train(from_dict(config), single)
    config["checkpoint"]["resume"] = "never"
    config["data"]["seq_len"] = 32
    with pytest.raises(UserError, match="longer than model.seq_len"):
        train(from_dict(config), single)
    events, loss = _tb_scalars(tmp_path / "run" / "tb", "loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_check_runs_the_first_batch_and_refuses_a_model_that_does_not_fit_the_data(tmp_path, capsys):
    """The forward and loss of rank 0's first micro-batch run on the CPU: a vocabulary or class
    mismatch is found before a job is queued, in the run's own words."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "run"))
    probe = check_json(capsys, path)["first_batch"]
    assert probe["checked"] and probe["samples"] == 4 and probe["outputs"] == [4, 16, 64]
    assert probe["loss"] == pytest.approx(4.16, abs=0.3)  # about ln(64): an untrained model
    code, out, err = run_main(capsys, "check", str(path), "data.vocab_size=80")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert (
        "does not fit the data: rank 0's first micro-batch (4 samples, dist-train check) failed with IndexError" in err
    )
    assert 64 <= int(re.search(r"inputs \(4, 16\) int64 in \[\d+, (\d+)\]", err).group(1)) <= 79  # the culprit
    resnet = write_config(tmp_path / "r.yaml", resnet_config(tmp_path / "run2", model={"num_classes": 3}))
    code, _, err = run_main(capsys, "check", str(resnet))
    assert code == 2 and "Target " in err and "model outputs (4, 3)" in err


def test_check_json_stays_json_and_warns_when_the_first_loss_is_not_finite(tmp_path, capsys):
    """A model whose first forward gives NaN: --json printed `"loss": NaN` (not JSON: jq and strict parsers
    refuse it) and the report said 'No warnings' for a run that stops after its non-finite steps (status 1)."""
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name": "userpkg.nan:nan_model", "nan_from": 1},
        "data": {"name": "synthetic_vectors", "num_samples": 64},
        "train": {"micro_batch_size": 4, "max_steps": 20},
    }
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)), "--json")
    assert code == 0, err
    report = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    assert report["first_batch"]["loss"] == "nan"
    assert [w for w in report["warnings"] if w.startswith("the loss of rank 0's first micro-batch is nan")]
    code, out, err = run_main(capsys, "check", str(tmp_path / "c.yaml"))
    assert code == 0 and "loss nan" in out and "No warnings" not in out, err


def test_check_refuses_a_first_micro_batch_that_cannot_be_loaded(tmp_path, capsys):
    """Items of other lengths (no padding) cannot be stacked into a batch: the run fails at its first step;
    check printed torch's collate traceback (status 1) instead of the usual one line."""
    raw = tiny_lm_config(tmp_path / "run")
    raw["data"] = {"name": "userpkg.edges:varying_series", "n": 64}
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dist_train: error: loading rank 0's first micro-batch (4 samples, dist-train check) raised ")
    assert "RuntimeError: stack expects each tensor to be equal size" in err
    assert err.rstrip().endswith("the run would fail at its first step")


def test_check_probes_the_first_batch_the_run_trains_on(tmp_path, capsys):
    """check built the data without the run's data seed and the model without `model.init`: for a dataset
    factory that draws from torch's RNG (or model.init=normal) its first-batch loss was another batch's
    or another model's (0.7113 and 0.6958 where the run's first step logged 0.6732 and 0.6935)."""
    raw = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 3},
        "model": {"name": "mlp", "num_classes": 2, "init": "normal"},
        "data": {"name": "userpkg.edges:global_rng_vectors", "n": 64},
        "train": {"max_steps": 1, "micro_batch_size": 4},
        "log": {"every_steps": 1, "plot": False},
    }
    probe = check_json(capsys, write_config(tmp_path / "c.yaml", raw))["first_batch"]
    proc = launch(raw, tmp_path, launcher="forked")
    assert proc.returncode == 0, proc.stderr
    assert probe["loss"] == pytest.approx(read_rows(tmp_path / "run")[0]["loss"], rel=1e-6)


def test_check_refuses_a_forward_that_returns_no_tensor_as_the_run_does(tmp_path, capsys):
    """A forward returning a dict (a Hugging Face-style output): the run stops at its first step with one
    line, status 2; check raised AttributeError ('dict' object has no attribute 'dim'): a traceback, status 1."""
    raw = frozen_body_config(tmp_path / "run")
    raw["model"] = {"name": "userpkg.broken:model_dict_outputs"}
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert (
        code == 2
        and out == ""
        and err
        == (
            "dist_train: error: the model's forward returned a dict, not a tensor: return the outputs the loss takes "
            "(the logits or predictions, e.g. `return out['logits']`)\n"
        )
    )


@pytest.mark.parametrize(
    "mode, raised", [("assert", "AssertionError: injected assertion"), ("raise", "RuntimeError: injected failure")]
)
def test_check_says_in_one_line_that_the_models_own_code_raised(tmp_path, capsys, mode, raised):
    """An assert in the model's forward: check's probe caught only IndexError/ValueError/TypeError/
    RuntimeError, so an AssertionError (KeyError, AttributeError) was a traceback, status 1."""
    raw = frozen_body_config(tmp_path / "run")
    raw["model"] = {"name": "userpkg.faulty:faulty", "fail_rank": 0, "fail_call": 1, "mode": mode}
    code, out, err = run_main(capsys, "check", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"dist_train: error: the model's forward or loss raised {raised} (at ")
    assert "faulty.py:" in err and err.endswith("(4 samples, dist-train check): the run would fail at its first step\n")
