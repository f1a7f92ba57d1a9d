"""The model zoo: every family builds from its example config, ignores padding where it should,
stays causal where it should, and learns its synthetic task on 2 ranks."""

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO_ROOT, read_rows, run_ranks

from dist_train.config import load_config
from dist_train.data import REGISTRY as DATA_REGISTRY
from dist_train.data import build_dataset
from dist_train.errors import UserError
from dist_train.imports import resolve
from dist_train.losses import build_loss
from dist_train.models import REGISTRY as MODEL_REGISTRY
from dist_train.models import build_model
from dist_train.transforms import find_blocks

ZOO_CONFIGS = ["cnn", "lstm", "tcn", "transformer_classifier"]


@pytest.mark.parametrize("name", ZOO_CONFIGS)
def test_example_config_builds_and_runs_a_batch(name):
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml", ["data.num_samples=64", "data.eval_samples=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.kwargs)
    dataset = build_dataset(cfg.data.name, "train", cfg.data.kwargs)
    inputs, targets = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    loss_fn = build_loss(cfg.train.loss)
    loss = loss_fn.sum(model(inputs), targets) / loss_fn.count(targets)
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < 20
    assert len(find_blocks(model)) >= 2, "repeated blocks must be found for checkpointing / FSDP"
    assert all(p.grad is not None for p in model.parameters())
    assert build_dataset(cfg.data.name, "eval", cfg.data.kwargs) is not None


def _readme_arguments(header: str) -> dict[str, str]:
    """name -> its `arguments (defaults)` cell, from the README table under `header`."""
    lines = (REPO_ROOT / "README.md").read_text().split(header, 1)[1].splitlines()[2:]
    rows = itertools.takewhile(lambda line: line.startswith("| `"), lines)
    return {row.split("`")[1]: row.rstrip(" |").rsplit(" | ", 1)[1] for row in rows}


@pytest.mark.parametrize(
    "registry, header",
    [
        (MODEL_REGISTRY, "| name | what | input -> output | arguments (defaults) |"),
        (DATA_REGISTRY, "| name | items | arguments (defaults) |"),
    ],
)
def test_readme_lists_every_factory_argument_with_its_default(registry, header):
    """The README's model and dataset tables are the factories' reference: every argument, its default."""
    import inspect
    import re

    documented = _readme_arguments(header)
    assert set(documented) == set(registry)
    for name in registry:
        pairs = dict(re.findall(r"(\w+)=([^\s`]+)", " ".join(re.findall(r"`([^`]*)`", documented[name]))))
        for param in inspect.signature(resolve(name, registry, "factory")).parameters.values():
            if param.name == "split" or param.default is None and param.name in ("widths", "channels"):
                continue  # the split, and list defaults written out ([16,32,64]) in place of null
            if param.default is inspect.Parameter.empty:
                assert f"`{param.name}` (required)" in documented[name], (name, param.name)
                continue
            default = param.default
            assert param.name in pairs, f"README: {name} does not list `{param.name}` (default {default!r})"
            if isinstance(default, float):
                assert float(pairs[param.name]) == default, (name, param.name)
            else:
                assert pairs[param.name] == yaml.safe_dump(default).removesuffix("...\n").strip(), (name, param.name)


def test_every_zoo_model_takes_dropout():
    import inspect

    for name in MODEL_REGISTRY:
        if name.startswith("hf_"):
            continue  # needs transformers: tests/test_hf.py
        assert "dropout" in inspect.signature(resolve(name, MODEL_REGISTRY, "model")).parameters, name
    for name in ("synthetic_sequences", "synthetic_series", "hf"):
        assert name in DATA_REGISTRY


def test_cnn_batch_norm_option():
    with_bn = build_model("cnn", {"channels": [4, 8]})
    without = build_model("cnn", {"channels": [4, 8], "batch_norm": False})
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert with_bn(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(UserError):
        build_model("cnn", {"kernel_size": 4})
    with pytest.raises(UserError, match="non-empty list"):  # [] used to mean the default [32, 64]
        build_model("cnn", {"channels": []})
    with pytest.raises(UserError, match="pool_every must be >= 0"):
        build_model("cnn", {"pool_every": -1})


def _padded(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("rnn_classifier", {"cell": "lstm", "num_layers": 2, "bidirectional": True}),
        ("rnn_classifier", {"cell": "gru", "bidirectional": True}),
        ("rnn_classifier", {"cell": "rnn"}),
        ("transformer_classifier", {"pooling": "mean"}),
        ("transformer_classifier", {"pooling": "cls"}),
    ],
)
def test_sequence_classifiers_ignore_padding(name, kwargs):
    """A sequence's logits are the same alone and in a batch padded far beyond its length."""
    torch.manual_seed(0)
    model = build_model(name, {"vocab_size": 20, "num_classes": 3, **kwargs}).eval()
    rows = [[5, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [7]]
    batch = model(_padded(rows, 20))
    for i, row in enumerate(rows):
        alone = model(_padded([row], len(row)))
        assert torch.allclose(batch[i], alone[0], atol=1e-5), (i, batch[i], alone[0])
    # and the padding is not simply ignored everywhere: the content matters
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_transformer_classifier_masks_leading_padding_too():
    """Left padding: the pad tokens in front are neither attended to nor pooled (position 0 is
    forced visible only in a row of padding alone)."""
    torch.manual_seed(0)
    model = build_model("transformer_classifier", {"vocab_size": 16, "max_len": 8, "d_model": 16, "n_heads": 2}).eval()
    tokens = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        before = model(tokens)
        model.tok_emb.weight[0].normal_()  # the pad embedding changes: only the all-padding row may notice
        after = model(tokens)
    torch.testing.assert_close(before[0], after[0])
    assert torch.isfinite(after).all() and not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_classifier_logits_do_not_depend_on_left_padding(pooling):
    """Padding in front shifted the real tokens' position embeddings: a left-padded sequence's logits
    changed with the amount of padding, though README says they do not depend on it."""
    torch.manual_seed(0)
    kwargs = {"vocab_size": 16, "max_len": 8, "d_model": 16, "n_heads": 2, "pooling": pooling}
    model = build_model("transformer_classifier", kwargs).eval()
    alone = model(torch.tensor([[5, 6, 7]]))
    padded = model(torch.tensor([[0, 0, 0, 5, 6, 7], [0, 5, 6, 7, 0, 0], [5, 6, 7, 0, 0, 0]]))
    torch.testing.assert_close(padded, alone.expand(3, -1))


def test_transformer_classifier_names_sequences_longer_than_max_len():
    model = build_model("transformer_classifier", {"vocab_size": 16, "max_len": 8, "d_model": 16, "n_heads": 2})
    with pytest.raises(UserError, match=r"sequences of 9 tokens are longer than model.max_len \(8\)"):
        model(torch.ones(2, 9, dtype=torch.long))  # a config mistake: one line and status 2, not a traceback


def test_transformer_lm_names_a_fix_for_sequences_longer_than_seq_len_that_works_for_every_dataset():
    """It said `set data.seq_len <= model.seq_len`: with `data.name: hf` (block_size 128, model.seq_len 64)
    following it failed again (dataset 'hf': got an unexpected keyword argument 'seq_len')."""
    model = build_model("transformer_lm", {"vocab_size": 16, "seq_len": 8, "d_model": 16, "n_heads": 2})
    with pytest.raises(UserError, match=r"sequences of 9 tokens are longer than model.seq_len \(8\)") as err:
        model(torch.ones(2, 9, dtype=torch.long))
    assert "raise model.seq_len" in str(err.value) and "data.block_size for hf" in str(err.value)


def test_transformer_lm_low_precision_residual_carries_the_stream_in_autocasts_dtype():
    """low_precision_residual: under bf16 autocast every block reads and returns a bf16 stream (fp32 by
    default); without autocast nothing changes, bit for bit; the loss stays within bf16's rounding."""
    kwargs = {"vocab_size": 32, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 2}
    torch.manual_seed(0)
    plain = build_model("transformer_lm", kwargs)
    low = build_model("transformer_lm", {**kwargs, "low_precision_residual": True})
    low.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 32, (4, 16))
    dtypes = {}
    for name, model in (("plain", plain), ("low", low)):
        seen = dtypes[name] = []
        for block in model.blocks:
            block.register_forward_hook(
                lambda _, inputs, output, seen=seen: seen.append((inputs[0].dtype, output.dtype))
            )
    assert torch.equal(plain(tokens), low(tokens))  # fp32: the option does nothing
    assert dtypes["plain"] == dtypes["low"] == [(torch.float32, torch.float32)] * 2
    dtypes["plain"].clear(), dtypes["low"].clear()
    with torch.autocast("cpu", torch.bfloat16):
        exact, rounded = plain(tokens, targets=tokens), low(tokens, targets=tokens)
    assert dtypes["plain"] == [(torch.float32, torch.float32)] * 2
    assert dtypes["low"] == [(torch.bfloat16, torch.bfloat16)] * 2
    assert not torch.equal(exact, rounded)  # the stream was rounded ...
    assert rounded.item() == pytest.approx(exact.item(), rel=1e-2)  # ... by bf16's precision, no more
    rounded.backward()  # and it trains: every parameter gets a finite gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in low.parameters())
    with torch.device("meta"):  # `dist-train check` estimates activations with a forward on the meta device
        meta = build_model("transformer_lm", {**kwargs, "low_precision_residual": True})
        assert meta(torch.zeros(4, 16, dtype=torch.long)).shape == (4, 16, 32)


@pytest.mark.parametrize("name", ["transformer_lm", "transformer_classifier"])
@pytest.mark.parametrize("kwargs", [{"n_heads": -2}, {"n_heads": 0}, {"n_layers": -1}, {"d_model": -4, "n_heads": -2}])
def test_transformers_refuse_sizes_below_one(name, kwargs):
    """n_heads=-2 divides d_model: the model was built and its first forward failed (status 1, a traceback)."""
    with pytest.raises(UserError, match=rf"{name}: .* must be >= 1 and n_layers >= 0"):
        build_model(name, kwargs)


@pytest.mark.parametrize("kwargs", [{"widths": []}, {"widths": [4, 0]}, {"blocks_per_stage": -1}, {"in_channels": 0}])
def test_resnet_refuses_empty_or_non_positive_sizes(kwargs):
    """widths=[] silently trained the default [16, 32, 64]; blocks_per_stage=-1 a ResNet without blocks."""
    with pytest.raises(UserError, match="resnet: widths must be a non-empty list"):
        build_model("resnet", kwargs)


def test_rnn_classifier_rejects_unknown_cell():
    with pytest.raises(UserError, match="unknown cell"):
        build_model("rnn_classifier", {"cell": "transformer"})


def test_tcn_is_causal_with_the_documented_receptive_field():
    torch.manual_seed(0)
    model = build_model("tcn", {"input_dim": 2, "num_outputs": 3, "num_levels": 3, "pooling": "none"}).eval()
    x = torch.randn(1, 40, 2)
    changed = x.clone()
    changed[0, 5] += 1.0
    diff = (model(changed) - model(x)).abs().sum(dim=-1)[0]  # (T,)
    assert diff[:5].max() == 0  # no output before step 5 sees it
    field = model.receptive_field  # 1 + 2 (k - 1) (2^levels - 1) = 29
    assert field == 29
    assert diff[5] > 0 and diff[5 + field - 1] > 0  # seen from step 5 to 5 + field - 1 ...
    assert diff[5 + field :].max() == 0  # ... and not after
    assert build_model("tcn", {"vocab_size": 10, "input_dim": 8})(torch.randint(10, (2, 12))).shape == (2, 1)


def test_synthetic_sequences_label_is_the_majority_group():
    dataset = build_dataset("synthetic_sequences", "train", {"vocab_size": 11, "num_classes": 3, "num_samples": 300})
    tokens, labels = dataset.tensors
    lengths = (tokens != 0).sum(1)
    assert lengths.min() >= 4 and lengths.max() <= 32 and len(set(lengths.tolist())) > 10
    for row, label, length in zip(tokens, labels, lengths):
        assert (row[length:] == 0).all() and (row[:length] > 0).all()  # right-padded
        counts = torch.bincount((row[:length] - 1) % 3, minlength=3)
        assert int(label) == int(counts.argmax())
    assert set(labels.tolist()) == {0, 1, 2}
    eval_tokens = build_dataset("synthetic_sequences", "eval", {"vocab_size": 11, "num_classes": 3}).tensors[0]
    assert not torch.equal(eval_tokens[:10], tokens[:10])


def test_synthetic_series_targets():
    values = build_dataset("synthetic_series", "train", {"seq_len": 10, "num_samples": 50})
    x, y = values.tensors
    assert x.shape == (50, 10, 2) and y.shape == (50, 1)
    assert (x[:, :, 1].sum(1) == 2).all()
    assert torch.allclose((x[:, :, 0] * x[:, :, 1]).sum(1, keepdim=True), y)
    freq = build_dataset("synthetic_series", "train", {"task": "frequency", "num_classes": 3, "noise": 0.0})
    x, y = freq.tensors
    spectrum = torch.fft.rfft(x[:, :, 0], dim=1).abs()  # 32 steps: class c has 2 (c + 1) periods
    assert torch.equal(spectrum.argmax(dim=1), 2 * (y + 1))
    # 10 classes over 32 steps: class 8 (18 periods) sampled 32 times is class 6 (14 periods) with
    # another phase; the task was generated with classes no model could tell apart
    with pytest.raises(UserError, match=r"num_classes <= seq_len / 4 .* got num_classes=10 with seq_len=32"):
        build_dataset("synthetic_series", "train", {"task": "frequency", "num_classes": 10, "seq_len": 32})
    assert build_dataset("synthetic_series", "train", {"task": "frequency", "num_classes": 8}) is not None


def _run_config(output_dir: Path, model: dict, data: dict, loss: str, lr: float, steps: int = 25) -> dict:
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "model": model,
        "data": {"num_samples": 512, "eval_samples": 128, **data},
        "train": {"max_steps": steps, "micro_batch_size": 8, "lr": lr, "loss": loss, "grad_clip_norm": 1.0},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }


SEQ_DATA = {"name": "synthetic_sequences", "vocab_size": 16, "num_classes": 3, "max_len": 16}
SEQ_MODEL = {"vocab_size": 16, "num_classes": 3, "embed_dim": 16, "hidden_dim": 32}
RUNS = {  # name: (model, data, loss, lr)
    "cnn": (
        {"name": "cnn", "in_channels": 3, "num_classes": 4, "channels": [8, 16]},
        {"name": "synthetic_images", "num_classes": 4, "image_size": 8},
        "cross_entropy",
        3e-3,
    ),
    "lstm": ({"name": "rnn_classifier", "cell": "lstm", **SEQ_MODEL}, SEQ_DATA, "cross_entropy", 1e-2),
    "gru_bidirectional_2_layers": (
        {"name": "rnn_classifier", "cell": "gru", "bidirectional": True, "num_layers": 2, **SEQ_MODEL},
        SEQ_DATA,
        "cross_entropy",
        1e-2,
    ),
    "rnn_bidirectional": (
        {"name": "rnn_classifier", "cell": "rnn", "bidirectional": True, **SEQ_MODEL},
        SEQ_DATA,
        "cross_entropy",
        1e-2,
    ),
    "tcn_adding_regression": (
        {"name": "tcn", "input_dim": 2, "num_outputs": 1, "channels": 16, "num_levels": 3},
        {"name": "synthetic_series", "task": "adding", "seq_len": 16},
        "mse",
        3e-3,
    ),
    "tcn_frequency_classification": (
        {"name": "tcn", "input_dim": 1, "num_outputs": 4, "channels": 16, "num_levels": 3, "pooling": "mean"},
        {"name": "synthetic_series", "task": "frequency", "seq_len": 16, "num_classes": 4},
        "cross_entropy",
        1e-2,
    ),
    "transformer_classifier": (
        {"name": "transformer_classifier", "vocab_size": 16, "num_classes": 3, "max_len": 16, "d_model": 32,
         "n_heads": 2},
        SEQ_DATA,
        "cross_entropy",
        3e-3,
    ),
}  # fmt: skip


def train_configs(rank: int, world_size: int, configs: list[dict]) -> None:
    """Train each config in turn on the ranks of one run_ranks call (one process start for all)."""
    from helpers import ctx_from_env

    from dist_train.config import from_dict
    from dist_train.trainer import train

    for config in configs:
        assert train(from_dict(config), ctx_from_env())["status"] == "finished"


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory) -> Path:
    """Every RUNS entry trained for 25 steps on 2 gloo ranks (DDP), each into its own folder."""
    root = tmp_path_factory.mktemp("zoo")
    run_ranks(train_configs, 2, [_run_config(root / name, *RUNS[name]) for name in RUNS])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_loss_falls_on_two_ranks(zoo_runs, name):
    rows = read_rows(zoo_runs / name)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    final = rows[-1]
    print(f"{name}: loss {first:.3f} -> {last:.3f}, eval {final}")
    assert last < 0.8 * first, (first, last)
    assert final["eval_loss"] < 0.8 * first
    if "eval_accuracy" in final:  # 3 or 4 classes: chance is 1/3 or 1/4
        assert final["eval_accuracy"] > 0.55
