"""Per-module learning rates and weight decay (`optim.param_groups`): rule resolution, the groups every
strategy's optimizer holds, and their effect on the trained weights."""

import logging

import pytest
import torch
from helpers import ctx_from_env, load_weights, run_ranks

from dist_train.config import from_dict
from dist_train.distributed import DistContext
from dist_train.errors import UserError
from dist_train.models import build_model
from dist_train.optim import resolve_param_groups
from dist_train.rng import seed_everything
from dist_train.schedules import lr_at
from dist_train.strategies import REGISTRY
from dist_train.trainer import train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")
RULES = [
    {"match": "head.*", "lr_scale": 0.0, "weight_decay": 0.0},  # frozen by a zero scale
    {"match": r"re:^blocks\.0\.", "lr_scale": 2.0},  # decay by the default rule
    {"match": "*.bias", "lr_scale": 0.5, "weight_decay": 0.1},  # a rule's decay applies to biases too
]


def raw_config(output_dir, strategy="ddp", **sections):
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 6},
        "model": {"name": "mlp", "hidden_dim": 16, "depth": 3},
        "data": {"name": "synthetic_vectors", "num_samples": 256, "eval_samples": 0},
        "train": {"max_steps": 5, "micro_batch_size": 8, "lr": 1e-2},
        "optim": {"weight_decay": 0.05, "param_groups": RULES},
        "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.2},
        "strategy": {"name": strategy},
        "checkpoint": {"every_steps": None, "at_end": False},
        "log": {"every_steps": 5, "plot": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_rules_resolve_first_match_wins_with_default_decay_rule(caplog):
    model = build_model("mlp", {"hidden_dim": 16, "depth": 3})
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        resolved = resolve_param_groups(model, 0.05, RULES + [{"match": "nothing.*"}])
    table = [(label, group.get("lr_scale", 1.0), group["weight_decay"], names) for label, group, names in resolved]
    assert table == [
        ("rule 0 `head.*`", 0.0, 0.0, ["head.weight", "head.bias"]),
        ("rule 1 `re:^blocks\\.0\\.`", 2.0, 0.05, ["blocks.0.0.weight"]),
        ("rule 1 `re:^blocks\\.0\\.`", 2.0, 0.0, ["blocks.0.0.bias"]),  # default rule inside a rule: no decay on 1-D
        ("rule 2 `*.bias`", 0.5, 0.1, ["blocks.1.0.bias", "blocks.2.0.bias"]),
        ("default", 1.0, 0.05, ["blocks.1.0.weight", "blocks.2.0.weight"]),
    ]
    assert "optim.param_groups[3]" in caplog.text and "matched no parameter" in caplog.text


def test_no_rules_keeps_the_two_default_groups():
    model = build_model("mlp", {"hidden_dim": 16})
    resolved = resolve_param_groups(model, 0.01)
    assert [(g["weight_decay"], "lr_scale" in g) for _, g, _ in resolved] == [(0.01, False), (0.0, False)]


def test_pruned_and_compiled_names_match_the_bare_names():
    from torch.nn.utils import prune

    model = build_model("mlp", {"hidden_dim": 16, "depth": 3})
    prune.identity(model.head, "weight")  # head.weight -> head.weight_orig
    resolved = resolve_param_groups(model, 0.05, RULES)
    assert resolved[0][2] == ["head.bias", "head.weight"]


def test_a_batchnorm_fused_by_qat_is_matched_by_its_own_name():
    """compress.qat fuses each cnn block's BatchNorm into its conv (`blocks.0.conv.bn.weight`): a rule on
    the BatchNorm's own name, the one model.safetensors holds, matched nothing (a warning), and a rule
    on the conv took the BatchNorm's parameters too."""
    from dist_train.compress.qat import prepare_qat_model

    model = build_model("cnn", {"channels": [8, 16]})
    prepare_qat_model(model, "x86")
    rules = [{"match": "blocks.*.norm.*", "lr_scale": 0.0}, {"match": "blocks.0.conv.*", "lr_scale": 2.0}]
    resolved = resolve_param_groups(model, 0.05, rules)
    assert [(label, names) for label, _, names in resolved[:2]] == [
        ("rule 0 `blocks.*.norm.*`", ["blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.1.norm.weight",
                                     "blocks.1.norm.bias"]),
        ("rule 1 `blocks.0.conv.*`", ["blocks.0.conv.weight"]),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"match": "head.*", "lr": 0.1}], r"unknown key `lr` in `optim.param_groups\[0\]`"),
        ([{"lr_scale": 0.1}], "needs `match`"),
        ([{"match": "re:(unclosed"}], "bad regular expression"),
        # re raises OverflowError for it, which was a traceback with status 1
        ([{"match": "re:a{4294967296}"}], "bad regular expression .*: the repetition number is too large"),
        ([{"match": "head.*", "lr_scale": -1}], "lr_scale"),
        (["head.*"], "must be a mapping"),
    ],
)
def test_invalid_rules_are_config_errors(rules, message):
    with pytest.raises(UserError, match=message):
        from_dict(raw_config("x", optim={"param_groups": rules}))


def test_numeric_spellings_are_accepted():
    cfg = from_dict(raw_config("x", optim={"param_groups": [{"match": "head.*", "lr_scale": "1e-1"}]}))
    assert cfg.optim.param_groups[0]["lr_scale"] == 0.1


def _run_and_read_groups(rank, world, output_dir, strategy):
    """Train a few steps; return the (lr, lr_scale, weight_decay) of every group the optimizer holds."""
    import dist_train.build as building

    captured = {}
    build = building.build_strategy

    def capture(cfg, ctx):
        captured["strategy"] = build(cfg, ctx)
        return captured["strategy"]

    building.build_strategy = capture
    try:
        train(from_dict(raw_config(output_dir, strategy)), ctx_from_env() if world > 1 else SINGLE)
    finally:
        building.build_strategy = build
    groups = captured["strategy"].optimizer.param_groups
    return [value for g in groups for value in (g["lr"], g.get("lr_scale", 1.0), g["weight_decay"])]


def _expected_groups():
    cfg = from_dict(raw_config("x"))
    model = build_model("mlp", {"hidden_dim": 16, "depth": 3})
    last_lr = lr_at(cfg, cfg.train.max_steps - 1)
    assert last_lr > 0
    resolved = resolve_param_groups(model, cfg.optim.weight_decay, cfg.optim.param_groups)
    scales = [(g.get("lr_scale", 1.0), g["weight_decay"]) for _, g, _ in resolved]
    return [value for scale, decay in scales for value in (last_lr * scale, scale, decay)]  # flat: lr, scale, decay


def test_optimizer_holds_our_group_lrs_and_the_rules_act_on_the_weights(tmp_path):
    groups = _run_and_read_groups(0, 1, tmp_path / "run", "ddp")
    assert groups == pytest.approx(_expected_groups(), rel=1e-12)
    # lr_scale 0 froze the head; the other layers moved
    seed_everything(6)
    initial = build_model("mlp", {"hidden_dim": 16, "depth": 3}).state_dict()
    final = load_weights(tmp_path / "run")
    assert torch.equal(final["head.weight"], initial["head.weight"])
    assert torch.equal(final["head.bias"], initial["head.bias"])
    assert not torch.equal(final["blocks.0.0.weight"], initial["blocks.0.0.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed", "fsdp"])
def test_every_strategy_holds_our_group_lrs_at_two_ranks(tmp_path, strategy):
    if strategy not in REGISTRY:
        pytest.skip(f"strategy {strategy} is not registered yet")
    results = run_ranks(_run_and_read_groups, 2, str(tmp_path / "run"), strategy)
    expected = _expected_groups()
    for rank_groups in results:
        assert rank_groups == pytest.approx(expected, rel=1e-12)


def test_resolved_groups_are_printed_with_names_and_sizes(caplog):
    from dist_train.optim import build_optimizer

    cfg = from_dict(raw_config("x"))
    with caplog.at_level(logging.INFO, logger="dist_train"):
        build_optimizer(cfg, build_model("mlp", {"hidden_dim": 16, "depth": 3}))
    assert (
        "group 0 (rule 0 `head.*`): lr x0, weight_decay 0, 2 tensors, 68 elements: head.weight, head.bias"
        in caplog.text
    )
    assert "group 4 (default): lr x1, weight_decay 0.05, 2 tensors, 512 elements" in caplog.text
