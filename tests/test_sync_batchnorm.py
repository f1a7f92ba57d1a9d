"""SyncBatchNorm on 2 gloo ranks against torch's BatchNorm in one process on the concatenated batch.

One `run_ranks` launch runs every case; the parent computes the single-process references and compares.
The loss is (out * G).sum() with a fixed random G: rank r uses its slice of G, so the sum of the rank
losses is the reference loss. Input grads then compare slice by slice, and the reference weight/bias
grads equal the SUM over ranks of the rank-local ones (see the module docstring for why DDP's average
of those is the gradient of a mean loss over the global batch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from torch import Tensor, nn

from dist_train.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

TOLERANCE = 1e-5
CHANNELS = 3
BATCHNORM_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass
class Case:
    """One comparison: full-batch inputs per training step, split across 2 ranks by `split`."""

    xs: list[Tensor]
    grads: list[Tensor]
    x_eval: Tensor
    split: tuple[int, int]
    momentum: float | None
    init: dict[str, Tensor]


def _make_case(
    seed: int, shape: tuple[int, ...], split: tuple[int, int], momentum: float | None = 0.1, steps: int = 1
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    full = (sum(split), CHANNELS, *shape)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen)

    # Non-zero means and non-default init, so that a wrong mean, scale or buffer update shows up.
    init = {
        "weight": 1 + 0.5 * randn(CHANNELS),
        "bias": randn(CHANNELS),
        "running_mean": 0.1 * randn(CHANNELS),
        "running_var": 0.5 + torch.rand(CHANNELS, generator=gen),
    }
    xs = [2 * randn(*full) + 1.5 for _ in range(steps)]
    return Case(xs, [randn(*full) for _ in range(steps)], 2 * randn(*full) + 1.5, split, momentum, init)


CASES = {
    "1d_nc": _make_case(0, (), (4, 4)),
    "1d_ncl": _make_case(1, (5,), (4, 4)),
    "2d": _make_case(2, (4, 4), (4, 4)),
    "3d": _make_case(3, (3, 3, 3), (4, 4)),
    "unequal_3_5": _make_case(4, (4, 4), (3, 5)),
    "empty_rank": _make_case(5, (4, 4), (0, 6)),
    "momentum_none_3_steps": _make_case(6, (4, 4), (4, 4), momentum=None, steps=3),
}


def _rank_slice(tensor: Tensor, split: tuple[int, int], rank: int) -> Tensor:
    return tensor[sum(split[:rank]) : sum(split[: rank + 1])]


def _build(bn_cls: type[nn.Module], case: Case, **kwargs) -> nn.Module:
    bn = bn_cls(CHANNELS, momentum=case.momentum, **kwargs)
    with torch.no_grad():
        for name, value in case.init.items():
            getattr(bn, name).copy_(value)
    return bn


def _train_and_eval(bn: nn.Module, xs: list[Tensor], grads: list[Tensor], x_eval: Tensor, calls: list) -> dict:
    """Train steps with loss (out * grad).sum(), then one eval forward; record tensors and all-reduce counts."""
    record: dict[str, list] = defaultdict(list)
    bn.train()
    for x, grad in zip(xs, grads):
        x = x.clone().requires_grad_(True)
        before = len(calls)
        out = bn(x)
        record["forward_all_reduces"].append(len(calls) - before)
        before = len(calls)
        (out * grad).sum().backward()
        record["backward_all_reduces"].append(len(calls) - before)
        record["out"].append(out.detach())
        record["grad_input"].append(x.grad)
        record["grad_weight"].append(bn.weight.grad.clone())
        record["grad_bias"].append(bn.bias.grad.clone())
        bn.weight.grad = bn.bias.grad = None
        record["running_mean"].append(bn.running_mean.clone())
        record["running_var"].append(bn.running_var.clone())
        record["num_batches_tracked"].append(bn.num_batches_tracked.clone())
    bn.eval()
    before = len(calls)
    with torch.no_grad():
        record["eval_out"].append(bn(x_eval))
    record["eval_all_reduces"].append(len(calls) - before)
    return dict(record)


def _rank_fn(rank: int, world_size: int, cases: dict[str, Case]) -> dict:
    calls: list[int] = []
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return original_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce  # the module looks it up at call time, so this counts its collectives
    try:
        results = {}
        for name, case in cases.items():
            xs = [_rank_slice(x, case.split, rank) for x in case.xs]
            grads = [_rank_slice(g, case.split, rank) for g in case.grads]
            x_eval = _rank_slice(case.x_eval, case.split, rank)
            results[name] = _train_and_eval(_build(SyncBatchNorm, case), xs, grads, x_eval, calls)
    finally:
        dist.all_reduce = original_all_reduce
    results["bf16"] = _bf16_forward_backward(SyncBatchNorm, _rank_slice(BF16_X, (4, 4), rank), rank)
    # A one-rank group must make the layer local: it would sync over the world if process_group were ignored.
    own_group = [dist.new_group([r]) for r in range(world_size)][rank]
    local_x = _rank_slice(cases["2d"].xs[0], cases["2d"].split, rank)
    with torch.no_grad():
        results["own_group_out"] = _build(SyncBatchNorm, cases["2d"], process_group=own_group)(local_x)
    return results


# bf16 activations far from zero (conv outputs of unnormalised images): a mean rounded to bf16 before
# the subtraction would be off by up to |mean| / 256, about 0.1 standard deviations here.
BF16_X = torch.randn(8, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(7)) + 50


def _bf16_forward_backward(bn_cls: type[nn.Module], x: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Output and input gradient of a training forward under bf16 autocast (rank None: the whole batch)."""
    grad = torch.randn(BF16_X.shape, generator=torch.Generator().manual_seed(8))
    grad = grad if rank is None else _rank_slice(grad, (4, 4), rank)
    x = x.bfloat16().requires_grad_(True)  # a bf16 conv's output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn_cls(CHANNELS)(x)
    (out.float() * grad).sum().backward()
    return out.detach(), x.grad


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_ranks(_rank_fn, 2, CASES)


def _max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _diffs_to_reference(case: Case, ranks: list[dict]) -> dict[str, float]:
    """Max abs differences between the ranks' records of `case` and torch's BatchNorm on the full batch."""
    reference_bn = _build(BATCHNORM_BY_DIM[case.xs[0].dim()], case)
    reference = _train_and_eval(reference_bn, case.xs, case.grads, case.x_eval, [])
    diffs: dict[str, float] = defaultdict(float)
    for step in range(len(case.xs)):
        for key in ("out", "grad_input"):
            for rank, result in enumerate(ranks):
                expected = _rank_slice(reference[key][step], case.split, rank)
                diffs[key] = max(diffs[key], _max_diff(result[key][step], expected))
        for key in ("grad_weight", "grad_bias"):  # the all-reduce SUM of the rank-local parameter grads
            summed = sum(result[key][step] for result in ranks)
            diffs[key] = max(diffs[key], _max_diff(summed, reference[key][step]))
        for key in ("running_mean", "running_var"):
            for result in ranks:
                diffs[key] = max(diffs[key], _max_diff(result[key][step], reference[key][step]))
        for result in ranks:
            assert result["num_batches_tracked"][step].item() == step + 1
    for rank, result in enumerate(ranks):
        expected = _rank_slice(reference["eval_out"][0], case.split, rank)
        diffs["eval_out"] = max(diffs["eval_out"], _max_diff(result["eval_out"][0], expected))
    return dict(diffs)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_batchnorm(rank_results: list[dict], name: str) -> None:
    diffs = _diffs_to_reference(CASES[name], [result[name] for result in rank_results])
    print(f"{name}: " + ", ".join(f"{key}={value:.2e}" for key, value in diffs.items()))
    assert max(diffs.values()) < TOLERANCE, diffs


def test_eval_uses_running_stats_without_collectives(rank_results: list[dict]) -> None:
    case = CASES["2d"]
    for rank, result in enumerate(rank_results):
        reference_bn = nn.BatchNorm2d(CHANNELS).eval()
        with torch.no_grad():
            reference_bn.weight.copy_(case.init["weight"])
            reference_bn.bias.copy_(case.init["bias"])
            reference_bn.running_mean.copy_(result["2d"]["running_mean"][-1])
            reference_bn.running_var.copy_(result["2d"]["running_var"][-1])
            expected = reference_bn(_rank_slice(case.x_eval, case.split, rank))
        diff = _max_diff(result["2d"]["eval_out"][0], expected)
        print(f"eval rank {rank}: out={diff:.2e}")
        assert diff < TOLERANCE
        assert all(result[name]["eval_all_reduces"] == [0] for name in CASES)


def test_one_all_reduce_per_forward_and_one_per_backward(rank_results: list[dict]) -> None:
    for result in rank_results:
        for name, case in CASES.items():
            steps = len(case.xs)
            assert result[name]["forward_all_reduces"] == [1] * steps, name
            assert result[name]["backward_all_reduces"] == [1] * steps, name


def test_bf16_autocast_normalises_in_float32_like_torch(rank_results: list[dict]) -> None:
    """Under bf16 autocast (DDP's bf16) the two ranks give torch's single-process BatchNorm, which
    normalises bf16 inputs in float32, to bf16 rounding of the result."""
    out, grad_input = _bf16_forward_backward(nn.BatchNorm2d, BF16_X)
    for rank, result in enumerate(rank_results):
        rank_out, rank_grad = result["bf16"]
        assert rank_out.dtype == rank_grad.dtype == torch.bfloat16
        out_diff = _max_diff(rank_out.float(), _rank_slice(out, (4, 4), rank).float())
        grad_diff = _max_diff(rank_grad.float(), _rank_slice(grad_input, (4, 4), rank).float())
        print(f"bf16 rank {rank}: out={out_diff:.2e}, grad_input={grad_diff:.2e}")
        assert out_diff <= 0.02 and grad_diff <= 0.02  # one bf16 step of |out| < 4 (0.125 and 0.03 before)


def test_process_group_is_respected(rank_results: list[dict]) -> None:
    case = CASES["2d"]
    for rank, result in enumerate(rank_results):
        local_x = _rank_slice(case.xs[0], case.split, rank)
        with torch.no_grad():
            expected = _build(nn.BatchNorm2d, case)(local_x)
        diff = _max_diff(result["own_group_out"], expected)
        print(f"own group rank {rank}: out={diff:.2e}")
        assert diff < TOLERANCE


PAIR_CASES = ("2d", "unequal_3_5")


def _pair_group_rank_fn(rank: int, world_size: int, cases: dict[str, Case]) -> dict:
    """Ranks {0, 1} and {2, 3} normalise over their own pair, each pair on a different case."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, pair_rank = divmod(rank, 2)
    case = cases[PAIR_CASES[pair]]
    xs = [_rank_slice(x, case.split, pair_rank) for x in case.xs]
    grads = [_rank_slice(g, case.split, pair_rank) for g in case.grads]
    x_eval = _rank_slice(case.x_eval, case.split, pair_rank)
    return _train_and_eval(_build(SyncBatchNorm, case, process_group=groups[pair]), xs, grads, x_eval, [])


def test_pairs_of_ranks_normalise_within_their_process_group() -> None:
    results = run_ranks(_pair_group_rank_fn, 4, {name: CASES[name] for name in PAIR_CASES})
    for pair, name in enumerate(PAIR_CASES):
        diffs = _diffs_to_reference(CASES[name], results[2 * pair : 2 * pair + 2])
        print(f"pair group {name}: " + ", ".join(f"{key}={value:.2e}" for key, value in diffs.items()))
        assert max(diffs.values()) < TOLERANCE, diffs


def test_without_distributed_it_is_plain_batchnorm() -> None:
    case = CASES["3d"]
    ours = _train_and_eval(_build(SyncBatchNorm, case), case.xs, case.grads, case.x_eval, [])
    reference = _train_and_eval(_build(nn.BatchNorm3d, case), case.xs, case.grads, case.x_eval, [])
    for key in ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var", "eval_out"):
        assert torch.equal(ours[key][0], reference[key][0]), key


@pytest.mark.parametrize("shape", [(4,), (2, 3, 2, 2, 2, 2)])
def test_rejects_unsupported_input_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        SyncBatchNorm(CHANNELS)(torch.randn(*shape))


def test_convert_sync_batchnorm_replaces_and_keeps_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=1e-3, momentum=None)),
        nn.ModuleDict({"deep": nn.Sequential(nn.BatchNorm3d(2, affine=False), nn.BatchNorm2d(4, bias=False))}),
    )
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
            if module.weight is not None:
                module.weight.data.uniform_(0.5, 1.5)
    model[1].bias.requires_grad_(False)
    model[2][1].eval()
    before = {name: (tensor.clone(), tensor.requires_grad) for name, tensor in model.state_dict(keep_vars=True).items()}
    old_types = {name: type(module) for name, module in model.named_modules()}
    old_modes = {name: module.training for name, module in model.named_modules()}
    old_config = {
        name: (module.eps, module.momentum, module.affine, module.track_running_stats)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }

    converted = convert_sync_batchnorm(model, "cpu")

    new_modules = dict(converted.named_modules())
    assert set(new_modules) == set(old_types)
    assert {name for name, module in new_modules.items() if isinstance(module, SyncBatchNorm)} == set(old_config)
    assert not any(
        isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) for module in new_modules.values()
    )
    for name, module in new_modules.items():
        assert module.training == old_modes[name], name
        if name in old_config:
            assert (module.eps, module.momentum, module.affine, module.track_running_stats) == old_config[name]
    after = converted.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].requires_grad == requires_grad, name
    assert converted[3]["deep"][1].bias is None
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(3), "cpu"), SyncBatchNorm)


class _ScaledBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own buffer and forward."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_buffer("scale", torch.full((num_features,), 2.0))

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * self.scale.view(1, -1, 1, 1)


class _DefaultsBatchNorm(nn.BatchNorm1d):
    """A subclass that only changes defaults: nothing for the conversion to drop."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-3)


def test_convert_refuses_a_subclass_whose_forward_or_state_it_would_drop() -> None:
    """Converted to a plain SyncBatchNorm, the subclass lost its `scale` buffer (gone from
    model.safetensors) and its forward (outputs halved), without a word."""
    from dist_train.errors import UserError

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(_ScaledBatchNorm(4)))
    for device_type in ("cpu", "cuda"):  # torch's converter drops them as well
        with pytest.raises(
            UserError,
            match=r"replaces 1\.0 \(_ScaledBatchNorm, a subclass of BatchNorm2d\).*drop its forward and `scale`",
        ):
            convert_sync_batchnorm(model, device_type)
    converted = convert_sync_batchnorm(nn.Sequential(_DefaultsBatchNorm(4)), "cpu")
    assert isinstance(converted[0], SyncBatchNorm) and converted[0].eps == 1e-3


def test_convert_replaces_torchs_sync_batchnorm_off_cuda() -> None:
    """A model that holds torch's SyncBatchNorm kept it: DDP on CPU refused it at setup (ValueError:
    SyncBatchNorm layers only work with GPU modules, a traceback and status 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, momentum=None))
    model[1].running_mean.uniform_(-1, 1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, "cpu")
    assert isinstance(converted[1], SyncBatchNorm) and converted[1].momentum is None
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert type(convert_sync_batchnorm(nn.SyncBatchNorm(4), "cuda")) is nn.SyncBatchNorm
