"""Config loading, overrides and validation; CLI error handling (exit 2, one line, no traceback)."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO_ROOT, free_port, run_cli, write_config

from dist_train.config import config_reference, from_dict, load_config, to_dict
from dist_train.errors import UserError

BASE = {"run": {"output_dir": "/tmp/x"}, "model": {"name": "mlp"}, "data": {"name": "synthetic_vectors"}}


def cfg_with(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def test_defaults_and_free_form_sections():
    cfg = cfg_with(model={"hidden_dim": 7})
    assert cfg.train.grad_accum_steps == 1 and cfg.strategy.name == "ddp" and cfg.checkpoint.resume == "auto"
    assert cfg.model.kwargs == {"hidden_dim": 7}
    assert to_dict(cfg)["model"] == {"name": "mlp", "init": "default", "init_std": 0.02, "hidden_dim": 7}


@pytest.mark.parametrize("spelling", ["3e-4", "3E-4", "0.0003", 3e-4, ".0003"])
def test_float_keys_accept_every_numeric_spelling(tmp_path, spelling):
    assert cfg_with(train={"lr": spelling}).train.lr == pytest.approx(3e-4)
    path = write_config(tmp_path / "c.yaml", BASE)
    assert load_config(path, [f"train.lr={spelling}"]).train.lr == pytest.approx(3e-4)


def test_int_key_accepts_int_for_float():
    assert cfg_with(train={"grad_clip_norm": 1}).train.grad_clip_norm == 1.0


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"train": {"micro_batchsize": 1}},
            "unknown key `train.micro_batchsize` (did you mean `train.micro_batch_size`?)",
        ),
        ({"trian": {}}, "unknown section `trian` (did you mean `train`?)"),
        # a whole word of one key: it said `eval.at_end`, the closest spelling
        ({"eval": {"patience": 3}}, "unknown key `eval.patience` (did you mean `eval.early_stopping_patience`?)"),
        ({"train": {"max_steps": "ten"}}, "`train.max_steps` must be an integer"),
        ({"train": {"max_steps": 2.5}}, "`train.max_steps` must be an integer"),
        ({"train": {"grad_checkpointing": "yes"}}, "`train.grad_checkpointing` must be true or false"),
        ({"train": {"grad_accum_steps": 0}}, "`train.grad_accum_steps` must be > 0"),
        ({"train": {"precision": "fp8"}}, "`train.precision` must be one of fp32, bf16, fp16"),
        ({"strategy": {"zero_stage": 4}}, "`strategy.zero_stage` must be 0, 1, 2 or 3"),
        ({"train": {"lr": "fast"}}, "`train.lr` must be a finite number"),
        ({"run": {"output_dir": None}}, "`run.output_dir` is required"),
        ({"run": {"output_dir": "/tmp/x", "seed": 2**60}}, "`run.seed` must be an integer between -2**32 and 2**32"),
        ({"run": {"output_dir": "/tmp/x", "seed": -(2**62)}}, "`run.seed` must be an integer between -2**32 and 2**32"),
        (
            {"train": {"loss": "mse"}, "eval": {"early_stopping_patience": 2, "metric": "eval_accuracy"}},
            "eval.metric='eval_accuracy' is not a metric of train.loss=mse (it has eval_loss)",
        ),
        (  # Path("") is the working folder: a run there was resumed from, silently
            {"checkpoint": {"resume": ""}},
            "`checkpoint.resume` must be auto, never, or the path of a checkpoint or run folder, got ''",
        ),
        (
            {"eval": {"early_stopping_patience": 2}},
            "eval.early_stopping_patience counts the evaluations every eval.every_steps steps: set eval.every_steps",
        ),
    ],
)
def test_invalid_values_name_the_key(sections, message):
    with pytest.raises(UserError) as err:
        cfg_with(**sections)
    assert message in str(err.value)


def test_overrides_apply_and_are_type_checked(tmp_path):
    path = write_config(tmp_path / "c.yaml", BASE)
    cfg = load_config(
        path, ["train.max_steps=7", "model.hidden_dim=9", "train.grad_clip_norm=null", "eval.every_steps=3"]
    )
    assert (cfg.train.max_steps, cfg.model.kwargs["hidden_dim"], cfg.train.grad_clip_norm) == (7, 9, None)
    with pytest.raises(UserError, match="must look like"):
        load_config(path, ["train.max_steps"])
    with pytest.raises(UserError, match="unknown key `train.max_step`"):
        load_config(path, ["train.max_step=3"])


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  output_dir: /tmp/x\ntrain: [1, 2\n")
    with pytest.raises(UserError, match=r"malformed YAML at line \d+, column \d+"):
        load_config(path)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("!!int 1e5", r"line 5, column 7: cannot read '1e5' as !!int"),
        ("!!float 3e-4x", r"line 5, column 7: cannot read '3e-4x' as !!float"),
        ('!!int ""', r"line 5, column 7: cannot read '' as !!int"),
        ("!!bool maybe", r"line 5, column 7: cannot read 'maybe' as !!bool"),
        ("!!set [1]", r"line 5, column 7: expected a mapping node, but found sequence"),
    ],
)
def test_an_explicit_tag_its_value_does_not_fit_is_malformed_yaml(tmp_path, value, expected):
    """`max_steps: !!int 1e5`: the tag's constructor raised ValueError/IndexError/KeyError/TypeError, a
    traceback with status 1 (from the file and from an override alike)."""
    path = tmp_path / "tagged.yaml"
    path.write_text(
        f"run: {{output_dir: /tmp/x}}\nmodel: {{name: mlp}}\ndata: {{name: synthetic_vectors}}\ntrain:\n  lr: {value}\n"
    )
    with pytest.raises(UserError, match=f"malformed YAML at {expected}"):
        load_config(path)
    with pytest.raises(UserError, match=r"override 'train.lr=.*': malformed YAML at line 1, column 1: "):
        load_config(write_config(tmp_path / "c.yaml", BASE), [f"train.lr={value}"])
    path.write_text(path.read_text().replace(value, "!!float 3e-4"))
    assert load_config(path).train.lr == 3e-4


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    """YAML keys are unique: PyYAML kept the last, so a second `train:` section dropped the first one's keys."""
    path = tmp_path / "twice.yaml"
    path.write_text(
        "run: {output_dir: /tmp/x}\nmodel: {name: mlp}\ndata: {name: synthetic_vectors}\n"
        "train:\n  max_steps: 5\n  lr: 1e-3\ntrain:\n  micro_batch_size: 4\n"
    )
    with pytest.raises(UserError, match=r"malformed YAML at line 7, column 1: found duplicate key 'train'"):
        load_config(path)
    path.write_text(
        "run: {output_dir: /tmp/x, seed: 1, seed: 2}\nmodel: {name: mlp}\ndata: {name: synthetic_vectors}\n"
    )
    with pytest.raises(UserError, match="found duplicate key 'seed'"):
        load_config(path)
    with pytest.raises(UserError, match="found duplicate key 'a'"):
        load_config(write_config(tmp_path / "c.yaml", BASE), ["model.extra={a: 1, a: 2}"])
    path.write_text(  # a merge key's entries stay overridable by the keys written beside it
        "run: {<<: {output_dir: /tmp/x, seed: 1}, seed: 2}\nmodel: {name: mlp}\ndata: {name: synthetic_vectors}\n"
    )
    assert load_config(path).run.seed == 2


def test_the_written_config_loads_back_as_the_same_config(tmp_path):
    """config.yaml reproduces the run: text that this loader reads as a number (YAML 1.2: `1e-4`) but
    YAML 1.1 does not is quoted when written (it came back as run.output_dir '0.0001')."""
    from dist_train.config import dump_yaml

    overrides = ["run.output_dir=1e-4", "checkpoint.resume=5e3", "train.lr=1e-4", "model.act=1.5e3", "run.seed=7"]
    cfg = load_config(write_config(tmp_path / "c.yaml", BASE), overrides)
    assert (cfg.run.output_dir, cfg.checkpoint.resume, cfg.model.kwargs["act"]) == ("1e-4", "5e3", 1500.0)
    written = tmp_path / "config.yaml"
    written.write_text(dump_yaml(cfg))
    assert load_config(written) == cfg


def test_integers_are_yaml_1_2_decimal(tmp_path):
    """YAML 1.1 read a leading zero as octal (`run.seed=010` was 8, `09` text: an error) and `12:30` as
    base 60 (run.output_dir '750'); as YAML 1.2, an integer is decimal unless it says 0o/0x/0b."""
    path = write_config(tmp_path / "c.yaml", BASE)
    cfg = load_config(path, ["run.seed=010", "train.max_steps=09", "checkpoint.every_steps=0x10", "model.width=0o10"])
    assert (cfg.run.seed, cfg.train.max_steps, cfg.checkpoint.every_steps, cfg.model.kwargs["width"]) == (10, 9, 16, 8)
    path.write_text(
        "run: {output_dir: 12:30, seed: 010}\nmodel: {name: mlp, depth: 1_0}\ndata: {name: synthetic_vectors}\n"
    )
    cfg = load_config(path)
    assert (cfg.run.output_dir, cfg.run.seed, cfg.model.kwargs["depth"]) == ("12:30", 10, 10)


@pytest.mark.parametrize("text", ["false\n", "[]\n", "0\n", "''\n", "- run: {output_dir: x}\n"])
def test_a_config_file_that_is_no_mapping_says_so(tmp_path, text):
    """A file holding `false`, `[]`, `0` or `''` was read as an empty config: '`run.output_dir` is required'."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="the config must be a mapping of sections"):
        load_config(path)
    path.write_text("# nothing but a comment\n")
    with pytest.raises(UserError, match="`run.output_dir` is required"):
        load_config(path)


def test_a_text_key_keeps_a_yes_or_no_spelling_on_the_command_line(tmp_path):
    """`run.output_dir=no` was refused: '`run.output_dir` must be a string, got False' (PyYAML's 1.1 booleans),
    where `run.output_dir=2024` keeps its spelling; in the file the line says to quote it."""
    path = write_config(tmp_path / "c.yaml", BASE)
    cfg = load_config(path, ["run.output_dir=no", "checkpoint.resume=off", "schedule.plateau_metric=yes"])
    assert (cfg.run.output_dir, cfg.checkpoint.resume, cfg.schedule.plateau_metric) == ("no", "off", "yes")
    assert load_config(path, ["train.compile=yes", "schedule.plateau_metric=null"]).train.compile is True
    path.write_text("run: {output_dir: no}\nmodel: {name: mlp}\ndata: {name: synthetic_vectors}\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value) == (
        "`run.output_dir` must be a string, got False (YAML reads yes/no/on/off/true/false as a boolean: "
        "quote the text, e.g. 'no')"
    )


def test_reference_lists_every_key():
    table = config_reference()
    for key in ("run.output_dir", "train.grad_accum_steps", "strategy.zero_stage", "checkpoint.resume", "eval.at_end"):
        assert f"`{key}`" in table


def _cli(args, tmp_path):
    return run_cli([PYTHON, "-m", "dist_train", *args], cwd=tmp_path, timeout=60)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.yaml"
    payload.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    unknown = write_config(tmp_path / "unknown.yaml", {**BASE, "train": {"lr_rate": 1}})
    wrong_type = write_config(tmp_path / "type.yaml", {**BASE, "train": {"micro_batch_size": "big"}})
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("run: {output_dir: /tmp/x\n")
    cases = {
        "payload": [["--config", str(payload)], "Python object tags"],
        "unknown": [["--config", str(unknown)], "unknown key `train.lr_rate`"],
        "type": [["--config", str(wrong_type)], "`train.micro_batch_size` must be an integer"],
        "malformed": [["--config", str(malformed)], "malformed YAML at line"],
        "missing": [["--config", str(tmp_path / "nope.yaml")], "config file not found"],
        "no-config": [[], "--config"],
        "bad-override": [["--config", str(unknown), "oops"], "must look like `section.key=value`"],
    }
    for name, (args, expected) in cases.items():
        proc = _cli(args, tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("dist_train: error:"), (name, proc.stderr)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the YAML payload was executed"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "0", "WORLD_SIZE": "1"}, "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK and WORLD_SIZE are set but MASTER_PORT is not"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT must be a TCP port"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}, "RANK=2 WORLD_SIZE=2: RANK"),
    ],
)
def test_ranks_started_by_hand_without_the_rendezvous_address_are_one_line(env, expected):
    """RANK and WORLD_SIZE exported by hand, without MASTER_ADDR/MASTER_PORT: `KeyError: 'MASTER_ADDR'`
    with a traceback (status 1); a RANK outside WORLD_SIZE waited for dist.timeout_s, then failed."""
    from dist_train.distributed import check_rank_environment

    with pytest.raises(UserError, match=expected):
        check_rank_environment(env)
    check_rank_environment({**env, "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})


def test_one_rank_started_by_hand_without_master_addr_exits_2(tmp_path):
    config = write_config(tmp_path / "c.yaml", {**BASE, "run": {"output_dir": str(tmp_path / "out")}})
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "", "MASTER_PORT": ""}
    proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(config)], env=env, cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("dist_train: error: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not: export RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"RANK": "0"}, None),  # one process either way
        ({"WORLD_SIZE": "1"}, None),
    ],
)
def test_half_a_rank_environment_set_by_hand_is_one_line(monkeypatch, env, expected):
    """RANK=1 without WORLD_SIZE (or WORLD_SIZE=2 without RANK) trained alone as a one-process run, status 0,
    writing checkpoints and model.safetensors into the job's output folder while its peers waited."""
    from dist_train.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "DIST_TRAIN_LAUNCHER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if expected is None:
        assert init_distributed("gloo").world_size == 1
    else:
        with pytest.raises(UserError, match=expected):
            init_distributed("gloo")


def test_torchrun_failure_summary_shows_the_error_line(tmp_path, monkeypatch):
    """torchrun's summary of a rank that exited 2 read `error_file: <N/A>` and `traceback : To enable traceback
    see: https://pytorch.org/docs/stable/elastic/errors.html`; the rank now writes its line to the
    TORCHELASTIC_ERROR_FILE its agent gave it, as torch's `@record` would, and the summary shows it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from dist_train.cli import main

    error_file = tmp_path / "attempt_0" / "1" / "error.json"
    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("LOCAL_RANK", "1")  # a quiet rank (local rank 0 prints the line) records it too
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("dist_train", {1: failure}).format_msg()
    (line,) = [line for line in summary.splitlines() if "traceback :" in line]
    assert line.startswith("  traceback : dist_train: error: ") and "missing.yaml" in line, summary


def test_a_rank_that_finds_no_rendezvous_store_fails_in_one_line(monkeypatch):
    """Rank 1 started by hand while rank 0, which hosts the store, never started: after dist.timeout_s torch's
    DistNetworkError ('The client socket has timed out ...') came with a 55-line C++ and Python traceback."""
    from dist_train.distributed import JoinError, init_distributed

    port = free_port()
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(JoinError, match=f"rank 1 of 2: could not join the rendezvous store at 127.0.0.1:{port} "):
        init_distributed("gloo", 1.0)


def test_rank_zero_started_by_hand_on_a_port_in_use_is_one_line(monkeypatch):
    """Rank 0 hosts the rendezvous store on MASTER_PORT; a port another process listens on failed it with
    torch's DistNetworkError traceback (`rank 0 failed: ... EADDRINUSE`, status 1)."""
    import socket

    from dist_train.distributed import init_distributed

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        with pytest.raises(UserError, match=f"MASTER_PORT={port} is in use on this machine .* a free MASTER_PORT"):
            init_distributed("gloo", 5.0)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK=abc WORLD_SIZE=2: RANK must be one of 0 to WORLD_SIZE - 1"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK must be a non-negative integer, got 'x'"),
    ],
)
def test_malformed_rank_variables_set_by_hand_exit_2(tmp_path, env, expected):
    """README: a RANK outside WORLD_SIZE stops the rank with one line, status 2. A RANK that is no number
    (`RANK=abc`) raised ValueError from cli.py's int(RANK) before that check ran, and a LOCAL_RANK that is
    none from init_distributed: a traceback, status 1."""
    config = write_config(tmp_path / "c.yaml", {**BASE, "run": {"output_dir": str(tmp_path / "out")}})
    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(config)], env=env, cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == f"dist_train: error: {expected}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def model(**kwargs)\n    return None\n", r"raised SyntaxError: .* \(at .*/{name}\.py:1\)"),
        ("WEIGHTS = open('/nonexistent/w.bin').read()\n", r"raised FileNotFoundError: .* \(at .*/{name}\.py:1\)"),
    ],
    ids=["syntax-error", "raises"],
)
def test_a_factory_module_that_fails_as_it_is_imported_is_one_line(tmp_path, monkeypatch, source, expected):
    """Not only an ImportError: any exception the module's own code raises on import is the user's code."""
    from dist_train.data import build_dataset
    from dist_train.models import build_model

    name = f"user_module_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for build in (lambda: build_model(f"{name}:model", {}), lambda: build_dataset(f"{name}:data", "train", {})):
        with pytest.raises(UserError, match=f"importing `{name}` " + expected.format(name=name)) as err:
            build()
        assert err.value.same_on_every_rank and "\n" not in str(err.value)


def test_a_factory_package_in_the_working_folder_resolves_under_every_launcher(tmp_path, monkeypatch):
    """`python -m dist_train` and torchrun have the working folder on sys.path, the `dist-train`
    console script and spawn's ranks did not: the same config failed there with 'cannot import'."""
    from dist_train.models import build_model

    (tmp_path / "cwd_pkg_models.py").write_text("import torch\ndef model():\n    return torch.nn.Linear(2, 3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert build_model("cwd_pkg_models:model", {}).out_features == 3
    assert sys.path[-1] == str(tmp_path)  # last: an installed module of the same name still wins


def test_a_factory_argument_annotated_int_takes_an_integral_float():
    """`data.num_samples=1e5` (YAML 1.2: the float 100000.0) failed in the factory: 'randn() received an
    invalid combination of arguments - got (float, int, ...)', as `model.hidden_dim=1e3` did in nn.Linear."""
    from dist_train.data import build_dataset
    from dist_train.imports import call_factory
    from dist_train.models import build_model

    assert len(build_dataset("synthetic_vectors", "train", {"num_samples": 1e2})) == 100
    assert build_model("mlp", {"hidden_dim": 16.0}).head.in_features == 16
    with pytest.raises(UserError, match="^model 'mlp': hidden_dim must be a whole number, got 2.5$"):
        build_model("mlp", {"hidden_dim": 2.5})  # not integral: the factory raised a TypeError
    # a string where a number belongs: "'<' not supported between instances of 'str' and 'int'"; a bool
    with pytest.raises(UserError, match="^model 'mlp': hidden_dim must be a whole number, got '64'$"):
        build_model("mlp", {"hidden_dim": "64"})
    with pytest.raises(UserError, match="^model 'transformer_lm': dropout must be a number, got True$"):
        build_model("transformer_lm", {"dropout": True})
    with pytest.raises(UserError, match="^model 'hf_causal_lm': pad_token_id must be a whole number or null, got 'x'$"):
        build_model("hf_causal_lm", {"pad_token_id": "x"})

    def untyped(width=1, ratio: float = 1.0):
        return width, ratio

    assert call_factory(untyped, {"width": 3.0, "ratio": 2.0}, "x") == (3.0, 2.0)  # no int annotation: as given


def test_a_model_with_nothing_to_train_is_one_line():
    """All parameters frozen (or none): the optimizer raised 'empty parameter list' with a traceback."""
    from dist_train.models import build_model

    for factory in ("model_frozen", "model_without_parameters"):
        with pytest.raises(UserError, match="with no trainable parameters .*: nothing to train") as err:
            build_model(f"userpkg.broken:{factory}", {})
        assert err.value.same_on_every_rank


def test_a_model_with_uninitialized_lazy_modules_is_one_line():
    """LazyLinear/LazyBatchNorm: DDP refused the uninitialized parameters with a traceback (status 1),
    on every strategy and at one rank too."""
    from dist_train.models import build_model

    with pytest.raises(UserError, match=r"lazy modules whose parameters are not initialized yet \(0\.weight, 0\.bias,"):
        build_model("userpkg.broken:model_lazy", {})


@pytest.mark.parametrize(
    ("factory", "expected"),
    [("data_splits", "raised KeyError: 0 (at "), ("data_no_length", "raised NotImplementedError: length unknown")],
)
def test_a_dataset_whose_length_or_first_item_cannot_be_read_is_one_line(factory, expected):
    from dist_train.data import build_dataset

    with pytest.raises(UserError, match="must be a map-style Dataset: reading its length and item 0") as err:
        build_dataset(f"userpkg.broken:{factory}", "train", {})
    assert expected in str(err.value) and err.value.same_on_every_rank


def test_overrides_may_come_before_and_after_the_config_option(tmp_path, capsys):
    """`dist-train train.max_steps=1 --config c.yaml train.lr=abc` reads both as overrides (it said
    `unrecognized arguments: train.lr=abc`); the bad value stops it before anything runs."""
    from dist_train.cli import main

    path = write_config(tmp_path / "c.yaml", BASE)
    assert main(["train", "train.max_steps=1", "--config", str(path), "train.lr=abc"]) == 2
    assert capsys.readouterr().err == "dist_train: error: `train.lr` must be a finite number, got 'abc'\n"


@pytest.mark.slow
def test_cli_errors_that_need_the_data_exit_2(tmp_path):
    base = {**BASE, "run": {"output_dir": str(tmp_path / "out")}}
    too_big = write_config(tmp_path / "big.yaml", {**base, "train": {"micro_batch_size": 4096}})
    bad_model = write_config(tmp_path / "model.yaml", {**base, "model": {"name": "mlp", "widht": 3}})
    bad_name = write_config(tmp_path / "name.yaml", {**base, "model": {"name": "transfomer_lm"}})
    for path, expected in (
        (too_big, "is larger than the train split (2048 samples)"),
        (bad_model, "unexpected keyword argument 'widht'"),
        (bad_name, "did you mean `transformer_lm`?"),
    ):
        proc = _cli(["--config", str(path)], tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def test_readme_config_reference_is_current():
    from helpers import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert section == config_reference(), "README config table is stale: paste `python -m dist_train.config`"


def test_runtime_dependencies_include_numpy_and_match_the_readme():
    """torch does not require numpy, yet every multi-rank run needs it (torch's broadcast_object_list
    reads Tensor.numpy()) and so does the model.safetensors export: without it declared, a fresh
    `pip install -e .` failed every run with `RuntimeError: Numpy is not available`."""
    import re

    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    declared = re.search(r"^dependencies = \[(.*)\]$", pyproject, re.M).group(1)
    names = [re.match(r'"([A-Za-z0-9_-]+)', spec.strip()).group(1).lower() for spec in declared.split(",")]
    assert "numpy" in names
    readme = (REPO_ROOT / "README.md").read_text()
    documented = re.search(r"pip install -e \. +# runtime: (.*)", readme).group(1)
    assert [name.strip() for name in documented.split(",")] == names


def test_numbers_in_lists_and_factory_arguments_load_as_numbers(tmp_path):
    """YAML 1.1 reads `3e-4` as text wherever it stands; the config loader reads YAML 1.2 numbers."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "run: {output_dir: 2024-01-01}\nmodel: {name: mlp, dropout: 1e-1, widths: [1e1, 2E1]}\n"
        "data: {name: synthetic_vectors}\noptim: {betas: [0.9, 999e-3]}\n"
    )
    cfg = load_config(path, ["train.max_steps=1e3", "train.loss_kwargs={label_smoothing: 5e-2}"])
    assert cfg.model.kwargs == {"dropout": 0.1, "widths": [10.0, 20.0]}
    assert cfg.optim.betas == [0.9, 0.999] and cfg.train.loss_kwargs == {"label_smoothing": 0.05}
    assert cfg.train.max_steps == 1000 and cfg.run.output_dir == "2024-01-01"  # a date stays text
    assert load_config(path, ["run.output_dir=2024"]).run.output_dir == "2024"
    # a text key keeps a number's spelling on the command line
    assert load_config(path, ["run.output_dir=007"]).run.output_dir == "007"
    assert load_config(path, ["run.output_dir=1e3"]).run.output_dir == "1e3"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=nan", "`train.lr` must be a finite number"),
        ("train.grad_clip_norm=.inf", "`train.grad_clip_norm` must be a finite number"),
        ("dist.timeout_s=inf", "`dist.timeout_s` must be a finite number"),
        ("dist.timeout_s=1e12", "`dist.timeout_s` must be a number of seconds > 0 and <= 2592000"),  # time_t overflow
        ("checkpoint.save_timeout_s=0", "`checkpoint.save_timeout_s` must be a number of seconds > 0"),
        ("strategy.name=null", "`strategy.name` must be one of ddp"),
        ("optim.name=null", "`optim.name` must be one of"),
        ("optim.eps=-1", "`optim.eps` must be >= 0"),
        ("optim.name=sgd optim.momentum=-1", "`optim.momentum` must be in [0, 1), got -1"),
        ("optim.name=sgd optim.momentum=1", "`optim.momentum` must be in [0, 1), got 1"),
        ("eval.min_delta=-0.01", "`eval.min_delta` must be >= 0"),
        ("optim.name=sgd optim.momentum=0 optim.nesterov=true", "`optim.nesterov=true` needs `optim.momentum` > 0"),
        ("schedule.name=step schedule.gamma=-1", "`schedule.gamma` must be > 0"),
        ("strategy.name=deepspeed train.grad_clip_value=1", "grad_clip_value is not supported with strategy.name=deep"),
        ("train.compile_mode=max_autotune", "`train.compile_mode` must be one of default, reduce-overhead"),
        ("train.compile_mode=max-autotune", "train.compile_mode=max-autotune needs train.compile=true"),
        ("train.grad_checkpointing_every=2", "train.grad_checkpointing_every=2 needs train.grad_checkpointing=true"),
        (
            "train.compile=true train.compile_mode=reduce-overhead strategy.name=fsdp",
            "CUDA graphs, which dist_train supports with strategy.name=ddp only",
        ),
    ],
)
def test_non_finite_numbers_empty_names_and_unusable_compile_modes_are_refused(tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", BASE)
    with pytest.raises(UserError) as err:
        load_config(path, override.split())
    assert message in str(err.value)


def _schema_keys() -> list[str]:
    import dataclasses
    from typing import get_type_hints

    from dist_train.config import Config

    sections = get_type_hints(Config)
    return [
        f"{section.name}.{field.name}"
        for section in dataclasses.fields(Config)
        for field in dataclasses.fields(sections[section.name])
        if field.name != "kwargs"
    ]


HUGE = "1" + "0" * 400  # past the largest float (1.8e308)


@pytest.mark.parametrize("text", [HUGE, f"-{HUGE}", "-.inf", "[1, {a: 2}]", "yes"])
def test_every_key_takes_any_value_or_refuses_it_in_one_line(text):
    """Every schema key, in the file and as an override: a config, or one UserError line (exit 2). An
    integer literal past the largest float was an OverflowError traceback (status 1) in every int and
    float key (`train.max_steps=1000...0`, 400 digits)."""
    import copy

    from dist_train.config import apply_overrides
    from dist_train.config.loading import load_yaml

    for key in _schema_keys():
        section, name = key.split(".")
        in_file = copy.deepcopy(BASE) | {section: {**BASE.get(section, {}), name: load_yaml(f"{name}: {text}")[name]}}
        overridden = apply_overrides(copy.deepcopy(BASE), [f"{key}={text}"])
        for raw in [in_file] + ([overridden] if overridden != in_file else []):  # text keys keep a number's spelling
            try:
                from_dict(raw)
            except UserError as err:
                assert "\n" not in str(err) and len(str(err)) < 600, (key, text, str(err)[:300])


def test_integers_past_int64_are_one_line(tmp_path, capsys):
    """`float(10**400)` overflowed in the type check (a traceback, status 1); an int key past int64 would
    overflow torch's and the LR schedule's arithmetic later (warmup_steps=10**400: lr_at's float division)."""
    from dist_train.cli import main

    cfg = cfg_with(train={"max_steps": 2**63 - 1}, schedule={"warmup_steps": 2**63 - 1})
    assert (cfg.train.max_steps, cfg.schedule.warmup_steps) == (2**63 - 1, 2**63 - 1)
    for value in (2**63, -(2**63), 10**400, 1e30):
        with pytest.raises(UserError, match=r"^`train.max_steps` must be an integer between -2\*\*63 and 2\*\*63"):
            cfg_with(train={"max_steps": value})
    config = str(write_config(tmp_path / "c.yaml", BASE))
    assert main(["--config", config, f"schedule.warmup_steps={HUGE}"]) == 2
    assert capsys.readouterr().err.startswith("dist_train: error: `schedule.warmup_steps` must be an integer between")
    assert main(["--config", config, f"train.lr={HUGE}"]) == 2
    assert capsys.readouterr().err == f"dist_train: error: `train.lr` must be a finite number, got {HUGE}\n"


@pytest.mark.parametrize("key", ["run.output_dir", "checkpoint.resume", "strategy.deepspeed_config", "model.name"])
def test_a_nul_character_in_a_text_key_is_one_line(tmp_path, key):
    """`run.output_dir="runs/a\\0b"` (a YAML escape) failed the run with `ValueError: embedded null byte`
    and a traceback, status 1 (checkpoint.resume and a strategy.deepspeed_config path too)."""
    path = write_config(tmp_path / "c.yaml", BASE)
    with pytest.raises(UserError) as err:
        load_config(path, [f'{key}="runs/a\\0b"'])
    assert str(err.value) == f"`{key}` must not contain a NUL character (\\0), got 'runs/a\\x00b'"


CLI_CASES = """
import json, os, sys, tempfile
from dist_train.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    with tempfile.TemporaryFile() as err:  # fd 2 itself: the hang watchdog (faulthandler) writes there
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        out[name] = [code, err.read().decode()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_cli_user_code_and_run_errors_exit_2_in_one_line(tmp_path):
    """Mistakes that surface only once torch runs the user's factories, the loss or the output folder;
    all cases in one process (each a full `dist_train.cli.main`), so torch is imported once."""
    base = {
        "run": {"output_dir": str(tmp_path / "out")},
        "model": {"name": "mlp", "input_dim": 32, "hidden_dim": 8, "num_classes": 4},
        "data": {"name": "userpkg.broken:data_classes"},
        "train": {"max_steps": 1, "micro_batch_size": 8},
        "checkpoint": {"every_steps": 1},
        "eval": {"at_end": False},
        "log": {"plot": False},
    }
    config = str(write_config(tmp_path / "c.yaml", base))
    (tmp_path / "a_file").write_text("")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    run = ["--config", config]
    faulty = {**base, "model": {"name": "userpkg.faulty:faulty", "fail_rank": 0, "fail_call": 1}}
    faulty["run"] = {"output_dir": str(tmp_path / "o11")}
    cases = {
        "trained": [*run],  # a good run first: its checkpoint is the one the mismatch case meets
        "not_callable": [*run, "model.name=userpkg.broken:not_callable", "run.output_dir=" + str(tmp_path / "o1")],
        "model_raises": [*run, "model.name=userpkg.broken:model_raises", "run.output_dir=" + str(tmp_path / "o2")],
        "data_raises": [*run, "data.name=userpkg.broken:data_raises", "run.output_dir=" + str(tmp_path / "o3")],
        "single": [*run, "data.name=userpkg.broken:data_single", "run.output_dir=" + str(tmp_path / "o4")],
        "triple": [*run, "data.name=userpkg.broken:data_triple", "run.output_dir=" + str(tmp_path / "o5")],
        "list": [*run, "data.name=userpkg.broken:data_plain_list", "run.output_dir=" + str(tmp_path / "o6")],
        "loss": [*run, "train.loss=mse", "run.output_dir=" + str(tmp_path / "o7")],
        "output_file": [*run, "run.output_dir=" + str(tmp_path / "a_file")],
        "output_under_file": [*run, "run.output_dir=" + str(tmp_path / "a_file" / "sub")],
        "binary_config": ["--config", str(binary)],
        "mismatch": [*run, "model.hidden_dim=16", "train.max_steps=2"],
        "submit_usage": ["slurm", "submit"],
        "classes": [*run, "model.num_classes=2", "run.output_dir=" + str(tmp_path / "o9")],
        "width": [*run, "model.input_dim=20", "run.output_dir=" + str(tmp_path / "o10")],
        "dict_outputs": [
            *run,
            "model.name=userpkg.broken:model_dict_outputs",
            "run.output_dir=" + str(tmp_path / "o13"),
        ],
        "model_bug": ["--config", str(write_config(tmp_path / "faulty.yaml", faulty))],
        "late": [
            *run,
            *("data.name=userpkg.broken:data_late_bad_class", "loader.shuffle=false", "log.every_steps=1"),
            *("train.max_steps=8", "checkpoint.every_steps=2", "run.output_dir=" + str(tmp_path / "o12")),
        ],
    }
    expected = {
        "not_callable": "is a int, not a factory function or class",
        "model_raises": "the factory raised ValueError: weights file missing (at ",
        "data_raises": "the factory raised FileNotFoundError: no such shard",
        "single": "items must be (input, target) tensor pairs, got Tensor",
        "triple": "items must be (input, target) tensor pairs, got a 3-tuple",
        "list": "items must be (input, target) tensor pairs, got int",
        "loss": "differ in shape",
        "output_file": "cannot create it",
        "output_under_file": "cannot create it",
        "binary_config": "is not UTF-8 text",
        "mismatch": "does not fit this model or optimizer (size mismatch for ",
        "submit_usage": "(see `dist-train slurm submit --help`)",
        "classes": "the model does not fit the data: the first training batch failed with IndexError: Target ",
        "width": "does not fit the data: the first training batch failed with RuntimeError: mat1 and mat2 shapes",
        "dict_outputs": "the model's forward returned a dict, not a tensor: return the outputs the loss takes",
    }
    if not torch.cuda.is_available():
        cases["nccl"] = [*run, "dist.backend=nccl", "run.output_dir=" + str(tmp_path / "o8")]
        expected["nccl"] = "dist.backend=nccl needs CUDA GPUs and this machine has none"
    import json

    env = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = run_cli([PYTHON, "-c", CLI_CASES, json.dumps(cases)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["trained"][0] == 0, results["trained"][1][-2000:]
    for name, text in expected.items():
        code, stderr = results[name]
        lines = stderr.strip().splitlines()
        if name in ("loss", "classes", "width", "dict_outputs"):  # found by the first forward: after the start-up line
            assert lines[0].startswith(f"{lines[0][:8]} INFO training "), lines[0]
            lines = lines[1:]
        assert code == 2 and len(lines) == 1, (name, stderr)
        assert lines[0].startswith("dist_train: error:") and text in lines[0], (name, lines[0])
    assert "model outputs (8, 2)" in results["classes"][1] and "in [0, 3]" in results["classes"][1]
    assert "(at dist_train/models/mlp.py:" in results["width"][1] or "mlp.py:" in results["width"][1]
    assert not (tmp_path / "o9" / "checkpoints").exists()
    code, stderr = results["model_bug"]  # the model's own raise: a training failure with its traceback
    assert code == 1 and "failed at step 1: RuntimeError: injected failure" in stderr and "Traceback" in stderr
    code, stderr = results["late"]  # a batch refused after steps have trained: a training failure
    assert code == 1 and "failed at step 6: IndexError: Target 7 is out of bounds" in stderr, stderr[-2000:]
    assert (tmp_path / "o12" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert "hidden_dim: 8" in (tmp_path / "out" / "config.yaml").read_text()  # the refused run changed nothing


def test_an_iterable_dataset_is_one_line_before_the_first_step():
    """An IterableDataset with __len__ passed the map-style check, then failed reading item 0 with a
    traceback (status 1): `NotImplementedError: Subclasses of Dataset should implement __getitem__`."""
    from dist_train.data import build_dataset

    with pytest.raises(UserError, match="split 'train' is an IterableDataset: give a map-style Dataset"):
        build_dataset("userpkg.broken:data_iterable", "train", {})


def test_a_home_folder_tilde_in_the_runs_paths_is_expanded(tmp_path, monkeypatch):
    """No shell expands `~` in a YAML file (or in `run.output_dir=~/...`): the run wrote into a folder
    named `~` under the working directory, while data.files took `~` as the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config(tmp_path / "c.yaml", {**BASE, "run": {"output_dir": "~/runs/a"}})
    cfg = load_config(path, ["checkpoint.resume=~/runs/b"])
    assert (cfg.run.output_dir, cfg.checkpoint.resume) == (f"{tmp_path}/home/runs/a", f"{tmp_path}/home/runs/b")
    assert load_config(path, ["checkpoint.resume=auto", "run.output_dir=a~b"]).run.output_dir == "a~b"


def test_version_flag_prints_the_version_without_a_config():
    """`dist-train --version` answered "the following arguments are required: --config" (status 2)."""
    from dist_train import __version__

    proc = run_cli([PYTHON, "-m", "dist_train", "--version"], timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"dist-train {__version__}", proc.stderr
