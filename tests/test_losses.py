"""Every loss against torch's reference or a hand-written formula, and the sum/count normalisation
that makes micro-batching and world size invisible to the update."""

import re

import pytest
import torch
import torch.nn.functional as F

from dist_train.errors import UserError
from dist_train.losses import IGNORE_INDEX, build_loss


def mean(loss_name: str, outputs, targets, **kwargs) -> torch.Tensor:
    loss = build_loss(loss_name, **kwargs)
    return loss.sum(outputs, targets) / loss.count(targets)


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen) * 3
    targets = torch.randint(5, (3, 7), generator=gen)
    targets[0, :4] = IGNORE_INDEX
    targets[2, 6] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch_with_ignore_and_label_smoothing(tokens, smoothing):
    logits, targets = tokens
    loss = build_loss("cross_entropy", label_smoothing=smoothing)
    assert loss.count(targets) == 21 - 5  # ignored tokens are not counted
    reference = F.cross_entropy(
        logits.reshape(-1, 5), targets.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=smoothing
    )
    assert mean("cross_entropy", logits, targets, label_smoothing=smoothing) == pytest.approx(float(reference), 1e-6)
    elementwise = loss.elementwise(logits, targets)
    assert elementwise.shape == (21,) and (elementwise[targets.reshape(-1) == IGNORE_INDEX] == 0).all()
    # (B, C) with (B,) the same way
    flat = F.cross_entropy(logits[1], targets[1], label_smoothing=smoothing)
    assert mean("cross_entropy", logits[1], targets[1], label_smoothing=smoothing) == pytest.approx(float(flat), 1e-6)


def test_label_smoothing_by_hand():
    logits, target, eps = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]), 0.2
    log_p = F.log_softmax(logits, dim=-1)[0]
    by_hand = -(1 - eps) * log_p[0] - eps / 3 * log_p.sum()
    assert mean("cross_entropy", logits, target, label_smoothing=eps) == pytest.approx(float(by_hand), 1e-6)


def focal_reference(logits, targets, gamma, alpha=None):
    """Lin et al. 2017 written out directly: mean over kept of -alpha_t (1 - p_t)^gamma log p_t."""
    total, count = 0.0, 0
    for row, target in zip(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1)):
        if target == IGNORE_INDEX:
            continue
        p = torch.softmax(row, dim=0)[target]
        weight = 1.0 if alpha is None else (alpha[target] if isinstance(alpha, list) else alpha)
        total += -weight * (1 - p) ** gamma * torch.log(p)
        count += 1
    return float(total / count)


@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, 0.25), (1.0, [0.1, 0.2, 0.3, 0.2, 0.2]), (0.0, None)])
def test_focal_matches_the_formula(tokens, gamma, alpha):
    logits, targets = tokens
    kwargs = {"gamma": gamma} | ({"alpha": alpha} if alpha is not None else {})
    expected = focal_reference(logits, targets, gamma, alpha)
    assert mean("focal", logits, targets, **kwargs) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [[0.5, 0.5], [0.1] * 6])
def test_focal_alpha_of_another_length_than_the_classes_is_one_line(tokens, alpha):
    """It was an IndexError inside the loss at the first step (exit 1, traceback), or the extra weights
    ignored; eager and compiled alike."""
    loss = build_loss("focal", alpha=alpha)
    for fn in (loss.sum, loss.compiled().sum):
        with pytest.raises(UserError, match=f"alpha for focal has {len(alpha)} weights, but the model outputs 5"):
            fn(*tokens)


def test_focal_with_gamma_zero_is_cross_entropy(tokens):
    logits, targets = tokens
    assert mean("focal", logits, targets, gamma=0.0) == pytest.approx(float(mean("cross_entropy", logits, targets)))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradient_finite_on_confident_predictions(gamma):
    """p_t rounds to 1 in fp32 at a margin of ~20: (1 - p)^gamma with gamma < 1 used to give NaN."""
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    build_loss("focal", gamma=gamma).sum(logits, torch.tensor([0, 2])).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().max() < 1e-6 < logits.grad[1].abs().max()


def test_focal_rejects_negative_gamma():
    with pytest.raises(UserError, match="gamma"):
        build_loss("focal", gamma=-1.0)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("mse", lambda o, t: F.mse_loss(o, t)),
        ("l1", lambda o, t: F.l1_loss(o, t)),
        ("smooth_l1", lambda o, t: F.smooth_l1_loss(o, t, beta=1.0)),
    ],
)
def test_regression_losses_match_torch(name, reference):
    gen = torch.Generator().manual_seed(1)
    outputs, targets = torch.randn(6, 3, generator=gen) * 2, torch.randn(6, 3, generator=gen)
    assert build_loss(name).count(targets) == 18
    assert mean(name, outputs, targets) == pytest.approx(float(reference(outputs, targets)), 1e-6)
    # (B, 1) predictions for (B,) targets are squeezed, not broadcast to (B, B)
    assert mean(name, outputs[:, :1], targets[:, 0]) == pytest.approx(float(reference(outputs[:, 0], targets[:, 0])))
    with pytest.raises(UserError, match="differ in shape"):
        build_loss(name).sum(outputs, targets[:, :2])


def test_smooth_l1_beta_by_hand():
    outputs, targets = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.1, 0.5, 2.0])
    beta = 0.5
    by_hand = [0.5 * 0.1**2 / beta, 0.5 - 0.5 * beta, 2.0 - 0.5 * beta]
    assert build_loss("smooth_l1", beta=beta).elementwise(outputs, targets).tolist() == pytest.approx(by_hand)


@pytest.mark.parametrize("pos_weight", [None, 3.0, [1.0, 2.0, 0.5]])
def test_bce_with_logits_matches_torch(pos_weight):
    gen = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(5, 3, generator=gen), (torch.rand(5, 3, generator=gen) > 0.5).float()
    kwargs = {} if pos_weight is None else {"pos_weight": pos_weight}
    weight = None if pos_weight is None else torch.as_tensor(pos_weight)
    reference = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    assert mean("bce_with_logits", logits, targets, **kwargs) == pytest.approx(float(reference), 1e-6)
    by_hand = -(
        targets * F.logsigmoid(logits) * (1 if weight is None else weight) + (1 - targets) * F.logsigmoid(-logits)
    )
    assert mean("bce_with_logits", logits, targets, **kwargs) == pytest.approx(float(by_hand.mean()), 1e-6)


def test_bce_accuracy_with_column_outputs_and_flat_targets():
    """(B, 1) logits with (B,) labels: one 0/1 per sample, not a (B, B) broadcast."""
    loss = build_loss("bce_with_logits")
    logits, labels = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert loss.correct(logits, labels).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert loss.elementwise(logits, labels).shape == (4,)


def test_cross_entropy_accuracy_skips_ignored(tokens):
    logits, targets = tokens
    correct = build_loss("cross_entropy").correct(logits, targets)
    kept = targets != IGNORE_INDEX
    assert (correct[~kept] == 0).all()
    assert correct[kept].sum() == (logits.argmax(-1) == targets)[kept].sum()


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_sum_over_count_across_micro_batches_equals_one_big_batch(tokens, name):
    """What the trainer does: per micro-batch loss sums, divided by the global count of counted
    elements, add up to the mean over the whole batch, however unevenly ignored tokens fall."""
    logits, targets = tokens
    loss = build_loss(name)
    parts = [(logits[:1], targets[:1]), (logits[1:], targets[1:])]  # 3 and 13 counted elements
    counts = [loss.count(t) for _, t in parts]
    assert counts == [3, 13]
    total = sum(counts)
    combined = sum(loss.sum(o, t) / total for o, t in parts)
    assert float(combined) == pytest.approx(float(loss.sum(logits, targets) / loss.count(targets)), 1e-6)
    naive = sum(loss.sum(o, t) / c for (o, t), c in zip(parts, counts)) / 2  # mean of means: not equal
    assert abs(float(naive) - float(combined)) > 1e-3
    # gradients too: the normalised micro-batch sums give the big batch's gradient
    big = logits.clone().requires_grad_()
    (loss.sum(big, targets) / loss.count(targets)).backward()
    small = logits.clone().requires_grad_()
    for sl in (slice(0, 1), slice(1, 3)):
        (loss.sum(small[sl], targets[sl]) / total).backward()
    assert torch.allclose(big.grad, small.grad, atol=1e-7)


def test_regression_count_is_element_count():
    loss = build_loss("mse")
    outputs, targets = torch.zeros(4, 2), torch.ones(4, 2)
    assert loss.count(targets) == 8 and float(loss.sum(outputs, targets)) == 8.0


def test_loss_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown train.loss"):
        build_loss("hinge")
    with pytest.raises(UserError, match="do not apply"):
        build_loss("mse", label_smoothing=0.1)
    with pytest.raises(UserError, match="do not fit"):
        build_loss("cross_entropy").sum(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_class_ids_of_any_integer_dtype(name, dtype):
    """Class ids stored as int32/int16/uint8: cross entropy refused all but uint8 (a misfit error),
    focal's gather all of them with a traceback at step 1 (status 1). Same loss as int64 ids."""
    loss, logits, targets = build_loss(name), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.equal(loss.sum(logits, targets.to(dtype)), loss.sum(logits, targets))
    assert torch.equal(loss.elementwise(logits, targets.to(dtype)), loss.elementwise(logits, targets))


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_class_id_losses_refuse_float_targets_in_one_line(name):
    """Float class ids (a dataset that stored labels as floats): focal's gather failed at the first
    step with a traceback (status 1), cross entropy with torch's dtype error."""
    loss = build_loss(name)
    for use in (loss.sum, loss.elementwise):  # training and evaluation
        with pytest.raises(UserError, match=f"loss {name}: targets are class ids, got float32 targets"):
            use(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0]))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cross_entropy", {}),
        ("cross_entropy", {"label_smoothing": 0.1}),
        ("focal", {"gamma": 2.0}),
        ("mse", {}),
        ("l1", {}),
        ("smooth_l1", {"beta": 0.5}),
        ("bce_with_logits", {"pos_weight": 2.0}),
    ],
)
def test_training_sum_equals_the_sum_of_the_elementwise_loss(name, kwargs):
    """The loop's loss (torch's fused sum reduction) and evaluation's elementwise loss agree, ignored targets too."""
    torch.manual_seed(0)
    loss = build_loss(name, **kwargs)
    if loss.classification and name != "bce_with_logits":
        outputs, targets = torch.randn(3, 5, 7, requires_grad=True), torch.randint(0, 7, (3, 5))
        targets[0, :2] = -100
    else:
        outputs, targets = torch.randn(6, 1, requires_grad=True), torch.randint(0, 2, (6,)).float()
    fused, reference = loss.sum(outputs, targets), loss.elementwise(outputs, targets).sum()
    assert float(fused) == pytest.approx(float(reference), rel=1e-6)
    (grad_fused,) = torch.autograd.grad(fused, outputs)
    (grad_reference,) = torch.autograd.grad(reference, outputs)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-5, atol=1e-7)


def test_regression_outputs_with_a_trailing_one_must_match_the_targets_once_squeezed():
    """(B, T, 1) outputs against (B, 1) targets used to broadcast to (B, T) silently."""
    loss = build_loss("mse")
    assert loss.sum(torch.zeros(4, 1), torch.ones(4)).item() == 4.0  # (B, 1) for (B,): fine
    with pytest.raises(UserError, match=r"outputs \(4, 8, 1\) and targets \(4, 1\) differ in shape"):
        loss.sum(torch.zeros(4, 8, 1), torch.ones(4, 1))


@pytest.mark.parametrize("name, kwargs", [("cross_entropy", {"label_smoothing": 0.1}), ("mse", {})])
def test_compiled_training_sum_matches_eager_and_keeps_one_line_errors(name, kwargs):
    """train.compile compiles the training loss too (an LM's fp32 log-softmax fused: GPT-2 small on an
    H100 went from 30% to 39% MFU): same value and gradient, and a shape mistake is still a UserError."""
    torch.manual_seed(0)
    eager = build_loss(name, **kwargs)
    compiled = eager.compiled()
    if eager.classification:
        outputs, targets = torch.randn(3, 5, 7, requires_grad=True), torch.randint(0, 7, (3, 5))
        targets[0, :2] = IGNORE_INDEX
        wrong = (torch.randn(3, 7), targets)
    else:
        outputs, targets = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
        wrong = (torch.randn(6, 3), targets)
    value, reference = compiled.sum(outputs, targets), eager.sum(outputs, targets)
    assert float(value) == pytest.approx(float(reference), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(value, outputs)[0], torch.autograd.grad(reference, outputs)[0])
    with pytest.raises(UserError, match="loss"):
        compiled.sum(*wrong)
    assert compiled.elementwise is eager.elementwise  # evaluation stays eager: any batch shape, no recompiles


def test_compile_mode_reaches_the_model_and_the_loss_less_its_cuda_graphs(monkeypatch):
    """train.compile_mode compiles the model in that mode; the loss (whose per-micro-step value the
    loop keeps until the optimizer step) gets the same mode without CUDA graphs."""
    from dist_train.config import from_dict
    from dist_train.transforms import apply_transforms

    modes = []

    def spy(fn, *args, mode=None, **kwargs):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    for mode, loss_mode in (
        ("default", "default"),
        ("reduce-overhead", "default"),
        ("max-autotune", "max-autotune-no-cudagraphs"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ):
        modes.clear()
        cfg = from_dict(
            {
                "run": {"output_dir": "unused"},
                "model": {"name": "mlp"},
                "data": {"name": "synthetic_vectors"},
                "train": {"compile": True, "compile_mode": mode},
            }
        )
        apply_transforms(torch.nn.Linear(2, 2), cfg, ctx=None)
        build_loss("cross_entropy").compiled(cfg.train.compile_mode)
        assert modes == [mode, loss_mode]


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("cross_entropy", {"label_smoothing": 2}, "label_smoothing for cross_entropy must be [0, 1], got 2"),
        ("smooth_l1", {"beta": -1.0}, "beta for smooth_l1 must be >= 0"),
        ("bce_with_logits", {"pos_weight": [1.0, 0.0]}, "pos_weight for bce_with_logits must be > 0"),
        ("focal", {"alpha": "high"}, "alpha must be a number or a list of numbers"),
        # scalar options: a list, a string or null was a TypeError/ValueError traceback (status 1), and
        # gamma NaN trained on NaN losses
        ("cross_entropy", {"label_smoothing": [0.1]}, "label_smoothing must be a number, got [0.1]"),
        ("smooth_l1", {"beta": None}, "beta must be a number, got None"),
        ("focal", {"gamma": [1.0, 2.0]}, "gamma must be a number, got [1.0, 2.0]"),
        ("focal", {"gamma": "abc"}, "gamma must be a number, got 'abc'"),
        ("focal", {"gamma": float("nan")}, "gamma for focal must be >= 0 and finite, got nan"),
        # gamma=.inf zeroed every loss: nothing trained, status 0; pos_weight=.inf made every loss NaN
        ("focal", {"gamma": float("inf")}, "gamma for focal must be >= 0 and finite, got inf"),
        ("bce_with_logits", {"pos_weight": [1.0, float("inf")]}, "pos_weight for bce_with_logits must be > 0 and f"),
        ("smooth_l1", {"beta": float("inf")}, "beta for smooth_l1 must be >= 0 and finite, got inf"),
        ("focal", {"alpha": float("inf")}, "alpha for focal must be >= 0 and finite, got inf"),
        ("focal", {"gamma": 10**400}, "gamma for focal must be >= 0 and finite, got 1000"),  # float() overflows
    ],
)
def test_loss_arguments_out_of_range_are_refused_before_any_batch(name, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_loss(name, **kwargs)


@pytest.mark.parametrize("name, key", [("focal", "alpha"), ("bce_with_logits", "pos_weight")])
def test_a_null_weight_option_is_its_documented_default(tokens, name, key):
    """README: `alpha=null`, `pos_weight=null`; written out (`train.loss_kwargs.alpha=null`) they were
    refused as 'must be a number or a list of numbers, got None'."""
    if name == "bce_with_logits":
        tokens = (tokens[0], (tokens[0] > 0).float())
    torch.testing.assert_close(mean(name, *tokens, **{key: None}), mean(name, *tokens))
