"""Runtime behaviour: exact distributed eval, failing ranks, loopback-only spawn, the quickstart."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    PYTHON,
    REPO_ROOT,
    ctx_from_env,
    free_port,
    launch,
    read_rows,
    run_cli,
    run_ranks,
    slow_lm_config,
    start,
    tiny_lm_config,
    wait_for_step,
    write_config,
)

from dist_train.config import from_dict
from dist_train.slurm.job import _children

pytestmark = pytest.mark.slow


def _eval_on_ranks(rank, world, raw):
    from dist_train.data import build_eval_data
    from dist_train.evaluation import evaluate
    from dist_train.losses import build_loss
    from dist_train.models import build_model
    from dist_train.strategies import build_strategy

    cfg = from_dict(raw)
    ctx = ctx_from_env()
    torch.manual_seed(0)
    strategy = build_strategy(cfg, ctx)
    strategy.setup(build_model(cfg.model.name, cfg.model.kwargs))
    return evaluate(strategy, build_loss(cfg.train.loss, **cfg.train.loss_kwargs), build_eval_data(cfg, ctx), ctx)


def test_eval_perplexity_is_the_plain_likelihood_whatever_the_loss():
    """Label smoothing and focal weighting change eval_loss, not the model's likelihood."""
    plain, smoothed, focal = (
        run_ranks(_eval_on_ranks, 2, tiny_lm_config("unused", data={"eval_samples": 21}, train=train))[0]
        for train in ({}, {"loss_kwargs": {"label_smoothing": 0.3}}, {"loss": "focal"})
    )
    assert smoothed["eval_loss"] > plain["eval_loss"] > focal["eval_loss"]
    for other in (smoothed, focal):
        assert other["eval_perplexity"] == pytest.approx(plain["eval_perplexity"], rel=1e-12)
        assert other["eval_accuracy"] == plain["eval_accuracy"]


def test_eval_metrics_identical_for_world_sizes_1_2_3():
    raws = {
        "lm": tiny_lm_config("unused", data={"eval_samples": 49}, eval={"micro_batch_size": 4}),
        "mlp": {
            "run": {"output_dir": "unused"},
            "model": {"name": "mlp"},
            "data": {"name": "synthetic_vectors", "eval_samples": 97},
            "eval": {"micro_batch_size": 8},
        },
    }
    for name, raw in raws.items():
        results = [run_ranks(_eval_on_ranks, world, raw) for world in (1, 2, 3)]
        for per_rank in results:
            assert all(r == per_rank[0] for r in per_rank)  # every rank reports the same
        reference = results[0][0]
        assert "eval_accuracy" in reference and (("eval_perplexity" in reference) == (name == "lm"))
        for per_rank in results[1:]:
            assert per_rank[0]["eval_accuracy"] == reference["eval_accuracy"]
            assert per_rank[0]["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)


def faulty_config(tmp_path, mode, **train):
    return {
        "run": {"output_dir": str(tmp_path / f"out-{mode}")},
        "model": {"name": "userpkg.faulty:faulty", "fail_rank": 1, "fail_call": 3, "mode": mode},
        "data": {"name": "synthetic_vectors"},
        "train": {"max_steps": 50, **train},
        "dist": {"timeout_s": 20},
        "log": {"every_steps": 1, "plot": False},
    }


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_a_rank_that_raises_fails_the_whole_job(tmp_path, launcher):
    start = time.monotonic()
    env = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = launch(faulty_config(tmp_path, "raise"), tmp_path, nproc=2, launcher=launcher, timeout=120, env=env)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 1 failed at step 3: RuntimeError: injected failure" in proc.stderr


def test_a_rank_lost_after_its_step_fails_the_others_naming_the_step(tmp_path):
    """Rank 1 dies after the optimizer step of step 3, when rank 0 all-reduces the logged loss: rank 0's
    message names the step too (it said `rank 0 failed: RuntimeError: ... Connection closed by peer`)."""
    env = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = launch(faulty_config(tmp_path, "exit_after_step"), tmp_path, nproc=2, timeout=120, env=env)
    assert proc.returncode != 0
    assert "rank 0 failed after step 3: RuntimeError: " in proc.stderr, proc.stderr[-3000:]


def test_spawn_names_a_rank_that_exits_without_a_word(tmp_path):
    """A rank that leaves with a status of its own (sys.exit, os._exit in user code) says nothing, and
    its peer's error (a lost connection) names the peer: spawn.py names the rank and its status."""
    env = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = launch(faulty_config(tmp_path, "exit"), tmp_path, nproc=2, launcher="spawn", timeout=120, env=env)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert "dist_train: rank 1 (pid " in proc.stderr and ") exited with status 9" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_a_hung_rank_fails_within_the_timeout_with_stacks(tmp_path, launcher):
    """spawn.py killed the hung rank 20 s after its peer's collective timed out: before its watchdog
    (dist.timeout_s + 30 s) dumped the stack, so nothing showed where it hung."""
    mark = tmp_path / "hang-began"
    env = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "FAULTY_HANG_MARK": str(mark)}
    proc = launch(faulty_config(tmp_path, "hang"), tmp_path, nproc=2, launcher=launcher, timeout=200, env=env)
    assert proc.returncode != 0
    # dist.timeout_s (20 s) + the watchdog's 30 s after the hang, then the stack dump and the exits;
    # timed from the hang, not the launch, whose start-up takes 5-25 s with the suite's load
    hung_for = time.time() - mark.stat().st_mtime
    assert 20 < hung_for < 20 + 30 + 15, hung_for
    assert "faulty.py" in proc.stderr and "in forward" in proc.stderr  # the hung rank's stack was dumped


def _listening_sockets(pids: set[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, PermissionError):
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError):
                continue
    family, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in family} - family
        family |= new
        grew = bool(new)
    return family


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_spawn_listens_on_loopback_only(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "out", train={"max_steps": 400}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = subprocess.Popen(
        [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "out" / "metrics.jsonl").exists():  # training: store and gloo are up
                seen = _listening_sockets(_descendants(proc.pid))
                if seen:
                    break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert seen, "found no listening socket of the run"
    assert set(seen) <= LOOPBACK, seen


def test_quickstart_trains_on_two_ranks_with_falling_loss(tmp_path):
    start = time.monotonic()
    proc = launch(REPO_ROOT / "configs/quickstart.yaml", tmp_path, [f"run.output_dir={tmp_path / 'qs'}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 90  # 25 s alone, 34 s in the parallel suite (2-core VM)
    rows = read_rows(tmp_path / "qs")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert (tmp_path / "qs" / "model.safetensors").stat().st_size > 100_000
    assert (tmp_path / "qs" / "checkpoints" / "latest").read_text().strip() == "step-00000120"


def test_an_error_every_rank_meets_is_said_once(tmp_path):
    """A config mistake every rank meets alike (here found once the process group is up: an unknown
    model argument) is one line from the node's local rank 0, with status 2 through spawn.py and
    through `dist-train torchrun` (plain torchrun reports any failed rank as 1)."""
    config = tiny_lm_config(tmp_path / "out", model={"widht": 3})
    proc = launch(config, tmp_path, nproc=2, launcher="spawn", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("dist_train: error: model 'transformer_lm'") and "widht" in lines[0]
    # found while the loop is built, past the model and data: the loss, the strategy (each rank said it)
    good = write_config(tmp_path / "good.yaml", tiny_lm_config(tmp_path / "out2"))
    spawn = [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(good)]
    proc = run_cli([*spawn, "train.loss=nope"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("dist_train: error: unknown train.loss 'nope'"), lines
    path = write_config(tmp_path / "c.yaml", config)
    # found before any process group: the rank that says it is often not the first to exit
    for args, expected in ((["train.lr=abc"], "`train.lr` must be a finite number"), (["--bogus"], "--bogus")):
        spawn = [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(path)]
        proc = run_cli([*spawn, *args], timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    torchrun = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = run_cli([PYTHON, "-m", "dist_train", "torchrun", *torchrun, "-m", "dist_train", "--config", str(path)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("dist_train: error: model 'transformer_lm'") == 1 and "Traceback" not in proc.stderr
    # one only rank 0 meets (it creates run.output_dir): its peers stop with it instead of waiting
    torchrun[-1] = str(free_port())
    started = time.monotonic()
    cmd = [PYTHON, "-m", "dist_train", "torchrun", *torchrun, "-m", "dist_train", "--config", str(path)]
    proc = run_cli([*cmd, "run.output_dir=/proc/no/such"])  # found before the model (and its widht)
    # the peers would wait out dist.timeout_s (600 s); they stop after start-up (15-45 s on a loaded 2-core machine)
    assert proc.returncode == 2 and time.monotonic() - started < 120, proc.stderr[-2000:]
    assert proc.stderr.count("dist_train: error: run.output_dir /proc/no/such: cannot create it") == 1


def _stop_the_group_once_a_child_runs(tmp_path, config) -> subprocess.Popen:
    """Start a one-process run in its own process group; once the rank has a child process (its only
    one), wait 0.5 s and SIGTERM the whole group, as torchrun's shutdown or scancel do."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "dist_train", "--config", str(write_config(tmp_path / "c.yaml", config))]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not _children(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    return proc


def test_a_stop_signal_to_the_group_while_a_loader_worker_starts_checkpoints(tmp_path):
    """SIGTERM to every process of the job (torchrun's shutdown, scancel) while a loader worker is
    starting: torch's worker handler (SIGTERM not from the rank: die) ran before worker_init_fn's
    SIG_IGN, so the worker died and failed its rank (status 1). Workers start with the stop signals
    blocked now: the rank checkpoints and exits 75."""
    config = tiny_lm_config(tmp_path / "out", train={"max_steps": 50}, checkpoint={"every_steps": 1000})
    config["data"] = {**config["data"], "name": "userpkg.slow:slow_worker_start_tokens", "worker_start_delay": 3.0}
    config["loader"] = {"num_workers": 1}
    proc = _stop_the_group_once_a_child_runs(tmp_path, config)  # the loader worker, inside its (3 s) start
    assert proc.wait(timeout=60) == 75, proc.stderr.read()[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").is_file()


def test_a_stop_signal_to_the_group_while_the_rank_runs_a_compiler_checkpoints(tmp_path):
    """SIGTERM to every process of the job while the rank waits for a child process it started, as
    torch.compile waits for g++ when it recompiles the model for its first evaluation: the compiler
    died of the signal and the rank failed (status 1, `failed evaluating step 4: InductorError:
    CppCompileError`). Processes the rank starts while it trains hold the stop signals blocked now:
    the child ends well, and the rank checkpoints and exits 75."""
    config = tiny_lm_config(tmp_path / "out", train={"max_steps": 50}, checkpoint={"every_steps": 2})
    config["model"] = {"name": "userpkg.slow:compiling_at_eval", "seconds": 3.0}
    config["data"] = {"name": "synthetic_vectors", "num_samples": 256, "eval_samples": 16}
    config["eval"] = {"every_steps": 4}
    proc = _stop_the_group_once_a_child_runs(tmp_path, config)  # the "compiler", inside its 3 s
    assert proc.wait(timeout=60) == 75, proc.stderr.read()[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step-00000004\n"


@pytest.mark.parametrize("sig, delay_s", [(signal.SIGUSR1, 0.3), (signal.SIGUSR1, 1.5), (signal.SIGTERM, 1.5)])
def test_spawn_keeps_a_stop_signal_sent_during_start_up(tmp_path, sig, delay_s):
    """SIGUSR1 while spawn.py (0.3 s) or its ranks (1.5 s) import torch, SIGTERM while the ranks do:
    blocked until the forwarder and the ranks' handlers are in place, then a checkpoint and status 75,
    as during training (multiprocessing's resource tracker unblocked SIGTERM before the ranks began)."""
    config = write_config(tmp_path / "c.yaml", slow_lm_config(tmp_path / "out", 0.002))
    proc = start([PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(config)])
    time.sleep(delay_s)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("to", ["parent", "group"])
def test_spawn_interrupted_by_sigint_stops_its_ranks_and_exits_130(tmp_path, to):
    """Ctrl-C (SIGINT to the process group) or a SIGINT to spawn.py alone: the ranks stop without a
    checkpoint and spawn.py says so in one line with status 130, as `python -m dist_train` exits.
    spawn.py printed a KeyboardInterrupt traceback, and with the SIGINT its alone it went on waiting
    for ranks that trained on to max_steps."""
    config = write_config(tmp_path / "c.yaml", slow_lm_config(tmp_path / "out", 0.02))
    cmd = [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(config)]
    proc = start(cmd, start_new_session=True)
    wait_for_step(proc, tmp_path / "out", 5)
    ranks = [pid for pid in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(ranks) == 2, ranks
    try:
        os.killpg(proc.pid, signal.SIGINT) if to == "group" else proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=30)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.endswith("dist_train: interrupted (SIGINT): the ranks stopped without a checkpoint\n"), stderr[-2000:]
    assert "Traceback" not in stderr and stderr.count("ERROR interrupted") == 2, stderr[-2000:]
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()], "ranks outlived spawn.py"  # it reaped them
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("delay_s", [0.3, 0.6])
def test_spawn_interrupted_while_it_starts_is_one_line(tmp_path, delay_s):
    """SIGINT while spawn.py imports torch: a KeyboardInterrupt traceback (and status -2); and once in a
    full CI run no effect at all (swallowed inside an extension's import: ranks trained on, status 0).
    The SIGINT now waits, blocked, until the import is done."""
    config = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "out"))
    cmd = [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr == "dist_train: interrupted (SIGINT): the ranks stopped without a checkpoint\n", stderr[-2000:]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rank_started_by_hand_outlives_the_shell_that_started_it(tmp_path):
    """RANK/WORLD_SIZE/MASTER_* exported by hand, `nohup python -m dist_train ... &`, and the shell
    exits: the rank trains on, as one process does. It took the parent-death SIGKILL meant for ranks
    of torchrun and spawn.py, and died without a word."""
    config = tiny_lm_config(tmp_path / "out", train={"max_steps": 40})
    config["data"] = {**config["data"], "name": "userpkg.slow:slow_tokens", "delay": 0.01}
    path = write_config(tmp_path / "c.yaml", config)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    script = f'"$0" -m dist_train --config {path} >/dev/null 2>&1 & echo $!; wait'
    shell = subprocess.Popen(["bash", "-c", script, PYTHON], env=env, stdout=subprocess.PIPE, text=True)
    rank = int(shell.stdout.readline())
    try:
        metrics, deadline = tmp_path / "out" / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and '"step": 2' in metrics.read_text()):
            assert shell.poll() is None and time.monotonic() < deadline, "the rank did not start training"
            time.sleep(0.1)
        shell.kill()  # the shell goes; its background job stays
        shell.wait()
        while _running(rank) and time.monotonic() < deadline + 60:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank, signal.SIGKILL)
    assert (tmp_path / "out" / "model.safetensors").exists(), "the rank died with its shell"
    assert read_rows(tmp_path / "out")[-1]["step"] == 40


def test_one_process_stopped_during_start_up_says_it_has_nothing_to_save(tmp_path):
    """A one-process run takes a start-up signal before its first step: status 75 (a requeue starts
    it again), no checkpoint, and a log line that says so instead of announcing a checkpoint."""
    config = tiny_lm_config(tmp_path / "out", train={"max_steps": 400}, checkpoint={"every_steps": 1000})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "dist_train", "--config", str(write_config(tmp_path / "c.yaml", config))]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch takes seconds: the signal waits, blocked, for the stop handler
    proc.send_signal(signal.SIGUSR1)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, stderr[-2000:]
    assert "stop signal received: nothing new to checkpoint at step 0; exiting" in stderr, stderr[-2000:]
    assert "checkpointing step" not in stderr and not (tmp_path / "out" / "checkpoints").exists()


def test_dist_train_torchrun_does_not_restart_a_config_error(tmp_path):
    """--max-restarts retried a config mistake: the same error three times, then status 2."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "out"))
    torchrun = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "dist_train", "torchrun", *torchrun, "--max-restarts=2", "-m", "dist_train"]
    proc = run_cli([*cmd, "--config", str(path), "model.name=userpkg.nosuch:model"], env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("cannot import `userpkg.nosuch`") == 1, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "sig, when, restarts",
    [(signal.SIGTERM, "training", 0), (signal.SIGUSR1, "start-up", 0), (signal.SIGUSR1, "training", 2)],
)
def test_dist_train_torchrun_passes_stop_signals_to_the_ranks(tmp_path, sig, when, restarts):
    """A signal to the agent of `dist-train torchrun` reaches its ranks (torchrun starts them in
    sessions of their own); one during start-up waits for the stop handler instead of killing a
    rank. The ranks checkpoint and the agent exits 75, as every other launcher does, with
    --max-restarts too (its agent restarted the stopped ranks, which resumed and trained on)."""
    path = write_config(tmp_path / "c.yaml", slow_lm_config(tmp_path / "out", 0.002))
    torchrun = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    torchrun.append(f"--max-restarts={restarts}")
    proc = start([PYTHON, "-m", "dist_train", "torchrun", *torchrun, "-m", "dist_train", "--config", str(path)])
    if when == "training":
        wait_for_step(proc, tmp_path / "out", 20)
    else:
        time.sleep(1.0)  # the ranks are importing torch
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    latest = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    assert latest < "step-00000400" and (latest >= "step-00000020" or when == "start-up"), latest
    assert not [row for row in read_rows(tmp_path / "out") if "resumed_from" in row]  # stopped, not restarted


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_join_fails_in_one_line_naming_the_timeout(tmp_path, rank):
    """Rank 0 of 2 started alone (its peer's node failed before joining, or never started): after
    dist.timeout_s it failed with torch's DistStoreError traceback, which said neither what happened
    nor which setting bounds the wait. Rank 1 started alone (rank 0, which hosts the store, never came
    up) failed with a DistNetworkError traceback (and torch's C++ frames) in the same case."""
    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "out", dist={"timeout_s": 2}))
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(path)], env={**env, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    if rank == 0:
        assert "rank 0 of 2: not every rank joined the process group within dist.timeout_s=2 s" in line
        assert "failed before joining, or never started" in line
    else:
        assert "rank 1 of 2: could not join the rendezvous store at 127.0.0.1:" in line
        assert "within dist.timeout_s=2 s" in line and "never started" in line


def test_a_rank_whose_store_port_another_program_holds_stops_after_the_timeout(tmp_path):
    """MASTER_PORT held by a program that accepts connections but never answers (rank 0 then stops: the
    port is in use): torch's TCPStore client waited for its answer forever (>100 s at dist.timeout_s=20)."""
    import socket

    path = write_config(tmp_path / "c.yaml", tiny_lm_config(tmp_path / "out", dist={"timeout_s": 1}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # never accepts: the kernel completes the handshake, nobody answers
        env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        started = time.monotonic()
        proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(path)], env=env, timeout=90)
    assert proc.returncode == 1 and time.monotonic() - started < 60, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("dist_train: rank 1 of 2: the rendezvous store at 127.0.0.1:")
    assert "did not answer within dist.timeout_s=1 s + 10 s" in proc.stderr
