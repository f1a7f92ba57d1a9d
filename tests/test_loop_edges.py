"""The loop's edge cases, each once a bug: a step with nothing counted, non-finite streaks across a
resume, fp16 with both clips, a rewound run re-reaching a saved step, a finished run started again,
an eval.metric nothing watches, random transforms in loader workers across a resume, a long
evaluation under the hang watchdog, dataset factories that draw from the global RNG, a failed save.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO_ROOT, launch, load_weights, max_abs_diff, read_rows, run_cli, write_config

import dist_train.checkpoint as ckpt
from dist_train.config import from_dict
from dist_train.distributed import DistContext
from dist_train.errors import UserError
from dist_train.trainer import TrainingError, train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")
ENV = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}


def config(output_dir, **sections) -> dict:
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 4},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 16, "num_classes": 2},
        "data": {"name": "userpkg.edges:vectors"},
        "train": {"max_steps": 12, "micro_batch_size": 16, "lr": 1e-2},
        "loader": {"shuffle": False},
        "checkpoint": {"every_steps": None, "at_end": False},
        "eval": {"at_end": False},
        "log": {"every_steps": 1, "plot": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def run(output_dir, **sections) -> dict:
    return train(from_dict(config(output_dir, **sections)), SINGLE)


def test_a_step_with_every_target_ignored_is_a_zero_update(tmp_path):
    """Step 1's 16 samples are all ignored (-100): no 0/0, the step changes nothing and is not skipped."""
    assert run(tmp_path, data={"ignored": [0, 16]}, train={"max_steps": 3})["status"] == "finished"
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert rows[0]["grad_norm"] == 0.0 and rows[0]["skipped_steps"] == 0
    assert rows[1]["grad_norm"] > 0 and rows[2]["skipped_steps"] == 0


def test_each_epoch_reads_the_train_split_in_its_own_seeded_order(tmp_path):
    """loader.shuffle reshuffles every epoch, seeded by (run.seed, epoch): the loop sets the sampler's
    epoch each time (without it every epoch repeated epoch 0's order)."""
    from userpkg import edges

    edges.READ.clear()
    data = {"name": "userpkg.edges:recorded_vectors", "n": 32}
    assert run(tmp_path, data=data, loader={"shuffle": True, "num_workers": 0}, train={"epochs": 2})["step"] == 4
    orders = [torch.randperm(32, generator=torch.Generator().manual_seed(4 + epoch)).tolist() for epoch in (0, 1)]
    assert orders[0] != orders[1]
    assert edges.READ[-64:] == orders[0] + orders[1]  # after the items read while the run is built


def test_non_finite_steps_in_a_row_are_counted_across_a_resume(tmp_path):
    """Steps 3-7 see NaN inputs, 5 in a row stop the run; so they do when it resumes at step 5."""
    sections = {"data": {"nan": [32, 112]}, "checkpoint": {"every_steps": 5}}
    with pytest.raises(TrainingError, match="not finite for 5 steps in a row"):
        run(tmp_path / "whole", **sections)
    assert run(tmp_path / "resumed", train={"max_steps": 5}, **sections)["step"] == 5
    with pytest.raises(TrainingError, match="not finite for 5 steps in a row"):
        run(tmp_path / "resumed", **sections)


def test_fp16_stops_after_the_scalers_back_off_plus_the_limit(tmp_path):
    """fp16 had no limit (the GradScaler's back-off skips steps in a row): a run whose loss stayed NaN
    finished with status 0 and NaN weights. The scaler's 16 halvings of its 2**16 scale come on top."""
    sections = {"data": {"n": 1024, "nan": [32, 1024]}, "loader": {"shuffle": False}}
    train_cfg = {"precision": "fp16", "max_nonfinite_steps": 2, "max_steps": 30}
    with pytest.raises(TrainingError, match=r"not finite for 18 steps in a row \(by step 20\)"):
        run(tmp_path, train=train_cfg, **sections)


def test_fp16_clips_by_norm_and_by_value_in_one_step(tmp_path):
    """The GradScaler unscales once per step, whichever clips run."""
    train_cfg = {"precision": "fp16", "grad_clip_norm": 1.0, "grad_clip_value": 0.01, "max_steps": 3}
    assert run(tmp_path, train=train_cfg)["status"] == "finished"
    assert all(r["grad_norm"] > 0 for r in read_rows(tmp_path) if "loss" in r)


def test_a_rewound_run_replaces_the_checkpoint_of_a_step_it_reaches_again(tmp_path):
    """Run A saves steps 2 and 4; run B resumes from A's step 2 with another learning rate and saves
    step 4 again: that folder, named by `latest`, holds B's state."""
    keep = {"every_steps": 2, "keep_last": 5}
    run(tmp_path, train={"max_steps": 4}, checkpoint=keep)
    first = torch.load(tmp_path / "checkpoints/step-00000004/model.pt")
    rewind = {**keep, "resume": str(tmp_path / "checkpoints/step-00000002")}
    run(tmp_path, train={"max_steps": 4, "lr": 1e-3}, checkpoint=rewind)
    assert ckpt.read_latest(tmp_path / "checkpoints") == "step-00000004"
    ckpt.verify(tmp_path / "checkpoints/step-00000004")
    saved, exported = torch.load(tmp_path / "checkpoints/step-00000004/model.pt"), load_weights(tmp_path)
    assert max_abs_diff(saved, exported) == 0.0 and max_abs_diff(saved, first) > 0
    assert not list((tmp_path / "checkpoints").glob(".replaced-*"))


def test_a_finished_run_started_again_evaluates_nothing_twice(tmp_path):
    """The last step is a checkpoint step: its checkpoint comes after the final evaluation."""
    sections = {"checkpoint": {"every_steps": 4, "at_end": False}, "train": {"max_steps": 4}, "eval": {"at_end": True}}
    run(tmp_path, **sections)
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows if "eval_loss" in r] == [4]
    run(tmp_path, **sections)
    assert read_rows(tmp_path) == [*rows, {"resumed_from": "step-00000004", "step": 4}]


def test_a_model_built_in_eval_mode_trains_in_train_mode_evaluated_or_not(tmp_path):
    """from_pretrained returns an hf model in eval mode: it trained without dropout until the first
    evaluation put it in train mode, so the weights depended on eval.every_steps (and a resumed run,
    in eval mode again until its first evaluation, left the uninterrupted run's trajectory)."""

    def run_eval_mode_model(name, dropout=0.5, **sections):
        raw = config(tmp_path / name, train={"max_steps": 4}, **sections)
        raw["model"] = {"name": "userpkg.edges:eval_mode_mlp", "dropout": dropout}
        train(from_dict(raw), SINGLE)
        return load_weights(tmp_path / name)

    plain = run_eval_mode_model("plain")
    assert max_abs_diff(plain, run_eval_mode_model("evaluated", eval={"every_steps": 1})) == 0.0
    assert max_abs_diff(plain, run_eval_mode_model("no_dropout", dropout=0.0)) > 0  # dropout on from step 1


def test_early_stopping_on_another_metric_after_a_resume_counts_afresh(tmp_path):
    """A run resumed watching eval_accuracy (max) from a checkpoint whose best was an eval_loss of 0.69
    compared its accuracies with that loss: no improvement, stopped at step 6 while the accuracy rose
    at each evaluation (the run watching eval_accuracy from the start stops at step 10)."""
    accuracy = {"every_steps": 2, "early_stopping_patience": 2, "metric": "eval_accuracy", "mode": "max"}
    sections = {"train": {"max_steps": 30, "lr": 3e-3}, "checkpoint": {"every_steps": None, "at_end": True}}
    whole = run(tmp_path / "whole", eval=accuracy, **sections)
    assert whole == {"status": "early_stopped", "step": 10}
    loss = {"every_steps": 2, "early_stopping_patience": 100}
    run(tmp_path / "parts", eval=loss, train={"max_steps": 2, "lr": 3e-3}, checkpoint=sections["checkpoint"])
    assert run(tmp_path / "parts", eval=accuracy, **sections) == whole


def test_eval_metric_is_read_only_for_early_stopping(tmp_path):
    """mse reports no eval_accuracy; with no early stopping nothing reads eval.metric."""
    model = {"name": "mlp", "input_dim": 8, "hidden_dim": 16, "num_classes": 4}
    data = {"name": "synthetic_vectors", "task": "regression", "input_dim": 8, "num_samples": 256, "eval_samples": 64}
    train_cfg = {"loss": "mse", "max_steps": 4}
    result = run(tmp_path, model=model, data=data, train=train_cfg, eval={"every_steps": 2, "metric": "eval_accuracy"})
    assert result["status"] == "finished"
    assert [r["step"] for r in read_rows(tmp_path) if "eval_loss" in r] == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_random_transforms_in_loader_workers_resume_exactly(tmp_path, persistent):
    """Two workers, a random transform, 4 steps per epoch: stopped at step 6 (mid-epoch) and started
    again, the run ends with the uninterrupted run's weights (each batch reseeds the worker that
    loads it), with workers kept across epochs or not."""
    sections = {
        "data": {"name": "userpkg.edges:jittered_vectors", "n": 64},
        "loader": {"num_workers": 2, "shuffle": True, "persistent_workers": persistent},
        "checkpoint": {"at_end": True},
    }
    run(tmp_path / "whole", train={"max_steps": 10}, **sections)
    run(tmp_path / "resumed", train={"max_steps": 6}, **sections)
    run(tmp_path / "resumed", train={"max_steps": 10}, **sections)
    assert max_abs_diff(load_weights(tmp_path / "whole"), load_weights(tmp_path / "resumed")) == 0.0


def test_random_transforms_in_loader_workers_draw_anew_each_epoch(tmp_path):
    """A worker's seed for a train batch comes from (seed, rank, epoch, the batch's place): without
    the epoch, every epoch drew the same noise for the same batch (augmentation frozen across epochs)."""
    from dist_train.data import build_train_data

    sections = {"data": {"name": "userpkg.edges:jittered_vectors", "n": 32}, "loader": {"num_workers": 1}}
    data = build_train_data(from_dict(config(tmp_path, **sections)), SINGLE)  # shuffle off: the same samples
    (x0, y0), (x1, y1) = (next(data.epoch_batches(epoch, 0)) for epoch in (0, 1))
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert torch.equal(next(data.epoch_batches(1, 0))[0], x1)  # and the same noise for the same epoch


def test_loader_workers_are_forked_whatever_the_default_start_method(tmp_path):
    """Python 3.14 starts processes with forkserver by default: a worker's parent was then the fork
    server, not its rank, so every worker took its rank for dead and exited ("DataLoader worker
    exited unexpectedly", status 1 at step 1), and workers no longer started with the stop signals
    blocked. The loader forks its workers, as on Python 3.10-3.13."""
    import multiprocessing

    from dist_train.data import build_train_data

    sections = {"data": {"name": "userpkg.edges:jittered_vectors", "n": 32}, "loader": {"num_workers": 1}}
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        data = build_train_data(from_dict(config(tmp_path, **sections)), SINGLE)
        inputs, targets = next(data.epoch_batches(0, 0))
    finally:
        multiprocessing.set_start_method(default, force=True)
    assert inputs.shape == (16, 32) and torch.equal(targets, data.dataset.y[:16])


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_random_transforms_in_eval_loader_workers_resume_exactly(tmp_path, persistent):
    """An eval split with noise added on the fly, two workers: a run resumed at step 6 evaluates as
    the uninterrupted run did at steps 8 and 10 (the eval loader's worker seeds moved on with every
    evaluation before: other eval rows, hence other early-stopping and plateau decisions)."""
    sections = {
        "data": {"name": "userpkg.edges:jittered_vectors", "n": 64, "eval_n": 40},
        "loader": {"num_workers": 2, "persistent_workers": persistent},
        "eval": {"every_steps": 2},
        "checkpoint": {"at_end": True},
    }
    run(tmp_path / "whole", train={"max_steps": 10}, **sections)
    run(tmp_path / "resumed", train={"max_steps": 6}, **sections)
    run(tmp_path / "resumed", train={"max_steps": 10}, **sections)

    def evals(run_dir):
        return {r["step"]: r["eval_loss"] for r in read_rows(run_dir) if "eval_loss" in r}

    assert list(evals(tmp_path / "whole")) == [2, 4, 6, 8, 10]
    assert evals(tmp_path / "resumed") == evals(tmp_path / "whole")


WATCHDOG = """
import sys
from dist_train import control
from dist_train.cli import exit_with, main

control.Control.WATCHDOG_GRACE_S = 0.0  # the watchdog fires after dist.timeout_s without progress
exit_with(main(sys.argv[1:]))
"""


def test_an_evaluation_longer_than_the_watchdog_is_progress_not_a_hang(tmp_path):
    """A 2 s watchdog, an evaluation of about 3 s (64 samples x 0.05 s): re-armed per eval batch."""
    raw = config(tmp_path / "run", data={"eval_delay": 0.05}, train={"max_steps": 2}, eval={"every_steps": 1})
    raw["dist"] = {"timeout_s": 2.0}
    proc = run_cli([PYTHON, "-c", WATCHDOG, "--config", str(write_config(tmp_path / "c.yaml", raw))], env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_rows(tmp_path / "run") if "eval_loss" in r] == [1, 2]


def test_the_int8_evaluation_after_the_last_checkpoint_is_not_a_hang(tmp_path):
    """The last checkpoint re-armed the 2 s watchdog, which then killed the run (status 1, every time
    it was started again) during the 3 s evaluation of its int8 model; after the loop nothing is armed."""
    raw = config(
        tmp_path / "run",
        data={"eval_delay": 0.05},
        train={"max_steps": 2},
        eval={"at_end": True},
        checkpoint={"at_end": True},
        compress={"dynamic_quant_export": True},
    )
    raw["dist"] = {"timeout_s": 2.0}
    proc = run_cli([PYTHON, "-c", WATCHDOG, "--config", str(write_config(tmp_path / "c.yaml", raw))], env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_rows(tmp_path / "run") if "eval_loss_dynamic_int8" in r] == [2]


def test_a_failed_save_names_rank_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = ckpt.commit_save

    def disk_full_at_step_4(root, tmp, step, *args, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real(root, tmp, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "commit_save", disk_full_at_step_4)
    with pytest.raises(TrainingError, match=r"rank 0 failed to save the checkpoint of step 4: OSError: .*No space"):
        run(tmp_path, checkpoint={"every_steps": 2}, train={"max_steps": 6})
    assert ckpt.read_latest(tmp_path / "checkpoints") == "step-00000002"


def test_a_peer_lost_after_the_checkpoint_is_written_is_not_called_a_failed_save(tmp_path, monkeypatch):
    """A rank killed after it wrote its files fails the save's closing barrier on rank 0, after rank 0
    committed the checkpoint: the error read `rank 0 failed to save the checkpoint of step 8: ...
    Connection closed by peer` while `latest` named step 8, complete (and the same command resumed
    from it)."""
    from dist_train.control import Control

    def barrier(self):
        if ckpt.read_latest(tmp_path / "checkpoints") == "step-00000004":
            raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")

    monkeypatch.setattr(Control, "barrier", barrier)
    expected = r"rank 0 failed after writing the checkpoint of step 4 \(step-00000004 is complete: the same command"
    with pytest.raises(TrainingError, match=expected + r".*RuntimeError: Connection closed by peer"):
        run(tmp_path, checkpoint={"every_steps": 2}, train={"max_steps": 6})
    ckpt.verify(tmp_path / "checkpoints" / "step-00000004")


def test_a_full_disk_after_the_checkpoint_has_its_name_is_not_called_a_failed_save(tmp_path, monkeypatch):
    """The disk filled up while rank 0 replaced `latest`, after step 4's folder had its name: the error
    said `failed to save the checkpoint of step 4`, while that checkpoint is complete and is the one the
    same command resumes from (the newest intact step folder), with nothing set aside."""
    real = ckpt.write_atomic

    def disk_full_at_latest_4(path, data):
        if path.name == "latest" and data.startswith(b"step-00000004"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "write_atomic", disk_full_at_latest_4)
    expected = r"rank 0 failed after writing the checkpoint of step 4 \(step-00000004 is complete: the same command"
    with pytest.raises(TrainingError, match=expected + r".*OSError: .*No space left on device"):
        run(tmp_path, checkpoint={"every_steps": 2}, train={"max_steps": 6})
    root = tmp_path / "checkpoints"
    assert ckpt.read_latest(root) == "step-00000002"
    monkeypatch.setattr(ckpt, "write_atomic", real)
    assert run(tmp_path, checkpoint={"every_steps": 2}, train={"max_steps": 6})["status"] == "finished"
    assert [r for r in read_rows(tmp_path) if "resumed_from" in r] == [{"resumed_from": "step-00000004", "step": 4}]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".abandoned-")]


@pytest.mark.slow
def test_two_ranks_match_one_with_a_global_rng_factory_and_a_step_with_nothing_counted(tmp_path):
    """The dataset factory draws from the global RNG (the same data on every rank: factories run under
    the run's seed) and step 1 holds ignored targets only (a zero update at any world size). Step 2's
    samples 16-20 are ignored too: rank 0 counts 5 targets, rank 1 counts 6, so a loss averaged over
    each rank's (or micro-batch's) own count, not the step's global count, no longer matches 1 rank."""
    data = {"name": "userpkg.edges:global_rng_vectors", "ignored": [0, 21]}
    for name, ranks, micro in (("one", 1, 16), ("two", 2, 8)):
        raw = config(tmp_path / name, data=data, train={"max_steps": 3, "micro_batch_size": micro})
        proc = launch(raw, tmp_path, nproc=ranks, launcher="forked")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert max_abs_diff(load_weights(tmp_path / "one"), load_weights(tmp_path / "two")) < 1e-6
    losses = {name: [r["loss"] for r in read_rows(tmp_path / name) if "loss" in r] for name in ("one", "two")}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-6), json.dumps(losses)


@pytest.mark.slow
def test_two_ranks_match_one_when_the_ranks_count_other_numbers_of_elements(tmp_path):
    """Series of 4 and 16 steps under mse, micro-batch 1: the loss normaliser was each rank's own count
    times the world size, not the global count (an all-reduce only for losses with ignored targets),
    so 2 ranks gave the short series' steps 2.5x the weight of the long one's and logged a loss 2.5x
    too high (1.40 where 1 rank x accumulation 2, the same samples, logs 0.56)."""
    model = {"name": "tcn", "input_dim": 1, "num_outputs": 1, "channels": 8, "num_levels": 2, "pooling": "none"}
    for name, ranks, accum in (("one", 1, 2), ("two", 2, 1)):
        train = {"max_steps": 4, "micro_batch_size": 1, "grad_accum_steps": accum, "loss": "mse"}
        raw = config(tmp_path / name, data={"name": "userpkg.edges:varying_series"}, train=train)
        raw["model"] = model
        proc = launch(raw, tmp_path, nproc=ranks, launcher="forked")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert max_abs_diff(load_weights(tmp_path / "one"), load_weights(tmp_path / "two")) < 1e-6
    losses = {name: [r["loss"] for r in read_rows(tmp_path / name) if "loss" in r] for name in ("one", "two")}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-6), json.dumps(losses)


def varying_tokens_config(output_dir, accum: int) -> dict:
    train = {"max_steps": 4, "micro_batch_size": 1, "grad_accum_steps": accum, "loss": "cross_entropy"}
    raw = config(output_dir, data={"name": "userpkg.edges:varying_tokens"}, train=train, log={"every_steps": 2})
    raw["model"] = {"name": "userpkg.residual:embedding_lm"}
    return raw


def test_tokens_per_s_counts_every_item_at_its_own_length(tmp_path):
    """Token ids of 4 and 16 positions, micro-batch 1: tokens/s was item 0's length x samples/s (4 per
    sample), not the 20 tokens of each step's 2 items (10 per sample)."""
    train(from_dict(varying_tokens_config(tmp_path, accum=2)), SINGLE)
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 10)


@pytest.mark.slow
def test_tokens_per_s_sums_the_ranks_own_token_counts(tmp_path):
    """Rank 0 gets the 4-token items, rank 1 the 16-token ones: the logged rate is of all 20 per step
    (rank 0's own count times the world size logged 4 per sample)."""
    proc = launch(varying_tokens_config(tmp_path / "two", accum=1), tmp_path, nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in read_rows(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 10)


def test_a_run_started_from_a_named_checkpoint_continues_from_its_own_when_started_again(tmp_path):
    """checkpoint.resume names another run: the same command again (a requeue, a restart after exit
    75) continues from this run's own checkpoints, not from the named one; also once retention
    deleted the named folder of a run that rewound to its own checkpoint."""
    run(tmp_path / "base", train={"max_steps": 4}, checkpoint={"every_steps": 2})
    tune = {"every_steps": 2, "resume": str(tmp_path / "base")}
    run(tmp_path / "whole", train={"max_steps": 8}, checkpoint=tune)
    run(tmp_path / "tuned", train={"max_steps": 6}, checkpoint=tune)  # stopped at step 6
    run(tmp_path / "tuned", train={"max_steps": 8}, checkpoint=tune)
    markers = [r["resumed_from"] for r in read_rows(tmp_path / "tuned") if "resumed_from" in r]
    assert markers == ["step-00000004", "step-00000006"]
    assert max_abs_diff(load_weights(tmp_path / "whole"), load_weights(tmp_path / "tuned")) == 0.0

    rewind = {"every_steps": 2, "keep_last": 1, "resume": str(tmp_path / "base/checkpoints/step-00000002")}
    run(tmp_path / "base", train={"max_steps": 6, "lr": 1e-3}, checkpoint=rewind)
    assert not (tmp_path / "base/checkpoints/step-00000002").exists()  # retention took the named folder
    assert run(tmp_path / "base", train={"max_steps": 6, "lr": 1e-3}, checkpoint=rewind)["step"] == 6
    assert read_rows(tmp_path / "base")[-1] == {"resumed_from": "step-00000006", "step": 6}


def test_early_stopping_on_perplexity_of_a_classifier_stops_at_the_first_batch(tmp_path):
    """eval_perplexity exists for language-model outputs only: refused before any evaluation or save."""
    from dist_train.errors import UserError

    watch = {"every_steps": 2, "early_stopping_patience": 2, "metric": "eval_perplexity"}
    with pytest.raises(UserError, match=r"eval.metric=eval_perplexity needs language-model outputs .* 2 dimensions"):
        run(tmp_path, eval=watch, checkpoint={"every_steps": 1})
    assert not (tmp_path / "checkpoints").exists()
    assert not [r for r in read_rows(tmp_path) if "loss" in r or "eval_loss" in r]


def test_a_finished_run_started_again_exports_and_evaluates_no_int8_model_twice(tmp_path):
    sections = {"compress": {"dynamic_quant_export": True}, "checkpoint": {"every_steps": 2}, "train": {"max_steps": 4}}
    run(tmp_path, **sections)
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows if "eval_loss_dynamic_int8" in r] == [4]
    written = (tmp_path / "model_dynamic_int8.pt").stat().st_mtime_ns
    run(tmp_path, **sections)
    assert read_rows(tmp_path) == [*rows, {"resumed_from": "step-00000004", "step": 4}]
    assert (tmp_path / "model_dynamic_int8.pt").stat().st_mtime_ns == written


def test_a_resumed_run_takes_its_optimizer_settings_from_the_config(tmp_path):
    """The checkpoint holds the optimizer's state (moments, step); weight decay, betas and eps come from
    the config of the run that resumes, as the learning rate does."""
    run(tmp_path / "base", train={"max_steps": 2}, checkpoint={"every_steps": 2})
    for decay in (0.01, 0.5):
        resume = {"resume": str(tmp_path / "base")}
        run(tmp_path / f"decay-{decay}", train={"max_steps": 4}, optim={"weight_decay": decay}, checkpoint=resume)
    assert max_abs_diff(load_weights(tmp_path / "decay-0.01"), load_weights(tmp_path / "decay-0.5")) > 1e-4


def test_a_batch_that_fails_to_load_or_evaluate_names_rank_and_step(tmp_path):
    """A dataset whose __len__ overstates its items fails at step 5 (samples 64..79 of 64), an eval
    split with a class the model lacks at the evaluation of step 2: both were `rank 0 failed:
    IndexError: ...`, without the step the contract asks for."""
    with pytest.raises(TrainingError, match=r"rank 0 failed at step 5 loading its batch: IndexError"):
        run(tmp_path / "load", data={"name": "userpkg.edges:failing_vectors", "claimed": 80})
    assert [r["step"] for r in read_rows(tmp_path / "load") if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(TrainingError, match=r"rank 0 failed evaluating step 2: IndexError: Target 5 is out of bounds"):
        run(
            tmp_path / "eval",
            data={"name": "userpkg.edges:failing_vectors", "eval_target": 5},
            train={"max_steps": 2},
            eval={"at_end": True},
        )


def test_an_item_that_fails_in_a_loader_worker_is_named_in_one_line(tmp_path):
    """With a loader worker the line said `IndexError: Caught IndexError in DataLoader worker process 0.`
    and went on with the worker's traceback (shown a second and third time by the log's own traceback):
    the error itself is on the line now, as without workers, the traceback once below it."""
    with pytest.raises(TrainingError) as error:
        run(tmp_path, data={"name": "userpkg.edges:failing_vectors", "claimed": 80}, loader={"num_workers": 1})
    assert str(error.value) == (
        "rank 0 failed at step 5 loading its batch: IndexError: index 64 is out of bounds for dimension 0 "
        "with size 64 (in DataLoader worker 0)"
    )
    assert "Original Traceback" in str(error.value.__cause__)  # the worker's traceback, for the log


HELD_FAILURE = """
import sys, torch, yaml
from dist_train.config import from_dict
from dist_train.distributed import DistContext
from dist_train.trainer import TrainingError, train

try:
    train(from_dict(yaml.safe_load(open(sys.argv[1]))), DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single"))
except TrainingError as err:
    held = err  # as a caller or a test runner keeps it: the loop's frames, its loader and worker with it
print("exiting")
"""


def test_a_failed_run_in_process_with_loader_workers_lets_python_exit(tmp_path):
    """train() failed in a caller's process and the caller kept the error: at exit Python terminates the
    loader's still-running worker (SIGTERM from its rank), which ignored it, then waited for it forever
    (the test suite hung after its last test). A worker now ends on its own rank's SIGTERM only."""
    raw = config(tmp_path / "run", data={"name": "userpkg.edges:failing_vectors", "claimed": 80})
    raw["loader"] = {**raw["loader"], "num_workers": 1}
    proc = run_cli([PYTHON, "-c", HELD_FAILURE, str(write_config(tmp_path / "c.yaml", raw))], env=ENV, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "exiting\n", proc.stderr[-2000:]


def test_a_train_split_the_global_batch_does_not_fit_is_said_once_per_node(tmp_path):
    """Every rank meets these alike: one line from the node's local rank 0 (each rank printed its own)."""
    from dist_train.data import build_train_data

    two_ranks = DistContext(0, 0, 2, 2, torch.device("cpu"), None, "single")
    for sections, message in (
        ({"train": {"micro_batch_size": 200}}, "is larger than the train split"),
        ({"loader": {"drop_last": False}, "data": {"n": 250}}, "loader.drop_last=false needs"),
        ({"data": {"name": "userpkg.edges:jittered_vectors", "n": 0}}, "has no `train` split"),
    ):
        with pytest.raises(UserError, match=message) as error:
            build_train_data(from_dict(config(tmp_path, **sections)), two_ranks)
        assert error.value.same_on_every_rank


@pytest.mark.slow
def test_warnings_about_the_config_and_its_checkpoint_are_said_once_per_run(tmp_path):
    """A rule matching no parameter, a resume with another training config, another global batch
    mid-epoch, a checkpoint past train.max_steps: the same on every rank, said by rank 0 (each rank
    printed its own: 2 lines at 2 ranks, 8 per node at 8)."""
    raw = config(tmp_path / "run", train={"max_steps": 4, "micro_batch_size": 16}, checkpoint={"every_steps": 4})
    assert launch(raw, tmp_path, nproc=2, launcher="forked").returncode == 0
    raw = config(tmp_path / "run", train={"max_steps": 2, "micro_batch_size": 24, "lr": 1e-3})
    raw["optim"] = {"param_groups": [{"match": "nothing.*", "lr_scale": 0.5}]}
    proc = launch(raw, tmp_path, nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for warning in (
        "matched no parameter",
        "the training config differs",
        "global batch changed since the checkpoint",
        "past the 2 steps of train.max_steps",
    ):
        assert proc.stderr.count(warning) == 1, (warning, proc.stderr[-3000:])


def int8_weights(path) -> list[torch.Tensor]:
    """The dequantized tensors of an int8 export (packed Linear parameters included)."""

    def flat(value):
        if isinstance(value, (tuple, list)):
            return [t for item in value for t in flat(item)]
        if isinstance(value, torch.Tensor):
            return [value.dequantize() if value.is_quantized else value]
        return []

    return flat(list(torch.load(path, weights_only=True)["state_dict"].values()))


@pytest.mark.parametrize("crash_in", ["quantize", "evaluate_quantized"])
def test_a_crash_before_the_int8_export_completes_is_made_good_by_the_same_command(tmp_path, monkeypatch, crash_in):
    """A run continued to a higher train.max_steps crashes after its last checkpoint, before its int8
    export completed (while quantizing: the int8 model of the earlier end was kept as this one's;
    while evaluating it: its metrics row was never written). The same command again exports both."""
    import dist_train.compress.qat as qat

    sections = {"compress": {"dynamic_quant_export": True}, "checkpoint": {"every_steps": 2}}
    run(tmp_path / "clean", train={"max_steps": 8}, **sections)
    run(tmp_path / "run", train={"max_steps": 4}, **sections)
    original = getattr(qat, crash_in)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here (kill -9, power cut)

    monkeypatch.setattr(qat, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", train={"max_steps": 8}, **sections)
    monkeypatch.setattr(qat, crash_in, original)
    run(tmp_path / "run", train={"max_steps": 8}, **sections)
    clean = int8_weights(tmp_path / "clean" / "model_dynamic_int8.pt")
    for got, expected in zip(int8_weights(tmp_path / "run" / "model_dynamic_int8.pt"), clean, strict=True):
        assert torch.equal(got, expected)
    steps = [r["step"] for r in read_rows(tmp_path / "run") if "eval_loss_dynamic_int8" in r]
    assert steps == [4, 8]


@pytest.mark.parametrize(
    "mode, values", [("min", [float("nan"), 3.0, 2.0, 1.0]), ("max", [float("nan"), 1.0, 2.0, 3.0])]
)
def test_early_stopping_counts_a_nan_first_evaluation_as_no_improvement(tmp_path, mode, values):
    """A NaN first eval_loss became the best value, and every later (improving) one compared false
    against it: the run stopped after `patience` evaluations while the metric improved."""
    from dist_train.state import TrainState

    cfg = from_dict(config(tmp_path, eval={"mode": mode, "every_steps": 2, "early_stopping_patience": 2}))
    state = TrainState()
    assert [state.evals_without_improvement_after(cfg.eval, {"eval_loss": v}) for v in values] == [1, 0, 0, 0]
    assert state.best_metric == values[-1]


@pytest.mark.parametrize("workers", [0, 1])
def test_items_of_several_shapes_are_one_line_at_the_first_batch(tmp_path, workers):
    """Series of 4 and 16 steps cannot be stacked into one micro-batch of 2: the first step failed with
    `RuntimeError: stack expects each tensor to be equal size` (with a loader worker: `Trying to resize
    storage that is not resizable`), status 1 and a traceback."""
    model = {"name": "torch.nn:Linear", "in_features": 1, "out_features": 1}
    raw = config(tmp_path, data={"name": "userpkg.edges:varying_series"}, loader={"num_workers": workers})
    raw.update(model=model, train={**raw["train"], "micro_batch_size": 2, "loss": "mse"})
    with pytest.raises(UserError) as err:
        train(from_dict(raw), SINGLE)
    message = str(err.value)
    assert message.startswith("the train split's items cannot be batched: the first training batch's collation")
    assert "RuntimeError: " in message and "\n" not in message
    assert "items: inputs (4, 1), (16, 1), targets (4, 1), (16, 1)" in message
    assert "give every item of a split the same shape" in message
    assert not (tmp_path / "metrics.jsonl").exists() or not read_rows(tmp_path)


def test_eval_items_of_several_shapes_are_one_line_before_training(tmp_path):
    """The eval split's first batch is collated as the run starts: its series of 4 and 16 steps failed
    the run's evaluation after the last step (status 1), with no final checkpoint nor model.safetensors,
    and again in every run started again."""
    model = {"name": "torch.nn:Linear", "in_features": 1, "out_features": 1}
    raw = config(
        tmp_path,
        data={"name": "userpkg.edges:varying_series", "eval_n": 8},
        eval={"micro_batch_size": 2, "at_end": True},
    )
    raw.update(model=model, train={**raw["train"], "micro_batch_size": 1, "loss": "mse", "max_steps": 2})
    with pytest.raises(UserError) as err:
        train(from_dict(raw), SINGLE)
    message = str(err.value)
    assert message.startswith("the eval split's items cannot be batched: the first eval batch's collation failed")
    assert "items: inputs (4, 1), (16, 1), targets (4, 1), (16, 1)" in message
    assert not (tmp_path / "metrics.jsonl").exists() or not read_rows(tmp_path)
    raw["eval"]["micro_batch_size"] = 1  # one series per batch: nothing to stack
    assert train(from_dict(raw), SINGLE)["status"] == "finished"


def test_a_prefetch_factor_past_an_epochs_batches_prefetches_the_epoch(tmp_path):
    """loader.prefetch_factor=2**62 hung the first step (torch's loader loops prefetch_factor x workers
    times as an epoch starts; 1e7 took 22 s): a factor past the epoch's batches is the epoch's."""
    from dist_train.data import build_eval_data, build_train_data

    cfg = from_dict(config(tmp_path, loader={"num_workers": 1, "prefetch_factor": 2**62}))
    assert build_train_data(cfg, SINGLE).loader.prefetch_factor == 256 // 16
    assert build_eval_data(cfg, SINGLE).loader.prefetch_factor == 64 // 16
    assert train(cfg, SINGLE)["step"] == 12


def _vote_worker(rank: int, init_file: str, out_file: str, after_pause: bool) -> None:
    import signal
    import time

    import torch.distributed as dist

    from dist_train.control import Control

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    control = Control(DistContext(rank, rank, 2, 2, torch.device("cpu"), "gloo", "spawn"), 60.0, 60.0)
    stopped = None
    for step in range(1, 1001):  # steps of microseconds: votes 100 steps apart by step 300
        if control.should_stop():
            stopped = step
            break
        if step == 300:  # an evaluation, during which rank 1 gets a stop signal
            if rank == 1:
                control.signal_received = signal.SIGUSR1
            time.sleep(0.3)
            if after_pause:
                control.vote_after_pause()
    control.finish_vote()
    dist.destroy_process_group()
    Path(out_file).write_text(str(stopped))


def test_a_stop_signal_during_an_evaluation_stops_every_rank_before_the_next_step(tmp_path):
    """The stop vote's interval counts training steps: a signal during an evaluation waited for the
    next vote, up to two intervals away, through more evaluations (2 ranks, 1 s evaluations every 5
    steps: 4-7 s after the signal). The vote right after an evaluation is now waited on at once."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    stopped = {}
    for after_pause in (True, False):
        outs = [tmp_path / f"{after_pause}-{rank}" for rank in range(2)]
        init = tmp_path / f"init-{after_pause}"
        procs = [fork.Process(target=_vote_worker, args=(r, str(init), str(outs[r]), after_pause)) for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        stopped[after_pause] = [int(out.read_text()) for out in outs]
    assert stopped[True] == [301, 301]  # both ranks, at the first boundary after the evaluation
    assert stopped[False][0] == stopped[False][1] > 301  # without the waited vote: later (still together)
