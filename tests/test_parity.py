"""Distributed correctness by parity: N ranks vs 1 rank on the same global batch, accumulation vs
a bigger micro-batch, through spawn and torchrun; one all-reduce per optimizer step; logged norms/LRs."""

import pytest
import torch
from helpers import ctx_from_env, launch, load_weights, max_abs_diff, read_rows, run_ranks, tiny_lm_config

from dist_train.config import from_dict
from dist_train.optim import lr_at

pytestmark = pytest.mark.slow
TOL = 1e-5


def mlp_config(output_dir, **train):
    return {
        "run": {"output_dir": str(output_dir), "seed": 1},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 64, "depth": 2, "num_classes": 4},
        "data": {"name": "synthetic_vectors", "input_dim": 32, "num_classes": 4, "num_samples": 512},
        "train": {"max_steps": 10, "lr": 1e-2, "grad_clip_norm": 0.5, **train},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }


def run_ok(config, tmp_path, **kwargs):
    proc = launch(config, tmp_path, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config["run"]["output_dir"]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """Global batch 16 four ways: 1x16, 2 ranks x 4 x accum 2 (spawn, torchrun, the tests' forked ranks), 1 x 4
    x accum 4."""
    tmp = tmp_path_factory.mktemp("lm")
    shapes = {
        "reference": dict(micro_batch_size=16, grad_accum_steps=1),
        "spawn": dict(micro_batch_size=4, grad_accum_steps=2),
        "torchrun": dict(micro_batch_size=4, grad_accum_steps=2),
        "forked": dict(micro_batch_size=4, grad_accum_steps=2),
        "accum": dict(micro_batch_size=4, grad_accum_steps=4),
    }
    launchers = {
        "reference": ("forked", 1),
        "spawn": ("spawn", 2),
        "torchrun": ("torchrun", 2),
        "forked": ("forked", 2),
        "accum": ("forked", 1),
    }
    runs = {}
    for name, shape in shapes.items():
        config = tiny_lm_config(tmp / name, train=shape, schedule={"name": "linear", "warmup_steps": 4})
        launcher, nproc = launchers[name]
        runs[name] = run_ok(config, tmp, launcher=launcher, nproc=nproc)
    return runs


@pytest.mark.parametrize("name", ["spawn", "torchrun", "accum"])
def test_transformer_lm_matches_single_rank_big_batch(lm_runs, name):
    reference, other = load_weights(lm_runs["reference"]), load_weights(lm_runs[name])
    assert max_abs_diff(reference, other) <= TOL
    assert max_abs_diff(reference, load_weights(lm_runs["reference"] + "/../torchrun")) <= TOL
    ref_rows = [r for r in read_rows(lm_runs["reference"]) if "loss" in r]
    rows = [r for r in read_rows(lm_runs[name]) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    for a, b in zip(ref_rows, rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_the_tests_forked_launcher_trains_as_spawn_and_torchrun_do(lm_runs):
    """Most multi-rank tests launch through tests/helpers.py's forked ranks (dist_train's main, forked
    from a warm interpreter): they train bit for bit as the real launchers' ranks do."""
    forked = load_weights(lm_runs["forked"])
    for name in ("spawn", "torchrun"):
        assert max_abs_diff(load_weights(lm_runs[name]), forked) == 0.0, name
        assert [{k: r[k] for k in ("step", "loss", "grad_norm") if k in r} for r in read_rows(lm_runs[name])] == [
            {k: r[k] for k in ("step", "loss", "grad_norm") if k in r} for r in read_rows(lm_runs["forked"])
        ]


def test_logged_lr_follows_the_schedule(lm_runs):
    cfg = from_dict(tiny_lm_config("x", schedule={"name": "linear", "warmup_steps": 4}))
    rows = [r for r in read_rows(lm_runs["reference"]) if "lr" in r]
    assert rows[3]["lr"] == pytest.approx(cfg.train.lr)  # end of warm-up (4th step)
    assert rows[-1]["lr"] == pytest.approx(lr_at(cfg, 9)) == pytest.approx(0.0)  # linear to min_lr_ratio 0
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(cfg, s) for s in range(10)])


def test_loss_falls_and_eval_metrics_logged(lm_runs):
    rows = read_rows(lm_runs["reference"])
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 10
    assert evals[0]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[0]["eval_loss"], rel=1e-6)


def test_mlp_two_ranks_match_one_rank(tmp_path):
    reference = run_ok(
        mlp_config(tmp_path / "ref", micro_batch_size=16, grad_accum_steps=1), tmp_path, launcher="forked"
    )
    spawned = run_ok(
        mlp_config(tmp_path / "two", micro_batch_size=4, grad_accum_steps=2), tmp_path, nproc=2, launcher="forked"
    )
    assert max_abs_diff(load_weights(reference), load_weights(spawned)) <= TOL


def _instrumented_run(rank, world, output_dir):
    """Count DDP all-reduce rounds and recompute each step's gradient norm independently."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from dist_train.strategies.ddp import DDPStrategy
    from dist_train.trainer import train

    bucket_calls, norms = [], []
    setup, clip = DDPStrategy.setup, DDPStrategy.clip_grad_norm

    def counting_setup(self, model):
        setup(self, model)

        def hook(state, bucket):
            bucket_calls.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        self.model.register_comm_hook(None, hook)

    def checked_clip(self, max_norm):
        grads = torch.cat([p.grad.flatten() for p in self.module.parameters() if p.grad is not None])
        norms.append(float(torch.linalg.vector_norm(grads)))
        return clip(self, max_norm)

    DDPStrategy.setup, DDPStrategy.clip_grad_norm = counting_setup, checked_clip
    cfg = from_dict(tiny_lm_config(output_dir, train={"grad_accum_steps": 4, "max_steps": 6}))
    train(cfg, ctx_from_env())
    return bucket_calls, norms


def test_one_allreduce_per_step_and_logged_norm_is_torch_norm(tmp_path):
    results = run_ranks(_instrumented_run, 2, str(tmp_path / "run"))
    for bucket_calls, _ in results:
        assert bucket_calls.count(0) == 6  # one all-reduce round per optimizer step (accum 4, 6 steps)
        buckets = max(bucket_calls) + 1
        assert len(bucket_calls) == 6 * buckets
    logged = [r["grad_norm"] for r in read_rows(tmp_path / "run") if "grad_norm" in r]
    assert logged == pytest.approx(results[0][1], rel=1e-5)


def resnet_config(output_dir, **train):
    return {
        "run": {"output_dir": str(output_dir), "seed": 2},
        "model": {"name": "resnet", "widths": [8, 16], "num_classes": 4},
        "data": {"name": "synthetic_images", "num_classes": 4, "image_size": 8, "num_samples": 256, "eval_samples": 30},
        "train": {"max_steps": 8, "lr": 1e-2, "sync_batchnorm": True, **train},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }


def test_resnet_with_sync_batchnorm_two_ranks_match_one_rank(tmp_path):
    # no accumulation here: BatchNorm statistics are per forward, so 2 micro-steps of 8 are not one of 16
    reference = run_ok(resnet_config(tmp_path / "ref", micro_batch_size=16), tmp_path, launcher="forked")
    spawned = run_ok(resnet_config(tmp_path / "two", micro_batch_size=8), tmp_path, nproc=2, launcher="forked")
    weights_ref, weights_two = load_weights(reference), load_weights(spawned)
    assert max_abs_diff(weights_ref, weights_two) <= TOL  # running mean/var buffers included
    assert any("running_var" in k for k in weights_ref)
    # without sync the per-rank batch statistics differ: the same comparison must fail
    unsynced = run_ok(
        resnet_config(tmp_path / "nosync", micro_batch_size=8, sync_batchnorm=False),
        tmp_path,
        nproc=2,
        launcher="forked",
    )
    assert max_abs_diff(weights_ref, load_weights(unsynced)) > 1e-3


def test_resume_at_another_world_size_logs_the_open_windows_loss(tmp_path):
    """A checkpoint inside a logging window (log every 2, checkpoint at 3): resumed on 1 rank, the row
    of step 4 still averages steps 3 and 4, as the uninterrupted 2-rank run's does."""
    shape = {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2}
    sections = dict(checkpoint={"every_steps": 3}, log={"every_steps": 2, "plot": False})
    two = run_ok(tiny_lm_config(tmp_path / "two", train=shape, **sections), tmp_path, nproc=2, launcher="forked")
    step_3 = f"checkpoint.resume={two}/checkpoints/step-00000003"
    one = tiny_lm_config(tmp_path / "one", train={**shape, "micro_batch_size": 8}, **sections)
    proc = launch(one, tmp_path, [step_3], launcher="forked")  # the same global batch on one rank
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {r["step"]: r["loss"] for r in read_rows(two) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_rows(one["run"]["output_dir"]) if "loss" in r}
    assert sorted(resumed) == [4, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_a_world_size_that_does_not_divide_it(tmp_path):
    """One rank x 3 on 10 samples: the epoch ends after 9 samples, where the checkpoint of step 3 is.
    Two ranks resume it into the next epoch; they were refused with 'stopped 9 samples into an epoch,
    which world size 2 cannot split evenly' (status 2), though nothing of that epoch was left."""
    shape = {"max_steps": 3, "micro_batch_size": 3, "grad_accum_steps": 1}
    config = mlp_config(tmp_path / "run", **shape)
    config["data"]["num_samples"] = 10
    run_ok(config, tmp_path, launcher="forked")
    proc = launch(config, tmp_path, ["train.max_steps=5", "train.micro_batch_size=2"], nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continues from sample" not in proc.stderr  # no new global batch fits the old epoch: none continues
    rows = [r for r in read_rows(tmp_path / "run") if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
