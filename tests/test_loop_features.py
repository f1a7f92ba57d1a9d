"""Loop features in one process: early stopping, epochs, bf16 autocast on CPU, SGD, clip by value."""

import contextlib
import io
import json

import pytest
import torch
from helpers import load_weights, read_rows

from dist_train.cli import main
from dist_train.config import dump_yaml, from_dict
from dist_train.distributed import DistContext
from dist_train.trainer import train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")


def raw(output_dir, **sections):
    config = {
        "run": {"output_dir": str(output_dir), "seed": 4},
        "model": {"name": "mlp", "hidden_dim": 32},
        "data": {"name": "synthetic_vectors", "num_samples": 256, "eval_samples": 64},
        "train": {"max_steps": 40, "micro_batch_size": 16, "lr": 1e-2},
        "checkpoint": {"every_steps": None, "at_end": False},
        "log": {"every_steps": 1, "plot": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return from_dict(config)


def check_warnings(tmp_path, cfg) -> list[str]:
    """`dist-train check --json` on `cfg`: its warnings."""
    path, out = tmp_path / "check.yaml", io.StringIO()
    path.write_text(dump_yaml(cfg))
    with contextlib.redirect_stdout(out):
        assert main(["check", str(path), "--json"]) == 0
    return json.loads(out.getvalue())["warnings"]


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    # min_delta larger than any possible gain: only the first evaluation counts as an improvement
    cfg = raw(
        tmp_path, eval={"every_steps": 2, "early_stopping_patience": 3, "min_delta": 100.0}, log={"every_steps": 3}
    )
    assert train(cfg, SINGLE) == {"status": "early_stopped", "step": 8}
    evals = [r["step"] for r in read_rows(tmp_path) if "eval_loss" in r]
    assert evals == [2, 4, 6, 8]
    # the last step gets its row, as a run's last step at train.max_steps does: steps 7-8 are not lost
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6, 8] and rows[-1]["samples_per_s"] > 0
    assert (tmp_path / "model.safetensors").exists()


def test_an_early_stopped_run_started_again_stays_stopped(tmp_path):
    """The same command again (a requeue, a re-submitted script) finds the stop in the checkpoint."""
    sections = {"eval": {"every_steps": 2, "early_stopping_patience": 3, "min_delta": 100.0}}
    sections["checkpoint"] = {"every_steps": None, "at_end": True}
    assert train(raw(tmp_path, **sections), SINGLE) == {"status": "early_stopped", "step": 8}
    rows, weights = read_rows(tmp_path), load_weights(tmp_path)
    assert train(raw(tmp_path, **sections), SINGLE) == {"status": "early_stopped", "step": 8}
    assert read_rows(tmp_path) == [*rows, {"resumed_from": "step-00000008", "step": 8}]
    assert all(torch.equal(weights[k], v) for k, v in load_weights(tmp_path).items())


def test_an_early_stopped_run_given_more_steps_says_why_it_trains_none(tmp_path, caplog):
    """train.max_steps raised from 40 to 80 on a run early-stopped at step 8: the run trained nothing,
    reported 'training ... 8 steps (from 8)' and no reason, and `check` warned of nothing. Both now name
    the early stop and the patience to raise."""
    sections = {"eval": {"every_steps": 2, "early_stopping_patience": 3, "min_delta": 100.0}}
    sections["checkpoint"] = {"every_steps": None, "at_end": True}
    assert train(raw(tmp_path, **sections), SINGLE) == {"status": "early_stopped", "step": 8}
    longer = raw(tmp_path, train={"max_steps": 80}, **sections)
    stopped = "stopped early at step 8 (3 evaluations without improvement of eval_loss): nothing"
    assert any(stopped in w for w in check_warnings(tmp_path, longer))
    caplog.set_level("WARNING", logger="dist_train")
    assert train(longer, SINGLE) == {"status": "early_stopped", "step": 8}
    said = [r.getMessage() for r in caplog.records if stopped in r.getMessage()]
    # the checkpoint by its name, as the run's other lines (restore returns the folder: it read its whole path)
    assert said and said[0].startswith("checkpoint step-00000008 stopped") and "eval.early_stopping_patience" in said[0]


def test_an_early_stop_binds_only_a_config_that_stops_there(tmp_path):
    """A run started from an early-stopped checkpoint with early stopping off (in its own folder, or
    fine-tuning it in another) or with a patience left to use trains on: it trained nothing and
    reported status early_stopped, whatever its config."""
    stopping = {"every_steps": 2, "early_stopping_patience": 3, "min_delta": 100.0}
    checkpoint = {"every_steps": None, "at_end": True}
    assert train(raw(tmp_path / "a", eval=stopping, checkpoint=checkpoint), SINGLE)["step"] == 8
    fine_tune = {**checkpoint, "resume": str(tmp_path / "a")}
    plain = {"every_steps": 2}
    assert train(raw(tmp_path / "b", eval=plain, checkpoint=fine_tune), SINGLE) == {"status": "finished", "step": 40}
    assert [r["step"] for r in read_rows(tmp_path / "b") if "eval_loss" in r][:2] == [10, 12]
    patient = {**stopping, "early_stopping_patience": 5}  # 3 of 5 used: 2 more evaluations
    assert train(raw(tmp_path / "a", eval=patient, checkpoint=checkpoint), SINGLE) == {
        "status": "early_stopped",
        "step": 12,
    }


def test_early_stopping_on_a_max_metric_follows_the_patience_rule(tmp_path):
    cfg = raw(
        tmp_path,
        eval={"every_steps": 5, "early_stopping_patience": 2, "metric": "eval_accuracy", "mode": "max"},
        train={"lr": 3e-2, "max_steps": 200},
    )
    result = train(cfg, SINGLE)
    evals = [(r["step"], r["eval_accuracy"]) for r in read_rows(tmp_path) if "eval_accuracy" in r]
    best, bad, expected_stop = -1.0, 0, None
    for step, accuracy in evals:  # the rule, replayed on the logged metric
        best, bad = (accuracy, 0) if accuracy > best else (best, bad + 1)
        if bad == 2:
            expected_stop = step
            break
    assert result == {"status": "early_stopped", "step": expected_stop}
    assert evals[-1][0] == expected_stop and max(a for _, a in evals) > 0.6


@pytest.mark.parametrize("columns", [3, 0])
def test_bce_on_per_token_outputs_evaluates_without_perplexity(tmp_path, columns):
    """bce_with_logits on (B, T, C) outputs (or (B, T, 1) for (B, T) targets) is no language model: its
    evaluation failed with `outputs (8, 6, 3) do not fit targets (8, 6, 3)` (exit 2 mid-run)."""
    cfg = raw(tmp_path, train={"max_steps": 2, "loss": "bce_with_logits"}, eval={"every_steps": 1})
    cfg.model.name, cfg.model.kwargs = "torch.nn:Linear", {"in_features": 4, "out_features": max(columns, 1)}
    cfg.data.name, cfg.data.kwargs = "userpkg.edges:tags", {"columns": columns}
    assert train(cfg, SINGLE) == {"status": "finished", "step": 2}
    evals = [r for r in read_rows(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(set(r) == {"step", "eval_loss", "eval_accuracy"} and 0 < r["eval_accuracy"] < 1 for r in evals)


def test_epochs_end_the_run(tmp_path):
    cfg = raw(tmp_path, train={"epochs": 2, "max_steps": 1000})  # 256 // 16 = 16 steps per epoch
    assert train(cfg, SINGLE) == {"status": "finished", "step": 32}
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert [r["epoch"] for r in rows] == [0] * 16 + [1] * 16


def test_epochs_count_passes_after_a_resume_with_another_global_batch(tmp_path):
    """train.epochs=2 resumed after its first epoch (16 steps of 16) with micro-batch 32: the second
    pass is 8 steps of 32. It was 2 x 8 = 16 steps in all, so the run stopped with 'nothing to train'
    after one pass (and a global batch made smaller ran into a third). `check` counts them alike."""
    end = {"every_steps": None, "at_end": True}
    assert train(raw(tmp_path, train={"epochs": 1, "max_steps": 1000}, checkpoint=end), SINGLE)["step"] == 16
    resumed = raw(tmp_path, train={"epochs": 2, "max_steps": 1000, "micro_batch_size": 32}, checkpoint=end)
    assert "nothing left to do" not in " ".join(check_warnings(tmp_path, resumed))
    assert train(resumed, SINGLE) == {"status": "finished", "step": 24}
    assert any("step 24 >= 24: the run has nothing left to do" in w for w in check_warnings(tmp_path, resumed))
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert [r["epoch"] for r in rows] == [0] * 16 + [1] * 8


def test_bf16_autocast_trains_on_cpu(tmp_path):
    cfg = raw(tmp_path, train={"precision": "bf16", "max_steps": 30})
    assert train(cfg, SINGLE)["status"] == "finished"
    losses = [r["loss"] for r in read_rows(tmp_path) if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert all(t.dtype == torch.float32 for t in load_weights(tmp_path).values())  # fp32 master weights


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_other_optimizers_and_clip_by_value(tmp_path, optimizer):
    lr = 0.1 if optimizer == "sgd" else 1e-2
    cfg = raw(
        tmp_path, optim={"name": optimizer, "nesterov": optimizer == "sgd"}, train={"grad_clip_value": 0.05, "lr": lr}
    )
    assert train(cfg, SINGLE)["status"] == "finished"
    losses = [r["loss"] for r in read_rows(tmp_path) if "loss" in r]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_no_weight_decay_on_biases_and_norm_weights():
    from dist_train.models import build_model
    from dist_train.optim import build_optimizer

    cfg = raw("x", model={"name": "transformer_lm"}, optim={"weight_decay": 0.1})
    model = build_model("transformer_lm", {})
    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "tok_emb.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith(".bias") or ".ln" in n or n.startswith("ln_f") for n in decayed)


def test_sdpa_backend_is_a_preference_in_force_for_the_whole_run(tmp_path, monkeypatch):
    """train.sdpa_backend=cudnn puts cuDNN first in torch's attention priority order for every
    forward (training and evaluation) and leaves every backend enabled: on a CPU, where cuDNN cannot
    serve, the run equals the default one bit for bit. The order is torch's again afterwards."""
    import torch.nn.functional as F
    from helpers import tiny_lm_config
    from torch.nn.attention import SDPBackend

    from dist_train.config import from_dict

    seen = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((torch._C._get_sdp_priority_order()[0], torch.backends.cuda.flash_sdp_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    before = torch._C._get_sdp_priority_order()
    runs = {}
    for backend in ("torch", "cudnn"):
        seen.clear()
        train_section = {"sdpa_backend": backend, "max_steps": 4}
        cfg = from_dict(tiny_lm_config(tmp_path / backend, train=train_section, eval={"every_steps": 2}))
        assert train(cfg, SINGLE)["step"] == 4
        first = int(SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION)
        assert seen and set(seen) == {(first, True)}, seen  # eval forwards included, flash still enabled
        assert torch._C._get_sdp_priority_order() == before
        runs[backend] = load_weights(tmp_path / backend)
    assert all(torch.equal(runs["torch"][k], v) for k, v in runs["cudnn"].items())


def test_sdpa_backend_on_a_torch_without_priorities_is_one_line(monkeypatch):
    import contextlib

    import torch.nn.attention

    from dist_train.errors import UserError
    from dist_train.transforms import preferred_attention

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", contextlib.contextmanager(lambda backends: (yield)))
    with pytest.raises(UserError, match=r"train.sdpa_backend=cudnn needs torch >= 2.6 .* set train.sdpa_backend=torch"):
        with preferred_attention("cudnn"):
            pass
    with preferred_attention("torch"):  # torch's own order needs nothing
        pass


def test_readme_lists_every_metrics_row_key(monkeypatch):
    """The README's `metrics.jsonl` entry names every key a training row (a CUDA one included) and an
    evaluation row can carry; it had `cuda_max_allocated_mb` in place of `peak_rss_mb` and no `mfu`."""
    import re
    from types import SimpleNamespace

    from helpers import REPO_ROOT

    from dist_train.config.checks import eval_metrics
    from dist_train.metrics import Throughput
    from dist_train.trainer import _log_row

    class Window:
        limit, longest_streak, skipped = 5, 0, 0

        data_wait_frac = 0.1

        def read(self, tokens, data_wait_frac):
            return 1.0, 2.0, 64.0

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    throughput, rows = Throughput(mfu_per_token=1e-9), []
    throughput.steps = 1
    ctx = SimpleNamespace(device=torch.device("cuda"))  # a CUDA rank's row, built on the CPU
    state = SimpleNamespace(step=1, epoch=0, skipped_steps=0)
    _log_row(
        state, Window(), 0.1, throughput, SimpleNamespace(global_batch=4), 16, ctx, SimpleNamespace(emit=rows.append)
    )
    written = set(rows[0]) | set(eval_metrics("cross_entropy"))
    readme = (REPO_ROOT / "README.md").read_text()
    entry = re.search(r"^\| `metrics.jsonl` \| (.*)a resumed run first appends", readme, re.M).group(1)
    assert set(re.findall(r"`(\w+)`", entry)) == written


def test_accumulation_under_cuda_graphs_adds_into_gradients_of_its_own(monkeypatch):
    """Under CUDA graphs (train.compile_mode=reduce-overhead) autograd makes a backward's gradients
    `.grad` in the graphs' memory pool, which the next micro-step's replay overwrites (torch 2.11 on an
    H100: 'accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run'). After
    an accumulating step's first backward each gradient gets memory of its own: here the first
    backward's own tensors are overwritten before the second backward, as a replay would, and the
    step's update stays that of a run without graphs, bit for bit."""
    from dist_train import trainer
    from dist_train.losses import build_loss
    from dist_train.models import build_model
    from dist_train.strategies import build_strategy

    cfg = raw("unused", train={"grad_accum_steps": 3, "micro_batch_size": 4})
    seeded = [torch.Generator().manual_seed(i) for i in range(3)]
    batches = [(torch.randn(4, 32, generator=g), torch.tensor([0, 1, 1, 0])) for g in seeded]
    params = {}
    for graphs in (False, True):
        monkeypatch.setattr(trainer, "replays_cuda_graphs", lambda cfg, ctx, graphs=graphs: graphs)
        torch.manual_seed(0)
        strategy = build_strategy(cfg, SINGLE)
        strategy.setup(build_model(cfg.model.name, cfg.model.kwargs))
        pool, backward = [], strategy.backward

        def replaying(loss, backward=backward, strategy=strategy, pool=pool, graphs=graphs):
            if graphs:  # this micro-step's replay overwrote what the first backward wrote
                for grad in pool:
                    grad.fill_(float("nan"))
            backward(loss)
            if not pool:
                pool.extend(p.grad for p in strategy.module.parameters())

        strategy.backward = replaying
        result = trainer.train_step(strategy, build_loss("cross_entropy"), batches, cfg, SINGLE)
        assert torch.isfinite(result.grad_norm)
        params[graphs] = [p.detach().clone() for p in strategy.module.parameters()]
    for without, with_graphs in zip(params[False], params[True]):
        assert torch.equal(without, with_graphs)
