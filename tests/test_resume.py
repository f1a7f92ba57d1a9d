"""Bit-exact resume across real interruptions at world size 2 (accumulation 2, dropout, loader
workers): SIGTERM, SIGUSR1 to one rank, kill -9 of a rank or of the launcher; torchrun elastic restarts."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO_ROOT, free_port, launch, load_weights, max_abs_diff, read_rows, write_config

import dist_train.checkpoint as ckpt

pytestmark = pytest.mark.slow
TIMING = {"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_rss_mb"}
ENV = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}


def resume_config(output_dir: Path) -> dict:
    return {
        "run": {"output_dir": str(output_dir), "seed": 3},
        "model": {
            "name": "transformer_lm",
            "vocab_size": 64,
            "seq_len": 16,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "dropout": 0.1,
        },
        "data": {
            "name": "userpkg.slow:slow_tokens",
            "delay": 0.004,
            "vocab_size": 64,
            "seq_len": 16,
            "num_samples": 400,
            "eval_samples": 40,
        },
        "train": {"max_steps": 30, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 1e-3},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "loader": {"num_workers": 1},
        "eval": {"every_steps": 10},
        "checkpoint": {"every_steps": 4, "keep_last": 10},
        "log": {"every_steps": 2, "plot": False},
    }


def spawn_cmd(config: Path) -> list[str]:
    return [PYTHON, str(REPO_ROOT / "launch/spawn.py"), "--nproc_per_node", "2", "--config", str(config)]


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        spawn_cmd(config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_checkpoint(output_dir: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (output_dir / "checkpoints" / "latest").exists():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except FileNotFoundError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def rank_pids(launcher_pid: int) -> list[int]:
    """The two rank processes of a spawn.py launcher (its children other than the resource tracker)."""
    pids = [p for p in children(launcher_pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(pids) == 2, pids
    return sorted(pids)


def descendants(root: int) -> set[int]:
    family, grew = {root}, True
    while grew:
        new = {c for p in family for c in children(p)} - family
        family |= new
        grew = bool(new)
    return family


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(resume_config(tmp / "out"), tmp, nproc=2, launcher="forked")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def finish_and_compare(config: Path, output_dir: Path, uninterrupted: Path) -> int:
    proc = launch(config, output_dir.parent, nproc=2, env=ENV)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_abs_diff(load_weights(uninterrupted), load_weights(output_dir)) == 0.0  # bit-identical
    rows = read_rows(output_dir)
    marker = [r for r in rows if "resumed_from" in r][-1]
    after = rows[rows.index(marker) + 1 :]
    expected = [r for r in read_rows(uninterrupted) if r["step"] > marker["step"]]
    assert stable(after) == stable(expected)
    return marker["step"]


@pytest.mark.parametrize("target", ["launcher", "process group"])
def test_sigterm_checkpoints_and_resumes_bit_exact(tmp_path, uninterrupted, target):
    """SIGTERM to the launcher (which forwards it to the ranks), or to every process of the job as
    torchrun's shutdown and SLURM do: the loader workers too, which must not fail their rank."""
    config = write_config(tmp_path / "c.yaml", resume_config(tmp_path / "out"))
    proc = start(config)
    wait_for_checkpoint(tmp_path / "out", proc)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, proc.stderr.read()
    latest = ckpt.read_latest(tmp_path / "out" / "checkpoints")
    ckpt.verify(tmp_path / "out" / "checkpoints" / latest)
    step = finish_and_compare(config, tmp_path / "out", uninterrupted)
    assert 4 <= step < 30 and latest == f"step-{step:08d}"


def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, uninterrupted):
    config = write_config(tmp_path / "c.yaml", resume_config(tmp_path / "out"))
    proc = start(config)
    wait_for_checkpoint(tmp_path / "out", proc)
    rank1 = rank_pids(proc.pid)[1]
    os.kill(rank1, signal.SIGUSR1)
    time.sleep(0.02)
    os.kill(rank1, signal.SIGUSR1)  # a second signal during the stop changes nothing
    assert proc.wait(timeout=60) == 75, proc.stderr.read()
    root = tmp_path / "out" / "checkpoints"
    latest = ckpt.read_latest(root)
    manifest = ckpt.verify(root / latest)
    assert manifest["world_size"] == 2 and {"rank-00000.pt", "rank-00001.pt"} <= set(manifest["files"])
    assert not list(root.glob(".tmp-*"))  # no half-written second save
    finish_and_compare(config, tmp_path / "out", uninterrupted)


@pytest.mark.parametrize("victim", ["rank", "launcher"])
def test_kill_9_then_the_same_command_resumes_bit_exact(tmp_path, uninterrupted, victim):
    config = write_config(tmp_path / "c.yaml", resume_config(tmp_path / "out"))
    proc = start(config)
    wait_for_checkpoint(tmp_path / "out", proc)
    time.sleep(0.3)
    ranks = rank_pids(proc.pid)
    family = descendants(proc.pid) - {proc.pid}  # ranks and their DataLoader workers
    os.kill(ranks[1] if victim == "rank" else proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while alive := [p for p in family | descendants(proc.pid) if _running(p)]:
        assert time.monotonic() < deadline, f"processes outlived the job: {alive}"
        time.sleep(0.1)
    assert proc.returncode != 0
    if victim == "rank":  # the launcher says which rank died and how: the rank itself could not
        assert "dist_train: rank 1 (pid " in proc.stderr.read()
    step = finish_and_compare(config, tmp_path / "out", uninterrupted)
    assert step >= 4


def test_torchrun_elastic_restart_after_a_rank_is_killed(tmp_path):
    def config(output_dir, fail_rank):
        return {
            "run": {"output_dir": str(output_dir)},
            "model": {"name": "userpkg.faulty:faulty", "fail_rank": fail_rank, "fail_call": 9, "mode": "exit_once"},
            "data": {"name": "synthetic_vectors", "num_samples": 512},
            "train": {"max_steps": 12, "micro_batch_size": 4, "grad_accum_steps": 2},
            "checkpoint": {"every_steps": 2},
            "log": {"every_steps": 1, "plot": False},
        }

    reference = launch(config(tmp_path / "ref", fail_rank=99), tmp_path, nproc=2, launcher="forked")
    assert reference.returncode == 0, reference.stderr[-2000:]
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "dist_train",
        "--config",
        str(write_config(tmp_path / "c.yaml", config(tmp_path / "out", fail_rank=1))),
    ]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "out")
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] == ["step-00000004"]  # died in step 5
    assert max_abs_diff(load_weights(tmp_path / "ref"), load_weights(tmp_path / "out")) == 0.0


def test_two_node_c10d_restart_when_only_one_node_failed(tmp_path):
    """Two `dist-train torchrun` agents ("nodes") in one c10d rendezvous with --max-restarts: rank 1
    dies while rank 0 is busy outside a collective, so node 0's agent restarts its rank for the
    waiting node without counting a restart (TORCHELASTIC_RESTART_COUNT 0 there, 1 on node 1).
    The restarted ranks still meet, resume and finish."""
    config = resume_config(tmp_path / "out")
    config["data"]["delay"] = 0.1  # about 1 s of loading per step: rank 0 is seldom in a collective
    config["train"]["max_steps"] = 6
    config["checkpoint"]["every_steps"] = 2
    config["eval"]["every_steps"] = None
    config["dist"] = {"timeout_s": 20}
    path = write_config(tmp_path / "c.yaml", config)
    port, env = free_port(), {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    rdzv = [f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_backend=c10d", "--rdzv_id=two-nodes", "--max-restarts=1"]
    cmd = [PYTHON, "-m", "dist_train", "torchrun", "--nnodes=2", "--nproc_per_node=1", *rdzv]
    cmd += ["-m", "dist_train", "--config", str(path)]
    agents = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        wait_for_checkpoint(tmp_path / "out", agents[0])
        ranks = {}
        for agent in agents:
            for pid in children(agent.pid):
                rank = [v for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v.startswith("RANK=")]
                ranks[rank[0]] = pid
        os.kill(ranks["RANK=0"], signal.SIGSTOP)  # busy: its agent sees the waiting node, not a failure
        os.kill(ranks["RANK=1"], signal.SIGKILL)
        time.sleep(3)
        os.kill(ranks["RANK=0"], signal.SIGCONT)
        codes = [agent.wait(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert codes == [0, 0], [agent.stderr.read()[-3000:] for agent in agents]
    rows = read_rows(tmp_path / "out")
    assert len([r for r in rows if "resumed_from" in r]) == 1 and rows[-1]["step"] == 6


def test_ddp_at_three_ranks_resumes_bit_exact(tmp_path):
    """At 3 ranks an element's all-reduced sum depends on its place in DDP's bucket (gloo's ring), and
    DDP reduces its first backward in one bucket in parameter order before it rebuilds the buckets in
    gradient-ready order: a resumed run's first step summed in another order than the uninterrupted
    run's (weights 3e-8 apart). A cnn with BatchNorm (unsynced) and dropout, accumulation 2: the warm-up
    that restores the bucket order leaves the statistics and the random streams as they were."""
    config = {
        "run": {"output_dir": str(tmp_path / "whole"), "seed": 0},
        "model": {"name": "cnn", "in_channels": 3, "num_classes": 3, "channels": [5], "dropout": 0.2},
        "data": {"name": "synthetic_images", "num_classes": 3, "image_size": 4, "num_samples": 36, "eval_samples": 5},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 1e-2},
        "checkpoint": {"every_steps": 2},
        "log": {"every_steps": 1, "plot": False},
    }
    whole = launch(config, tmp_path, nproc=3, launcher="forked")
    assert whole.returncode == 0, whole.stderr[-3000:]
    step_2 = f"checkpoint.resume={tmp_path / 'whole'}/checkpoints/step-00000002"
    resumed = launch(config, tmp_path, [f"run.output_dir={tmp_path / 'resumed'}", step_2], nproc=3, launcher="forked")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_rows(tmp_path / "resumed")[0] == {"resumed_from": "step-00000002", "step": 2}
    assert max_abs_diff(load_weights(tmp_path / "whole"), load_weights(tmp_path / "resumed")) == 0
