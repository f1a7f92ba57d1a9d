"""SLURM without a cluster: `dist-train slurm submit` rendering and errors, the templates' shared
blocks, the job's output folder, the srun launcher's environment, and `dist-train slurm torchrun`."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from helpers import PYTHON, REPO_ROOT, read_rows, run_cli, tiny_lm_config, write_config

from dist_train import distributed
from dist_train.distributed import detect_launcher, first_slurm_host
from dist_train.errors import UserError
from dist_train.slurm.job import output_dir_for_job
from dist_train.slurm.submit import time_limit_seconds

TEMPLATES = sorted((REPO_ROOT / "slurm").glob("*.sbatch"))


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_lm_config(tmp_path / "runs"))


def submit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli([PYTHON, "-m", "dist_train", "slurm", "submit", *args], env=env, timeout=60)


def sbatch_lines(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH (--[\w-]+)(?:=(\S*))?$", script, re.MULTILINE))


# ---- templates ----------------------------------------------------------------------------------
def test_the_four_templates_exist_parse_and_share_their_common_blocks():
    assert [t.name for t in TEMPLATES] == ["cpu.sbatch", "multi_node.sbatch", "single_node.sbatch", "srun.sbatch"]
    blocks = set()
    for template in TEMPLATES:
        text = template.read_text()
        assert subprocess.run(["bash", "-n", str(template)]).returncode == 0, template
        options = sbatch_lines(text)
        assert "--requeue" in options and options["--open-mode"] == "append", template
        assert re.fullmatch(r"B:USR1@\d+", options["--signal"]), template
        shared = re.findall(r"# ---- the same in every template.*?\n(?:# -{20,}\n|exit \"\$STATUS\"\n)", text, re.S)
        assert len(shared) == 2, template
        blocks.add(tuple(shared))
    assert len(blocks) == 1  # edit one template's shared blocks: edit them all


# ---- dist-train slurm submit --dry-run ----------------------------------------------------------
def test_dry_run_cpu_prints_a_complete_job_script(config, tmp_path):
    proc = submit("--dry-run", "--nproc-per-node", "4", "--time", "2:00:00", str(config), "train.lr=1e-3")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash\n# dist_train on one node without GPUs")  # cpu.sbatch
    options = sbatch_lines(script)
    assert options["--job-name"] == "tiny" and options["--nodes"] == "1" and options["--ntasks-per-node"] == "1"
    assert options["--cpus-per-task"] == "4" and options["--time"] == "2:00:00" and "--gpus-per-node" not in options
    assert options["--signal"] == "B:USR1@300" and "--partition" not in options
    assert f"[ $# -gt 0 ] || set -- {config.resolve()} train.lr=1e-3\n" in script
    assert "export DIST_TRAIN_NPROC_PER_NODE=4\n" in script
    saved = tmp_path / "job.sbatch"
    saved.write_text(script)
    assert subprocess.run(["bash", "-n", str(saved)]).returncode == 0
    # overrides on both sides of an option, as `dist-train check`/`verify` take them (was: unrecognized)
    proc = submit(str(config), "train.lr=1e-3", "--dry-run", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert f"[ $# -gt 0 ] || set -- {config.resolve()} train.lr=1e-3 train.max_steps=3\n" in proc.stdout


@pytest.mark.parametrize(
    "args, template, expected",
    [
        (
            ["--gpus-per-node", "4", "--partition", "gpu"],
            "single_node",
            {"--gpus-per-node": "4", "--cpus-per-task": "32", "--ntasks-per-node": "1", "--partition": "gpu"},
        ),
        (
            ["--nodes", "3", "--gpus-per-node", "8", "--signal-grace", "600"],
            "multi_node",
            {"--nodes": "3", "--gpus-per-node": "8", "--cpus-per-task": "64", "--signal": "B:USR1@600"},
        ),
        (
            ["--launcher", "srun", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12"],
            "srun",
            {"--nodes": "2", "--ntasks-per-node": "8", "--gpus-per-node": "8", "--cpus-per-task": "12"},
        ),
        (
            ["--launcher", "srun", "--nproc-per-node", "2", "--job-name", "exp1"],
            "srun",
            {"--ntasks-per-node": "2", "--cpus-per-task": "1", "--job-name": "exp1", "--gpus-per-node": None},
        ),
    ],
)
def test_dry_run_picks_and_fills_the_template(config, args, template, expected):
    proc = submit("--dry-run", *args, str(config))
    assert proc.returncode == 0, proc.stderr
    first_comment = (REPO_ROOT / "slurm" / f"{template}.sbatch").read_text().splitlines()[1]
    assert proc.stdout.splitlines()[1] == first_comment
    options = sbatch_lines(proc.stdout)
    for key, value in expected.items():
        assert options.get(key) == value, (key, options)
    assert ("export DIST_TRAIN_NPROC_PER_NODE=" in proc.stdout) == (template != "srun")


def test_sbatch_args_replace_or_add_lines(config):
    proc = submit(
        "--dry-run",
        "--sbatch-arg=--output=/logs/%j.out",
        "--sbatch-arg=--qos=high",
        "--sbatch-arg=--exclusive",
        str(config),
    )
    assert proc.returncode == 0, proc.stderr
    options = sbatch_lines(proc.stdout)
    assert options["--output"] == "/logs/%j.out" and options["--qos"] == "high" and options["--exclusive"] == ""
    assert proc.stdout.count("#SBATCH --output=") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be 0 (CPU) or more, got -1"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
        (["--gpus-per-node", "8", "--nproc-per-node", "4"], "--nproc-per-node is for CPU runs"),
        (["--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
        (["--time", "1h"], "--time '1h' is not a SLURM time limit"),
        (["--time", "4"], "a time limit of 4 leaves no room for --signal-grace 300"),
        (["--sbatch-arg=--time=00:05:00"], "a time limit of 00:05:00 leaves no room for --signal-grace 300"),
        (["--signal-grace", "4000"], "a time limit of 01:00:00 leaves no room"),  # cpu.sbatch's own --time
        (["--time", "3", "--sbatch-arg=--signal=B:USR1@200"], "leaves no room for --sbatch-arg=--signal=B:USR1@200"),
        (["--launcher", "mpirun"], "invalid choice: 'mpirun'"),
        (["--sbatch-arg=qos=high"], "must look like --option=value or --flag"),
    ],
)
def test_impossible_requests_are_one_line_errors(config, args, message):
    proc = submit("--dry-run", *args, str(config))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("dist_train: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_a_signal_line_given_as_sbatch_arg_sets_the_grace_that_is_checked(config):
    """`--sbatch-arg=--signal=...` replaces the template's line: its time, not --signal-grace's
    default 300, is what the time limit must leave room for."""
    proc = submit("--dry-run", "--time", "3", "--sbatch-arg=--signal=B:USR1@60", str(config))
    assert proc.returncode == 0, proc.stderr
    assert sbatch_lines(proc.stdout)["--signal"] == "B:USR1@60"
    proc = submit("--dry-run", "--time", "2", "--sbatch-arg=--signal=USR1", str(config))  # SLURM's default: 60 s
    assert proc.returncode == 0, proc.stderr
    proc = submit("--dry-run", "--time", "1", "--sbatch-arg=--signal=USR1", str(config))
    assert proc.returncode == 2 and "leaves no room for --sbatch-arg=--signal=USR1" in proc.stderr


def test_missing_config_and_bad_override_fail_before_submitting(tmp_path, config):
    proc = submit("--dry-run", str(tmp_path / "nope.yaml"))
    assert (
        proc.returncode == 2 and proc.stderr == f"dist_train: error: config file not found: {tmp_path / 'nope.yaml'}\n"
    )
    proc = submit("--dry-run", str(config), "train.max_steps=-3")
    assert proc.returncode == 2 and "`train.max_steps` must be > 0" in proc.stderr


def test_submit_without_sbatch_on_path(config, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = submit(str(config), env={"PATH": str(empty)})
    assert proc.returncode == 2
    assert proc.stderr.startswith("dist_train: error: sbatch not found on PATH") and proc.stderr.count("\n") == 1


def test_submit_hands_the_rendered_script_to_sbatch(config, tmp_path):
    """A fake sbatch records its stdin: the job script is exactly the --dry-run output."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncat > {tmp_path}/submitted.sbatch\necho "$*" > {tmp_path}/argv\necho 4242\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = submit("--nproc-per-node", "2", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout
        == f"Submitted batch job 4242 (cpu.sbatch): run folder {tmp_path}/runs/4242, log slurm-tiny-4242.out\n"
    )
    assert (tmp_path / "argv").read_text() == "--parsable\n"
    assert (tmp_path / "submitted.sbatch").read_text() == submit(
        "--dry-run", "--nproc-per-node", "2", str(config)
    ).stdout
    # values with a space or a `#` are quoted: sbatch splits #SBATCH lines as a shell does (it refused
    # `--job-name=my exp`: "Invalid directive found in batch script: exp"), and the log named is unquoted
    spaced = config.rename(tmp_path / "my exp #1.yaml")
    proc = submit("--sbatch-arg=--output=logs dir/%x-%j.out", str(spaced), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(", log logs dir/my exp #1-4242.out\n"), proc.stdout
    script = (tmp_path / "submitted.sbatch").read_text()
    assert "#SBATCH --job-name='my exp #1'\n" in script and "#SBATCH --output='logs dir/%x-%j.out'\n" in script
    config = spaced.rename(config)

    fake.write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    proc = submit("--partition", "nope", str(config), env=env)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "dist_train: error: sbatch refused the job (cpu.sbatch): sbatch: error: invalid partition specified: nope\n"
    )


def test_submit_works_from_the_installed_wheel(config, tmp_path):
    """The wheel ships slurm/ (it had no templates: an installed dist-train refused every submit,
    'SLURM template .../site-packages/slurm/cpu.sbatch not found', status 2)."""
    pytest.importorskip("setuptools")  # the build backend, without fetching it (--no-build-isolation)
    if not (importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel")):
        pytest.skip("this setuptools builds no wheels without the `wheel` package")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ into the tree
    for name in ("dist_train", "slurm"):
        shutil.copytree(REPO_ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    build = [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("dist_train-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    for template in TEMPLATES:
        assert (site / "dist_train" / "slurm" / "templates" / template.name).read_bytes() == template.read_bytes()
    # the installed package alone (no checkout on PYTHONPATH), from another folder
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "dist_train", "slurm", "submit", "--dry-run", "--nproc-per-node", "2", str(config)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == submit("--dry-run", "--nproc-per-node", "2", str(config)).stdout


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 5400),
        ("5:30", 330),
        ("2:00:00", 7200),
        ("1-0", 86400),
        ("1-2:30", 95400),
        ("0-0:0:7", 7),
        ("UNLIMITED", None),
        ("0", None),  # SLURM: no limit
    ],
)
def test_time_limit_syntax(text, seconds):
    assert time_limit_seconds(text) == seconds


# ---- dist-train slurm output-dir and the sub-command table -------------------------------------
def test_output_folder_is_keyed_by_job_id_unless_given():
    assert output_dir_for_job("runs/exp", [], "77") == str(Path("runs/exp/77"))
    assert output_dir_for_job("/shared/x", ["train.lr=1", "run.output_dir=/shared/x"], "77") == "/shared/x"
    with pytest.raises(UserError, match="not inside a SLURM job"):
        output_dir_for_job("runs/exp", [], None)


def test_output_dir_command(config, tmp_path):
    proc = run_cli([PYTHON, "-m", "dist_train", "slurm", "output-dir", str(config)], env={"SLURM_JOB_ID": "31"})
    assert (proc.returncode, proc.stdout) == (0, f"{tmp_path}/runs/31\n")
    proc = run_cli(
        [PYTHON, "-m", "dist_train", "slurm", "output-dir", str(config), "train.nope=1"], env={"SLURM_JOB_ID": "31"}
    )
    assert proc.returncode == 2 and proc.stderr.startswith("dist_train: error: ")
    args = ["slurm", "output-dir", str(config), "train.lr=1e-3", "--job-id", "32", "run.output_dir=/shared/x"]
    proc = run_cli([PYTHON, "-m", "dist_train", *args])
    assert (proc.returncode, proc.stdout) == (0, "/shared/x\n"), proc.stderr


@pytest.mark.parametrize(
    "argv, message", [([], "give a command"), (["sbumit"], "unknown command `dist-train slurm sbumit`")]
)
def test_slurm_command_errors(argv, message):
    proc = run_cli([PYTHON, "-m", "dist_train", "slurm", *argv])
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1


# ---- the srun launcher (dist_train/distributed.py) ----------------------------------------------
@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("vm", "vm"),
        ("node[01-03,07]", "node01"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("rack[1-2]-n[3-4]", "rack1-n3"),
        ("n[7-9],m[1-2]", "n7"),
        ("node-[010-012]", "node-010"),
        ("h1.example.com,h2", "h1.example.com"),
        (" x[5]", "x5"),
    ],
)
def test_first_slurm_host_matches_scontrol(nodelist, first):
    assert first_slurm_host(nodelist) == first
    # the reference, where SLURM is set up: its own hostlist expansion (without a slurm.conf,
    # scontrol retries for a minute before failing)
    if shutil.which("scontrol") and Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).is_file():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split()[0] == first, out.stderr


STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"}


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, "single"),
        ({**STEP, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}, "srun"),
        ({**STEP, "SLURM_NTASKS": "8"}, "srun"),
        ({**STEP, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}, "single"),  # `srun -n1` in a bigger job
        ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, "single"),  # the batch script itself
        ({**STEP, "SLURM_NTASKS": "8", "RANK": "0", "WORLD_SIZE": "4"}, "torchrun"),  # torchrun inside srun
        ({"RANK": "0", "WORLD_SIZE": "2", "DIST_TRAIN_LAUNCHER": "spawn"}, "spawn"),
    ],
)
def test_detect_launcher(env, launcher):
    assert detect_launcher(env) == launcher


@pytest.fixture
def clean_env(monkeypatch):
    # _adopt_srun_environment writes RANK, MASTER_ADDR, ... into os.environ: restore it whole
    # afterwards, or later tests' subprocesses would believe they run under a launcher
    saved = dict(os.environ)
    yield _clean(monkeypatch)
    os.environ.clear()
    os.environ.update(saved)


def _clean(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    return monkeypatch


def adopt(monkeypatch, **env) -> dict[str, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    distributed._adopt_srun_environment()
    return {
        name: os.environ.get(name)
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }


def test_srun_environment_for_an_uneven_multi_node_step(clean_env):
    seen = adopt(
        clean_env,
        **STEP,
        SLURM_NTASKS="16",
        SLURM_STEP_NUM_TASKS="7",
        SLURM_STEP_TASKS_PER_NODE="2(x3),1",
        SLURM_TASKS_PER_NODE="4(x4)",
        SLURM_JOB_NODELIST="gpu[001-004]",
        SLURM_STEP_NODELIST="gpu[002-004,9]",
    )
    assert seen == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "7",  # the step's tasks, not the job's
        "LOCAL_WORLD_SIZE": "2",  # node 2 of 2(x3),1
        "MASTER_ADDR": "gpu002",  # the step's first node: rank 0 runs there
        "MASTER_PORT": str(15000 + (16 * 4242 + 0) % 17000),
    }


def test_srun_environment_last_node_and_user_master(clean_env):
    seen = adopt(
        clean_env,
        **{**STEP, "SLURM_NODEID": "3", "SLURM_STEP_ID": "3"},
        SLURM_NTASKS="7",
        SLURM_TASKS_PER_NODE="2(x3),1",
        SLURM_JOB_NODELIST="cn[7-10]",
        MASTER_PORT="23456",
    )
    assert (seen["WORLD_SIZE"], seen["LOCAL_WORLD_SIZE"], seen["MASTER_ADDR"]) == ("7", "1", "cn7")
    assert seen["MASTER_PORT"] == "23456"  # an exported port is kept


def test_srun_config_error_is_said_once_per_node(tmp_path):
    # direct srun: the config is read before RANK/LOCAL_RANK are derived from SLURM's variables
    config = write_config(tmp_path / "bad.yaml", tiny_lm_config(tmp_path / "run", train={"lr": "abc"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK")}
    env.update(STEP, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for local_id, lines in (("1", 0), ("0", 1)):
        cmd = [PYTHON, "-m", "dist_train", "--config", str(config)]
        out = subprocess.run(cmd, env={**env, "SLURM_LOCALID": local_id}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("dist_train: error: `train.lr`") == lines, (local_id, out.stderr)


def test_srun_ports_stay_below_the_ephemeral_range_and_differ_per_step():
    ports = {(job, step): 15000 + (16 * job + step) % 17000 for job in range(1, 50000, 7) for step in range(3)}
    assert all(15000 <= port < 32000 for port in ports.values())
    assert all(
        ports[(job, 0)] != ports[(job, 1)] and ports[(job, 0)] != ports[(job + 7, 0)] for job in range(1, 40000, 7)
    )


# ---- dist-train slurm torchrun (no cluster: signal the process tree the way scancel does) -------
@pytest.mark.slow
def test_torchrun_wrapper_survives_usr1_and_exits_75(tmp_path):
    raw = tiny_lm_config(tmp_path / "out", train={"max_steps": 400}, checkpoint={"every_steps": 50})
    raw["data"].update(name="jobdata:slow_tokens", delay_s=0.005)
    config = write_config(tmp_path / "c.yaml", raw)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests" / "slurm")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "dist_train", "slurm", "torchrun", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "dist_train", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "out" / "metrics.jsonl").exists() and len(read_rows(tmp_path / "out")) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) == 3  # agent + 2 ranks
        for process in tree:  # what `scancel --signal=USR1` does: every process of the step
            process.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output
    assert "the ranks stopped after their checkpoint (exit status 75)" in output
    stopped = re.findall(r"\[rank (\d)\] WARNING stop signal received: checkpointing step (\d+)", output)
    assert sorted(stopped)[0][1] == sorted(stopped)[1][1] and len(stopped) == 2, output
    step = int(stopped[0][1])
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"


def test_dist_train_torchrun_on_a_port_in_use_is_one_line():
    """--master_port that another process listens on (two jobs on torchrun's default 29500): the
    agent's store raised DistNetworkError EADDRINUSE with a traceback and status 1."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "dist_train"]
        proc = run_cli([PYTHON, "-m", "dist_train", "torchrun", *args], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"dist_train: error: dist-train torchrun: port {port} is in use"), lines[0]


def test_dist_train_torchrun_with_a_bad_command_line_is_one_line():
    """torchrun's own argument errors: its argparse usage block, or a traceback with status 1
    (`--nproc_per_node=x`, `--max-restarts=-1`); no rank starts."""
    for args, expected in (
        ([], "the following arguments are required: training_script"),
        (["--nproc_per_node=x", "-m", "dist_train"], "Unsupported nproc_per_node value: x"),
        (["--max-restarts=-1", "-m", "dist_train"], "max_restarts must be >= 0"),
        (["--nproc_per_node=0", "-m", "dist_train"], "--nproc_per_node must be >= 1, got 0"),  # were bare
        (["--monitor-interval=0", "-m", "dist_train"], "--monitor-interval must be > 0, got 0.0"),  # AssertionErrors
    ):
        proc = run_cli([PYTHON, "-m", "dist_train", "torchrun", *args], timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("dist_train: error:") and expected in lines[0], lines[0]
