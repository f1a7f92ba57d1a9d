"""Activation checkpointing (transforms.enable_grad_checkpointing): same gradients, less memory
saved for backward, and the same training under DDP."""

import copy

import pytest
import torch
from helpers import load_weights, max_abs_diff, run_ranks, tiny_lm_config

from dist_train.errors import UserError
from dist_train.losses import build_loss
from dist_train.models import build_model
from dist_train.transforms import enable_grad_checkpointing

CASES = {
    "transformer_lm": (
        {"vocab_size": 50, "seq_len": 24, "d_model": 32, "n_layers": 3, "n_heads": 2, "dropout": 0.1},
        lambda: (torch.randint(50, (3, 24)), torch.randint(50, (3, 24))),
    ),
    "transformer_classifier": (
        {"vocab_size": 20, "d_model": 32, "n_heads": 2, "n_layers": 3, "dropout": 0.1},
        lambda: (_padded_tokens(20), torch.randint(2, (4,))),
    ),
    "rnn_classifier": (
        {"vocab_size": 20, "cell": "lstm", "num_layers": 3, "bidirectional": True, "dropout": 0.1},
        lambda: (_padded_tokens(20), torch.randint(2, (4,))),
    ),
    "tcn": (
        {"input_dim": 2, "num_outputs": 3, "num_levels": 3, "dropout": 0.1},
        lambda: (torch.randn(4, 20, 2), torch.randint(3, (4,))),
    ),
    "cnn": (
        {"channels": [4, 8, 8], "num_classes": 3, "dropout": 0.1},
        lambda: (torch.randn(4, 3, 8, 8), torch.randint(3, (4,))),
    ),
}


def _padded_tokens(vocab: int) -> torch.Tensor:
    tokens = torch.randint(1, vocab, (4, 12))
    for row, length in enumerate([12, 3, 7, 1]):
        tokens[row, length:] = 0
    return tokens


def _gradients(model: torch.nn.Module, inputs, targets, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # same dropout masks in both runs (checkpoint replays the RNG state)
    model.zero_grad()
    build_loss("cross_entropy").sum(model(inputs), targets).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_with_and_without(name):
    kwargs, batch = CASES[name]
    torch.manual_seed(0)
    plain = build_model(name, kwargs).train()
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed) >= 3
    inputs, targets = batch()
    expected, got = _gradients(plain, inputs, targets), _gradients(checkpointed, inputs, targets)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, worst
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-3  # the gradients are not all ~0
    with torch.no_grad():  # running statistics moved once per step in both: same eval outputs
        assert torch.allclose(plain.eval()(inputs), checkpointed.eval()(inputs), atol=1e-6)


def test_batchnorm_running_statistics_updated_once():
    kwargs, batch = CASES["cnn"]
    torch.manual_seed(0)
    plain = build_model("cnn", kwargs).train()
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed)
    inputs, targets = batch()
    _gradients(plain, inputs, targets), _gradients(checkpointed, inputs, targets)
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers()):
        assert torch.equal(a, b), name


def saved_for_backward_bytes(model: torch.nn.Module, inputs, targets) -> int:
    """Bytes of the distinct storages autograd saves for backward during forward + loss."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # views of one storage count once
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = build_loss("cross_entropy").sum(model(inputs), targets)
    loss.backward()  # saved tensors stay alive until here: no address is reused while counting
    return sum(storages.values())


def test_transformer_lm_activation_memory_falls_at_least_2x_at_1024_tokens():
    torch.manual_seed(0)
    plain = build_model("transformer_lm", {"vocab_size": 64, "seq_len": 1024, "d_model": 64, "n_layers": 4})
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed)
    inputs, targets = torch.randint(64, (1, 1024)), torch.randint(64, (1, 1024))
    without, with_ = (
        saved_for_backward_bytes(plain, inputs, targets),
        saved_for_backward_bytes(checkpointed, inputs, targets),
    )
    print(f"saved for backward: {without / 2**20:.1f} MiB -> {with_ / 2**20:.1f} MiB ({without / with_:.1f}x)")
    assert without >= 2 * with_
    # the checkpointed model still saves each block's input: 4 x (1, 1024, 64) fp32 at least
    assert with_ >= 4 * 1024 * 64 * 4


def test_every_k_covers_every_kth_block_and_models_without_blocks_fail():
    model = build_model("transformer_lm", {"n_layers": 4, "d_model": 32, "n_heads": 2})
    assert enable_grad_checkpointing(model, every=2) == 2
    with pytest.raises(UserError, match="blocks"):
        enable_grad_checkpointing(torch.nn.Linear(3, 3))


class _SharedBlocks(torch.nn.Module):
    """One block applied at every depth (ALBERT-style weight sharing): its ModuleList holds it twice."""

    def __init__(self):
        super().__init__()
        block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.inp, self.blocks, self.head = (
            torch.nn.Linear(4, 8),
            torch.nn.ModuleList([block, block]),
            torch.nn.Linear(8, 3),
        )

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_a_block_shared_across_depth_is_wrapped_once():
    """The shared block was wrapped per mention: checkpointing failed at step 1 (AttributeError:
    'functools.partial' object has no attribute '__self__') and FSDP2 refused a second fully_shard."""
    from dist_train.config import from_dict
    from dist_train.distributed import DistContext
    from dist_train.strategies import build_strategy

    torch.manual_seed(0)
    plain = _SharedBlocks()
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed) == 1
    inputs, targets = torch.randn(5, 4), torch.randint(3, (5,))
    expected, got = _gradients(plain, inputs, targets), _gradients(checkpointed, inputs, targets)
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6
    raw = {"run": {"output_dir": "unused"}, "model": {"name": "mlp"}, "data": {"name": "synthetic_vectors"}}
    cfg = from_dict({**raw, "strategy": {"name": "fsdp"}})
    strategy = build_strategy(cfg, DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single"))
    try:
        strategy.setup(checkpointed)
        build_loss("cross_entropy").sum(strategy.model(inputs), targets).backward()
        assert strategy.full_state_dict().keys() == plain.state_dict().keys()
    finally:
        strategy.teardown()


def test_hf_model_gradients_equal_with_checkpointing():
    pytest.importorskip("transformers")
    config = {
        "model_type": "gpt2",
        "vocab_size": 40,
        "n_positions": 32,
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 2,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    torch.manual_seed(0)
    plain = build_model("hf_causal_lm", {"config": config, "dropout": 0.0}).train()
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed) == -1  # the Hugging Face path
    flag = (
        "is_activation_checkpointing"
        if hasattr(plain.hf, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(checkpointed.hf, flag) and not getattr(plain.hf, flag)
    inputs, targets = torch.randint(40, (2, 32)), torch.randint(40, (2, 32))
    expected, got = _gradients(plain, inputs, targets), _gradients(checkpointed, inputs, targets)
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6
    # and it does recompute: less is saved for backward
    assert saved_for_backward_bytes(checkpointed, inputs, targets) < 0.7 * saved_for_backward_bytes(
        plain, inputs, targets
    )


def _train_with_and_without(rank: int, world_size: int, configs: list[dict]) -> int:
    """Train each config; return how many checkpointed block calls ran (forward passes, all configs)."""
    from helpers import ctx_from_env

    import dist_train.transforms as transforms
    from dist_train.config import from_dict
    from dist_train.trainer import train

    calls = []
    original = transforms.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    transforms.checkpoint = counting_checkpoint
    for config in configs:
        train(from_dict(config), ctx_from_env())
    return len(calls)


@pytest.mark.slow
def test_ddp_two_ranks_same_weights_with_checkpointing(tmp_path):
    configs = [
        tiny_lm_config(tmp_path / f"ckpt-{flag}", train={"grad_checkpointing": flag}, model={"dropout": 0.1})
        for flag in (False, True)
    ]
    calls = run_ranks(_train_with_and_without, 2, configs)
    assert calls == [10 * 2 * 2] * 2  # 10 steps x 2 micro-batches x 2 blocks, on each rank (eval: no grad)
    plain, checkpointed = load_weights(tmp_path / "ckpt-False"), load_weights(tmp_path / "ckpt-True")
    assert max_abs_diff(plain, checkpointed) <= 1e-5  # dropout 0.1: checkpoint replays the RNG state


def test_compiled_checkpointed_blocks_have_no_graph_break():
    """Under train.compile the bookkeeping of the eager recompute (a list appended to) was a side effect
    inside the checkpoint region: one graph break per block, which then ran uncompiled (with dropout 0.1
    and Inductor, compile + checkpointing trained other masks than compile alone: gradients 4.2 apart)."""
    from torch._dynamo.utils import counters

    kwargs, batch = CASES["transformer_lm"]
    torch.manual_seed(0)
    plain = build_model("transformer_lm", {**kwargs, "dropout": 0.0}).train()
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed)
    torch._dynamo.reset()
    counters.clear()
    checkpointed.compile(dynamic=False, backend="aot_eager")  # the transform order: compile after checkpointing
    inputs, targets = batch()
    expected, got = _gradients(plain, inputs, targets), _gradients(checkpointed, inputs, targets)
    assert dict(counters["graph_break"]) == {}
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6


class _BreakingBatchNormBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        torch._dynamo.graph_break()  # the block runs eagerly under compile: the recompute must keep the buffers
        return torch.relu(self.norm(self.linear(x)))


def test_compiled_batchnorm_block_with_a_graph_break_moves_running_stats_once():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([_BreakingBatchNormBlock(), _BreakingBatchNormBlock()])
    model.forward = lambda x: model.blocks[1](model.blocks[0](x))
    enable_grad_checkpointing(model)
    torch._dynamo.reset()
    model.compile(backend="aot_eager")
    model(torch.randn(8, 4)).sum().backward()
    assert [int(block.norm.num_batches_tracked) for block in model.blocks] == [1, 1]
