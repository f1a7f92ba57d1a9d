"""`model.init`: schemes change the weights' statistics as documented, the key is not a factory
argument, and every rank of every strategy starts from the same weights."""

import math

import pytest
import torch
from helpers import ctx_from_env, run_ranks

from dist_train.config import from_dict, to_dict
from dist_train.models import build_model
from dist_train.models.weight_init import init_weights
from dist_train.rng import seed_everything
from dist_train.strategies import REGISTRY

WIDTH = 512


def initialised(scheme, **kwargs):
    torch.manual_seed(0)
    model = build_model("mlp", {"input_dim": WIDTH, "hidden_dim": WIDTH, "depth": 2})
    init_weights(model, scheme, **kwargs)
    return model


@pytest.mark.parametrize(
    "scheme, kwargs, expected_std",
    [
        ("default", {}, 1 / math.sqrt(3 * WIDTH)),  # torch's Linear: kaiming_uniform(a=sqrt(5))
        ("kaiming", {}, math.sqrt(2 / WIDTH)),  # He: sqrt(2 / fan_in)
        ("xavier", {}, math.sqrt(2 / (2 * WIDTH))),  # Glorot: sqrt(2 / (fan_in + fan_out))
        ("normal", {"std": 0.05}, 0.05),
    ],
)
def test_scheme_sets_the_weight_std(scheme, kwargs, expected_std):
    weight = initialised(scheme, **kwargs).blocks[1][0].weight
    assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert weight.mean().item() == pytest.approx(0.0, abs=0.05 * expected_std + 1e-3)


def test_schemes_differ_and_zero_the_biases():
    kaiming, xavier = initialised("kaiming"), initialised("xavier")
    assert kaiming.blocks[1][0].weight.std() > 1.3 * xavier.blocks[1][0].weight.std()
    assert all(not p.any() for n, p in kaiming.named_parameters() if n.endswith("bias"))
    assert initialised("default").blocks[0][0].bias.abs().sum() > 0  # default keeps the factory's biases


def test_kaiming_reads_the_fan_in_of_hugging_face_conv1d_weights():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 128, "n_layer": 1, "n_head": 2}
    model = build_model("hf_causal_lm", {"config": config})
    init_weights(model, "kaiming")
    mlp = model.hf.transformer.h[0].mlp  # c_fc: 128 -> 512, weight (128, 512); c_proj: 512 -> 128
    assert mlp.c_fc.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.03)
    assert mlp.c_proj.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.03)


def test_norm_scales_and_embedding_padding_row_are_kept():
    torch.manual_seed(0)
    model = build_model("rnn_classifier", {"vocab_size": 20, "num_classes": 3})
    init_weights(model, "normal", 0.5)
    assert model.embed.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert not model.embed.weight[model.embed.padding_idx].any()
    torch.manual_seed(0)
    resnet = build_model("resnet", {"widths": [4, 8], "num_classes": 3})
    init_weights(resnet, "kaiming")
    norm_scales = [p for n, p in resnet.named_parameters() if p.dim() == 1 and not n.endswith("bias")]
    assert norm_scales and all(torch.equal(p, torch.ones_like(p)) for p in norm_scales)


def test_init_keys_are_typed_not_factory_arguments():
    raw = {
        "run": {"output_dir": "x"},
        "model": {"name": "mlp", "init": "normal", "init_std": "1e-2", "hidden_dim": 8},
        "data": {"name": "d"},
    }
    cfg = from_dict(raw)
    assert (cfg.model.init, cfg.model.init_std, cfg.model.kwargs) == ("normal", 0.01, {"hidden_dim": 8})
    assert to_dict(cfg)["model"] == {"name": "mlp", "init": "normal", "init_std": 0.01, "hidden_dim": 8}
    with pytest.raises(Exception, match="model.init"):
        from_dict({**raw, "model": {"name": "mlp", "init": "orthogonal"}})


MODEL = {"name": "cnn", "channels": [4, 8], "num_classes": 3, "init": "xavier"}
SEED = 11


def _weights_after_setup(rank, world, output_dir, strategy):
    """Each rank's view right after the strategy wrapped the model: rank 0's consolidated weights and
    every rank's forward output on a fixed batch. Training stops there."""
    import dist_train.build as building
    from dist_train.trainer import train

    class Stop(Exception):
        pass

    captured = {}
    build = building.build_strategy

    def capture(cfg, ctx):
        strategy_obj = build(cfg, ctx)
        setup = strategy_obj.setup

        def setup_then_stop(model):
            setup(model)
            captured["state"] = strategy_obj.full_state_dict()  # collective
            strategy_obj.model.eval()
            with torch.no_grad():
                inputs = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(ctx.device)
                captured["outputs"] = strategy_obj.model(inputs).float().cpu()
            raise Stop

        strategy_obj.setup = setup_then_stop
        return strategy_obj

    building.build_strategy = capture
    raw = {
        "run": {"output_dir": output_dir, "seed": SEED},
        "model": MODEL,
        "data": {"name": "synthetic_images", "num_classes": 3, "image_size": 8, "num_samples": 64},
        "train": {"max_steps": 1, "micro_batch_size": 4},
        "strategy": {"name": strategy},
        "log": {"plot": False},
    }
    try:
        train(from_dict(raw), ctx_from_env())
    except Stop:
        pass
    finally:
        building.build_strategy = build
    return captured


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed", "fsdp"])
def test_every_rank_of_every_strategy_starts_from_the_same_initialised_weights(tmp_path, strategy):
    if strategy not in REGISTRY:
        pytest.skip(f"strategy {strategy} is not registered yet")
    results = run_ranks(_weights_after_setup, 2, str(tmp_path / "run"), strategy)
    seed_everything(SEED)
    reference = build_model("cnn", {k: v for k, v in MODEL.items() if k not in ("name", "init")})
    plain = {k: v.clone() for k, v in reference.state_dict().items()}
    init_weights(reference, "xavier")
    expected = reference.state_dict()
    assert not torch.equal(plain["blocks.1.conv.weight"], expected["blocks.1.conv.weight"])  # init changed them
    state = results[0]["state"]
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value.float() if value.is_floating_point() else value), key
    with torch.no_grad():
        reference_out = reference.eval()(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    for rank, result in enumerate(results):
        assert torch.allclose(result["outputs"], reference_out, atol=1e-6), rank
