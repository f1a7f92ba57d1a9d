"""The slurm/ templates on a real SLURM cluster: CPU torchrun, direct srun, multi-node rendezvous,
and preemption (USR1 -> one checkpoint on every rank -> requeue -> resume -> bit-identical weights).

Needs the local cluster of tests/slurm/cluster.sh (`.ci/run` starts it; by hand: `bash
tests/slurm/cluster.sh start`); without it every test here skips. The node has 2 CPUs, so jobs run
one after the other; sacct is not available, jobs are followed with `scontrol show job`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO_ROOT, launch, load_weights, max_abs_diff, read_rows, tiny_lm_config, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment jobs are submitted with; skips the module when no SLURM cluster is up."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (no sbatch on PATH); `bash tests/slurm/cluster.sh start` sets one up")
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        state = "; ".join(status.stdout.split("\n")[:4])
        pytest.skip(f"the local SLURM cluster is not usable (start it: bash {CLUSTER_SH} start): {state}")
    conf = re.search(r"SLURM_CONF=(\S+)", status.stdout)
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # `python` in jobs: ours
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests" / "slurm")]),
        OMP_NUM_THREADS="1",
    )
    if conf:
        env["SLURM_CONF"] = conf.group(1)
    env.pop("DIST_TRAIN_NPROC_PER_NODE", None)
    return env


@pytest.fixture
def jobs(slurm_env):
    """The ids of the jobs a test submits; any still queued or running when it ends are cancelled."""
    ids: list[str] = []
    yield ids
    for job in ids:
        if job_info(job, slurm_env).get("JobState") not in FINAL_STATES:
            subprocess.run(["scancel", job], env=slurm_env)


def sbatch(env: dict[str, str], jobs: list[str], *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    jobs.append(proc.stdout.strip().split(";")[0])
    return jobs[-1]


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, env: dict[str, str], log: Path, until=None, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Poll `scontrol show job` until `until(info)` or the job ends; on timeout cancel it and fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info.get("JobState") in FINAL_STATES or (until is not None and until(info)):
            return info
        time.sleep(0.3)
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=env)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s; log:\n{tail}")


def assert_completed(info: dict[str, str], log: Path, restarts: int = 0) -> str:
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), text[-3000:]
    return text


def lm_config(output_dir: Path, env_dir: Path | None = None, delay_s: float = 0.0, **sections) -> dict:
    config = tiny_lm_config(output_dir, **sections)
    config["data"].update(name="jobdata:slow_tokens", delay_s=delay_s)
    if env_dir:
        config["data"]["env_dir"] = str(env_dir)
    config["log"]["progress"] = "lines"
    return config


def recorded_env(env_dir: Path) -> list[dict]:
    return [json.loads((env_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_cpu_template_trains_two_ranks_in_a_folder_per_job(tmp_path, slurm_env, jobs):
    # a folder name YAML would cut or misread unquoted: the template passed `run.output_dir=.../runs #1 'x'/ID`
    # on, which the ranks read as `.../runs` (every job trained in, and resumed, that one folder)
    runs = tmp_path / "runs #1 'x'"
    config = write_config(tmp_path / "tiny.yaml", lm_config(runs, env_dir=tmp_path / "env"))
    job = sbatch(slurm_env, jobs, f"--output={tmp_path}/job-%j.out", "slurm/cpu.sbatch", str(config))
    log = tmp_path / f"job-{job}.out"
    text = assert_completed(wait_for(job, slurm_env, log), log)

    run_dir = runs / job  # no run.output_dir override: <config's output_dir>/<job id>
    assert (run_dir / "model.safetensors").is_file(), text
    rows = [row for row in read_rows(run_dir) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 11))
    assert "on 2 rank(s)" in text and f"dist_train: job {job} ends with status 0" in text
    ranks = recorded_env(tmp_path / "env")
    assert [r["RANK"] for r in ranks] == ["0", "1"] and all(r["TORCHELASTIC_RUN_ID"] for r in ranks)  # torchrun


def test_direct_srun_one_task_per_rank(tmp_path, slurm_env, jobs):
    run_dir = tmp_path / "given: #2"  # quoted on the command line, as YAML needs it: the template kept it quoted
    # the job is named after the config file: a space in it is quoted in the #SBATCH line (sbatch refused it)
    config = write_config(tmp_path / "tiny run.yaml", lm_config(tmp_path / "runs", env_dir=tmp_path / "env"))
    submit = subprocess.run(
        [sys.executable, "-m", "dist_train", "slurm", "submit", "--launcher", "srun", "--nproc-per-node", "2"]
        + ["--time", "10", "--signal-grace", "60", f"--sbatch-arg=--output={tmp_path}/job-%j.out"]
        + [str(config), f"run.output_dir='{run_dir}'"],
        env=slurm_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert submit.returncode == 0, submit.stderr
    job = re.match(r"Submitted batch job (\d+) \(srun\.sbatch\)", submit.stdout).group(1)
    jobs.append(job)
    log = tmp_path / f"job-{job}.out"
    text = assert_completed(wait_for(job, slurm_env, log), log)
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True).stdout
    assert f"JobId={job} JobName=tiny run\n" in shown, shown

    assert (run_dir / "model.safetensors").is_file(), text  # run.output_dir given: used as is
    assert not (tmp_path / "runs").exists()
    ranks = recorded_env(tmp_path / "env")
    expected_port = str(15000 + (16 * int(job) + int(ranks[0]["SLURM_STEP_ID"])) % 17000)
    for rank, seen in enumerate(ranks):
        assert seen["TORCHELASTIC_RUN_ID"] is None  # no torchrun: dist_train read SLURM's variables
        assert (seen["RANK"], seen["SLURM_PROCID"], seen["LOCAL_RANK"], seen["SLURM_LOCALID"]) == (str(rank),) * 4
        assert (seen["WORLD_SIZE"], seen["LOCAL_WORLD_SIZE"], seen["MASTER_PORT"]) == ("2", "2", expected_port)
        assert seen["MASTER_ADDR"] == job_info(job, slurm_env)["NodeList"]


def test_multi_node_template_rendezvous(tmp_path, slurm_env, jobs):
    """multi_node.sbatch's c10d rendezvous on the job's first host (one node here, no GPUs)."""
    config = write_config(tmp_path / "tiny.yaml", lm_config(tmp_path / "runs"))
    env = {**slurm_env, "DIST_TRAIN_NPROC_PER_NODE": "2"}
    options = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp_path}/job-%j.out"]
    job = sbatch(env, jobs, *options, "slurm/multi_node.sbatch", str(config))
    log = tmp_path / f"job-{job}.out"
    text = assert_completed(wait_for(job, env, log), log)
    assert "on 2 rank(s)" in text
    assert (tmp_path / "runs" / job / "model.safetensors").is_file(), text


@pytest.mark.parametrize(
    "template, options",
    [
        ("cpu", []),  # torchrun: the agent must survive USR1 and report the ranks' 75
        ("srun", ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]),  # one task per rank
    ],
)
def test_usr1_checkpoints_requeues_and_resumes_bit_identically(tmp_path, slurm_env, jobs, template, options):
    max_steps = 60
    sections = {
        "train": {"max_steps": max_steps},
        "checkpoint": {"every_steps": 10, "keep_last": 100},
    }
    # ~0.16 s per step (8 items x 20 ms per rank): slow enough to signal mid-run
    config = write_config(tmp_path / "slow.yaml", lm_config(tmp_path / "runs", delay_s=0.02, **sections))
    reference = lm_config(tmp_path / "reference", **sections)
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted reference runs meanwhile, outside SLURM
        python_path = {"PYTHONPATH": slurm_env["PYTHONPATH"]}
        reference_run = pool.submit(launch, reference, tmp_path, nproc=2, launcher="torchrun", env=python_path)
        job = sbatch(
            slurm_env, jobs, *options, f"--output={tmp_path}/job-%j.out", f"slurm/{template}.sbatch", str(config)
        )
        log, run_dir = tmp_path / f"job-{job}.out", tmp_path / "runs" / job

        def past_first_checkpoint(info: dict[str, str]) -> bool:
            rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            return any(row.get("step", 0) >= 12 for row in rows)

        info = wait_for(job, slurm_env, log, past_first_checkpoint)
        assert info["JobState"] == "RUNNING", log.read_text()[-3000:]
        # what `--signal=B:USR1@T` does at T seconds before the time limit: USR1 to the batch shell only
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
        signalled = time.monotonic()
        info = wait_for(job, slurm_env, log, lambda info: info.get("Restarts") == "1")
        assert info["Restarts"] == "1", log.read_text()[-3000:]
        requeued = time.monotonic()
        text = assert_completed(wait_for(job, slurm_env, log), log, restarts=1)
        reference_proc = reference_run.result()
    assert reference_proc.returncode == 0, reference_proc.stderr[-3000:]

    stops = re.findall(r"\[rank (\d)\] WARNING stop signal received: checkpointing step (\d+)", text)
    assert sorted(rank for rank, _ in stops) == ["0", "1"], text  # each rank stopped once ...
    step = int(stops[0][1])
    assert stops[1][1] == str(step) and 12 <= step < max_steps  # ... after the same step
    assert text.count(f"checkpoint step-{step:08d} written") == 1
    assert "requeueing job" in text and f"dist_train: job {job}, restart 1" in text
    rows = read_rows(run_dir)
    assert [row for row in rows if "resumed_from" in row] == [{"resumed_from": f"step-{step:08d}", "step": step}]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, max_steps + 1))  # none lost or repeated
    assert max_abs_diff(load_weights(run_dir), load_weights(tmp_path / "reference")) == 0.0
    print(f"USR1 -> requeued in {requeued - signalled:.1f} s; job done {time.monotonic() - requeued:.1f} s later")


def test_usr1_while_the_job_step_starts_requeues_instead_of_failing(tmp_path, slurm_env, jobs):
    """USR1 to the batch script while srun and its task start up (the time-limit signal can come
    at the job's start: slurmctld sends it up to 30 s early). The script passes it on at once; srun
    or the task, killed by it before their own handlers were in place, failed the job (138, no
    requeue). A Python that takes 1 s to start makes the task's window wide enough to hit."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nsleep 1\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**slurm_env, "DIST_TRAIN_PYTHON": str(python)}
    config = write_config(tmp_path / "tiny.yaml", lm_config(tmp_path / "runs", delay_s=0.02))
    job = sbatch(env, jobs, f"--output={tmp_path}/job-%j.out", "slurm/cpu.sbatch", str(config))
    log, run_dir = tmp_path / f"job-{job}.out", tmp_path / "runs" / job
    wait_for(job, env, log, lambda info: log.exists() and f"dist_train: job {job}, restart 0" in log.read_text())
    for _ in range(25):  # srun has just started: signal it all through its task's start-up
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env)
        time.sleep(0.1)
    text = assert_completed(wait_for(job, env, log), log, restarts=1)
    assert "requeueing job" in text and (run_dir / "model.safetensors").is_file(), text
    rows = read_rows(run_dir)
    assert len([row for row in rows if "resumed_from" in row]) == 1, text
    assert sorted({row["step"] for row in rows if "loss" in row}) == list(range(1, 11))


def test_usr1_to_the_ranks_while_they_import_is_kept(tmp_path, slurm_env, jobs):
    """`scancel --signal=USR1 JOB` signals the job step's processes, not the batch script (which so
    cannot repeat it). srun.sbatch's ranks start with USR1 ignored: one that came while a rank
    imported torch (seconds) was dropped, and the job ran to its end without stopping. The rank now
    holds it (blocked) until its stop handler is in place: it checkpoints, exits 75, is requeued."""
    config = write_config(tmp_path / "tiny.yaml", lm_config(tmp_path / "runs", delay_s=0.02))
    options = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path}/job-%j.out"]
    job = sbatch(slurm_env, jobs, *options, "slurm/srun.sbatch", str(config))
    log, run_dir = tmp_path / f"job-{job}.out", tmp_path / "runs" / job

    def ranks_started(info: dict[str, str]) -> bool:  # the cluster is this machine: look for them
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                args = cmdline.read_text().split("\0")
                if Path(args[0]).name.startswith("python") and ["--config", str(config)] == args[3:5]:
                    return True  # python -m dist_train --config CONFIG (not srun, not the bash wrapper)
        return False

    assert wait_for(job, slurm_env, log, ranks_started)["JobState"] == "RUNNING", log.read_text()
    time.sleep(0.5)  # past the interpreter's start, inside `import torch`
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True)
    text = assert_completed(wait_for(job, slurm_env, log), log, restarts=1)
    rows = read_rows(run_dir)
    assert [row for row in rows if "resumed_from" in row] == [{"resumed_from": "step-00000001", "step": 1}], text
    assert sorted({row["step"] for row in rows if "loss" in row}) == list(range(1, 11))
