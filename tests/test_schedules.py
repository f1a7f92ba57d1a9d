"""LR schedules beyond the basic four: multi-step decay and reduce-on-plateau (stateful, checkpointed,
identical on every rank)."""

import pytest
import torch
from helpers import ctx_from_env, load_weights, max_abs_diff, read_rows, run_ranks

import dist_train.state as run_state
from dist_train.config import from_dict
from dist_train.distributed import DistContext
from dist_train.errors import UserError
from dist_train.schedules import LRSchedule, lr_at, max_steps_change
from dist_train.trainer import train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")


def cfg_with(schedule, eval_every=1, **train):
    return from_dict(
        {
            "run": {"output_dir": "x"},
            "model": {"name": "mlp"},
            "data": {"name": "d"},
            "train": {"lr": 0.1, "max_steps": 100, **train},
            "schedule": schedule,
            "eval": {"every_steps": eval_every},
        }
    )


def test_multistep_decays_at_each_milestone_after_warmup():
    cfg = cfg_with({"name": "multistep", "warmup_steps": 10, "milestones": [20, 50], "gamma": 0.5})
    assert lr_at(cfg, 0) == pytest.approx(0.01)  # warm-up still applies
    assert lr_at(cfg, 9) == pytest.approx(0.1)
    expected = {10: 0.1, 19: 0.1, 20: 0.05, 49: 0.05, 50: 0.025, 99: 0.025}
    assert {s: lr_at(cfg, s) for s in expected} == pytest.approx(expected)
    # the same curve as torch's MultiStepLR stepped once per optimizer step
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[20, 50], gamma=0.5)
    for step in range(100):
        if step >= 10:
            assert lr_at(cfg, step) == pytest.approx(optimizer.param_groups[0]["lr"]), step
        optimizer.step()
        torch_sched.step()


def test_multistep_milestones_take_integral_floats_like_an_int_key():
    """`milestones: [3e4, 4.5e4]` (numbers in YAML 1.2) were refused as "must be a non-empty list of
    positive steps, got [30000.0, 45000.0]", while an int key takes `train.max_steps=1e5`."""
    cfg = cfg_with({"name": "multistep", "milestones": [2e1, 5e1], "gamma": 0.5})
    assert cfg.schedule.milestones == [20, 50] and all(type(m) is int for m in cfg.schedule.milestones)
    assert lr_at(cfg, 20) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"name": "multistep"}, "schedule.milestones"),
        ({"name": "multistep", "milestones": [30, 20]}, "strictly increasing"),
        ({"name": "multistep", "milestones": [0]}, "positive steps"),
        ({"name": "multistep", "milestones": [10, 20.5]}, r"schedule.milestones\[1\]` must be an integer, got 20.5"),
        ({"name": "multistep", "milestones": [True]}, r"schedule.milestones\[0\]` must be an integer"),
        ({"name": "plateau", "plateau_factor": 1.0}, "plateau_factor"),
        ({"name": "plateau", "plateau_mode": "up"}, "plateau_mode"),
    ],
)
def test_invalid_schedules_are_config_errors(schedule, message):
    with pytest.raises(UserError, match=message):
        cfg_with(schedule)


def test_plateau_needs_periodic_evaluation():
    with pytest.raises(UserError, match="eval.every_steps"):
        cfg_with({"name": "plateau"}, eval_every=None)


METRICS = [1.0, 0.9, 0.95, 0.9, 0.91, 0.92, 0.5, 0.6, 0.55, 0.56, 0.57, 0.58, 0.59, 0.3, 0.31, 0.32, 0.33, 0.34]


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="min", patience=1, factor=0.5, threshold=0.01, cooldown=0, min_lr=0.0),
        dict(mode="min", patience=0, factor=0.3, threshold=1e-4, cooldown=2, min_lr=0.004),
        dict(mode="max", patience=2, factor=0.1, threshold=0.05, cooldown=1, min_lr=0.0),
    ],
)
def test_plateau_follows_torch_reduce_lr_on_plateau(options):
    cfg = cfg_with(
        {"name": "plateau", **{f"plateau_{k}": v for k, v in options.items() if k != "min_lr"}},
        eval_every=1,
    )
    cfg.schedule.min_lr = options["min_lr"]
    ours = LRSchedule(cfg)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **options)
    reductions = 0
    for step, value in enumerate(METRICS):
        state = ours.observe({"eval_loss": value}, step)
        reference.step(value)
        assert ours.lr_at(step + 1) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        reductions = state["reductions"]
    assert reductions >= 2  # the sequence exercises the reductions, not just the happy path
    # the state survives a JSON round trip (TrainState.lr_schedule) and continues identically
    restored = LRSchedule(cfg, __import__("json").loads(__import__("json").dumps(state)))
    assert restored.state == ours.state


def test_plateau_a_nan_first_evaluation_is_no_improvement_as_in_torch():
    cfg = cfg_with({"name": "plateau", "plateau_patience": 1, "plateau_factor": 0.5}, eval_every=1)
    ours = LRSchedule(cfg)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
    for step, value in enumerate([float("nan"), 1.0, 0.9, 0.8, 0.7, 0.6]):  # improving after a NaN start
        ours.observe({"eval_loss": value}, step)
        reference.step(value)
        assert ours.lr_at(step + 1) == optimizer.param_groups[0]["lr"] == cfg.train.lr, step  # was halved at 2


def test_plateau_resumed_watching_another_metric_counts_afresh():
    """A plateau checkpoint whose best is an eval_loss of 0.686, resumed watching eval_accuracy (max):
    accuracies 0.59, 0.62, 0.65 were each compared with that loss, and the LR was cut at the second."""
    state = LRSchedule(cfg_with({"name": "plateau"})).observe({"eval_loss": 0.686, "eval_accuracy": 0.5}, 2)
    accuracy = {"name": "plateau", "plateau_patience": 1, "plateau_metric": "eval_accuracy", "plateau_mode": "max"}
    resumed = LRSchedule(cfg_with(accuracy, loss="cross_entropy"), state)
    for step, value in ((4, 0.59), (6, 0.62), (8, 0.65)):
        assert resumed.observe({"eval_loss": 0.6, "eval_accuracy": value}, step)["bad_evals"] == 0
    assert resumed.lr_at(9) == 0.1 and resumed.state.best == 0.65


def test_plateau_warmup_still_ramps():
    cfg = cfg_with({"name": "plateau", "warmup_steps": 4})
    schedule = LRSchedule(cfg, {"scale": 0.5})
    assert [schedule.lr_at(s) for s in range(5)] == pytest.approx([0.0125, 0.025, 0.0375, 0.05, 0.05])


@pytest.mark.parametrize("name", ["constant", "step", "multistep", "cosine"])
def test_a_plateau_checkpoints_scale_does_not_carry_into_another_schedule(name):
    """A plateau run's checkpoint (scale 0.25) resumed with another schedule: its LR is the configured
    schedule's. The stale scale applied (constant, step, multistep; the warm-up of every schedule),
    and as that schedule saves no state, the same run started again from its own next checkpoint
    trained at the full LR: interrupted and uninterrupted runs differed."""
    cfg = cfg_with({"name": name, "warmup_steps": 2, "milestones": [50]})
    resumed = LRSchedule(cfg, {"scale": 0.25, "best": 1.0, "bad_evals": 1, "reductions": 2})
    assert [resumed.lr_at(s) for s in (0, 1, 10)] == pytest.approx([lr_at(cfg, s) for s in (0, 1, 10)])
    assert resumed.lr_at(10) == pytest.approx(0.1 if name != "cosine" else lr_at(cfg, 10))
    assert resumed.state_dict() == {}


def test_unknown_plateau_metric_is_a_user_error():
    """Refused with the config, before any step trains: the loss says which metrics an evaluation has."""
    with pytest.raises(UserError, match="plateau_metric='eval_bleu' is not a metric of train.loss=cross_entropy"):
        cfg_with({"name": "plateau", "plateau_metric": "eval_bleu"})
    # plateau_metric unset follows eval.metric: the key the user set is the one named (it named plateau_metric)
    with pytest.raises(UserError, match="^eval.metric='eval_bleu' is not a metric of train.loss=cross_entropy"):
        from_dict(
            {
                "run": {"output_dir": "x"},
                "model": {"name": "mlp"},
                "data": {"name": "d"},
                "schedule": {"name": "plateau"},
                "eval": {"every_steps": 1, "metric": "eval_bleu"},
            }
        )


# --- in the training loop ---------------------------------------------------------------------------


def plateau_raw(output_dir, **sections):
    # threshold 0.9: no evaluation ever counts as an improvement after the first, so the decisions
    # are known in advance: reductions after the evals at steps 6, 10 (patience 1), then min_lr holds.
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 4},
        "model": {"name": "mlp", "hidden_dim": 32, "dropout": 0.1},
        "data": {"name": "synthetic_vectors", "num_samples": 256, "eval_samples": 32},
        "train": {"max_steps": 16, "micro_batch_size": 8, "lr": 1e-2},
        "schedule": {
            "name": "plateau",
            "warmup_steps": 3,
            "plateau_patience": 1,
            "plateau_threshold": 0.9,
            "min_lr": 1e-4,
        },
        "eval": {"every_steps": 2},
        "checkpoint": {"every_steps": 8, "keep_last": 5},
        "log": {"every_steps": 1, "plot": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


class Crash(BaseException):
    pass


def _stable(rows):
    keep = {"step", "loss", "lr", "grad_norm", "eval_loss", "eval_accuracy"}
    return [{k: v for k, v in r.items() if k in keep} for r in rows if "resumed_from" not in r]


def test_plateau_state_resumes_exactly(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(from_dict(plateau_raw(reference)), SINGLE)
    lrs = [r["lr"] for r in read_rows(reference) if "lr" in r]
    peak = 1e-2
    expected = [peak / 3, 2 * peak / 3, peak, peak, peak, peak] + [1e-3] * 4 + [1e-4] * 6
    assert lrs == pytest.approx(expected, rel=1e-9)

    # interrupted right after the step-8 checkpoint: one bad evaluation is pending, scale is 0.1
    original = run_state.save

    def save_then_crash(cfg, ctx, control, strategy, state, *args):
        result = original(cfg, ctx, control, strategy, state, *args)
        if state.step == 8:
            raise Crash
        return result

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(run_state, "save", save_then_crash)
        with pytest.raises(Crash):
            train(from_dict(plateau_raw(interrupted)), SINGLE)
    manifest = __import__("json").loads((interrupted / "checkpoints/step-00000008/manifest.json").read_text())
    assert manifest["trainer"]["lr_schedule"]["scale"] == pytest.approx(0.1)
    assert manifest["trainer"]["lr_schedule"]["bad_evals"] == 1
    train(from_dict(plateau_raw(interrupted)), SINGLE)
    rows = read_rows(interrupted)
    resumed_at = rows.index({"resumed_from": "step-00000008", "step": 8})
    assert _stable(rows[resumed_at + 1 :]) == _stable([r for r in read_rows(reference) if r["step"] > 8])
    assert max_abs_diff(load_weights(reference), load_weights(interrupted)) == 0.0  # bit-exact


def _record_lrs(rank, world, output_dir, micro):
    from dist_train.schedules import LRSchedule

    seen = []
    original = LRSchedule.lr_at

    def recording(self, step):
        lr = original(self, step)
        seen.append(lr)
        return lr

    LRSchedule.lr_at = recording
    raw = plateau_raw(
        output_dir,
        train={"micro_batch_size": micro, "lr": 5e-2, "max_steps": 24},
        schedule={"plateau_patience": 0, "plateau_threshold": 0.02, "plateau_factor": 0.5, "min_lr": 0.0},
        eval={"every_steps": 1},
        model={"dropout": 0.0},
        checkpoint={"every_steps": None},
    )
    try:
        train(from_dict(raw), ctx_from_env() if world > 1 else SINGLE)
    finally:
        LRSchedule.lr_at = original
    return seen


@pytest.mark.slow
def test_plateau_changes_the_lr_at_the_same_step_on_every_rank(tmp_path):
    two = run_ranks(_record_lrs, 2, str(tmp_path / "two"), 4)
    one = _record_lrs(0, 1, str(tmp_path / "one"), 8)  # same global batch on one rank
    assert two[0] == two[1]  # every rank applied the same LR at every step
    assert two[0] == pytest.approx(one, rel=1e-12)  # and the decisions match one rank's exact evaluation
    assert len(set(two[0][3:])) >= 3, two[0]  # at least two reductions happened, driven by the metric


def test_a_resume_with_another_max_steps_says_how_a_decaying_lr_moves(tmp_path, caplog):
    """A cosine run finished at step 5 (LR 0 there), resumed with train.max_steps=10: step 6 trained at
    LR 1.24e-4, the schedule stretched to the new end, without a word (max_steps is not in the config
    hash). The run and `check` now say it; a constant schedule, or the same max_steps, says nothing."""
    import contextlib
    import io
    import json

    from dist_train.cli import main
    from dist_train.config import dump_yaml

    def raw(max_steps, name="cosine"):
        return {
            "run": {"output_dir": str(tmp_path / "run"), "seed": 4},
            "model": {"name": "mlp", "hidden_dim": 16},
            "data": {"name": "synthetic_vectors", "num_samples": 64},
            "train": {"max_steps": max_steps, "micro_batch_size": 8, "lr": 1e-3},
            "schedule": {"name": name},
            "log": {"every_steps": 1, "plot": False},
        }

    assert train(from_dict(raw(5)), SINGLE)["step"] == 5
    said = "train.max_steps changed from 5 to 10: the cosine schedule now decays to step 10, so step 6 trains at LR "
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(from_dict(raw(10))))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["check", str(path), "--json"]) == 0
    assert [w for w in json.loads(out.getvalue())["warnings"] if said in w]
    caplog.set_level("WARNING", logger="dist_train")
    assert train(from_dict(raw(10)), SINGLE)["step"] == 10
    (warning,) = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    lr = [r["lr"] for r in read_rows(tmp_path / "run") if r.get("step") == 6 and "lr" in r][0]
    assert warning.endswith(f"{lr:.3g}, where the run that wrote the checkpoint went on at 0")
    assert max_steps_change(from_dict(raw(10, "constant")), 5, 5) is None
    assert max_steps_change(from_dict(raw(10)), 10, 5) is None
