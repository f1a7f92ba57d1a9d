"""The benchmark harness (bench/): it runs, both sides do the same work, and bench.gpu smoke-tests on CPU.
Also `train.compile: true` on CPU (in-place compile: bare state_dict keys)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import PYTHON, REPO_ROOT, load_weights, max_abs_diff, read_rows, run_cli, tiny_lm_config, write_config

from bench import cli as bench_cli
from bench.harness import Cell, command, run_env
from bench.workloads import LM, RESNET, smoke

# bench.gpu --strategy fsdp: bf16 parameters for compute, fp32 master weights, no resharding after forward
LM_BF16 = LM.scaled(precision="bf16", strategy_options={"reshard_after_forward": False})


@pytest.mark.slow
def test_bench_smoke_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--smoke", "--strategies", "ddp", "--workloads", "resnet", "--world-sizes", "2", "--json", str(out)]
    proc = run_cli([PYTHON, "-m", "bench", *args], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| resnet | 2 | ddp |" in proc.stdout
    assert (
        "[warm-up] ddp             dist_train done" in proc.stdout
        and "[warm-up] ddp             hand       done" in proc.stdout
    )
    report = json.loads(out.read_text())
    (cell,) = report["cells"]
    summary = cell["summary"]
    assert summary["ok"] and summary["pairs"] == 1
    for key in ("step_time_s", "samples_per_s", "cpu_per_step_s", "time_to_first_step_s", "peak_rss_mb"):
        assert summary[key]["ratio"] > 0, key
    run = cell["runs"][0][0]
    assert len(run["peak_rss_mb"]) == 2 and 0 < run["launch_to_train_s"] < run["time_to_first_step_s"]
    assert set(cell["targets"]) == {"step_time_s", "time_to_first_step_s", "peak_rss_mb"}
    assert report["machine"]["cores"] >= 1
    assert report["pooled"]["ddp"]["pairs"] == report["pooled"]["all"]["pairs"] == 1
    assert report["pooled"]["ddp"]["ratio"] == pytest.approx(summary["step_time_s"]["ratio"])


def test_pooled_step_ratios_geometric_mean_and_interval():
    from bench.harness import pooled_step_ratios

    def cell(strategy, world_size, ratios):
        runs = [({"ok": True, "step_time_s": r}, {"ok": True, "step_time_s": 1.0}) for r in ratios]
        return {"strategy": strategy, "world_size": world_size, "runs": runs}

    cells = [cell("ddp", 2, [0.9, 1.1, 1.0]), cell("fsdp", 2, [1.21, 1.0]), cell("ddp", 1, [5.0])]
    cells[0]["runs"].append(({"ok": False}, {"ok": True, "step_time_s": 1.0}))  # a failed run is left out
    pooled = pooled_step_ratios(cells)
    assert list(pooled) == ["ddp", "fsdp", "all"]  # world size 1 is not pooled
    assert pooled["ddp"]["pairs"] == 3 and pooled["ddp"]["ratio"] == pytest.approx((0.9 * 1.1) ** (1 / 3))
    assert pooled["fsdp"]["ratio"] == pytest.approx(1.1)
    assert pooled["all"]["pairs"] == 5 and pooled["all"]["ratio"] == pytest.approx((0.9 * 1.1 * 1.21) ** 0.2)
    for entry in pooled.values():
        assert entry["low"] <= entry["ratio"] <= entry["high"]
    assert 0.9 <= pooled["ddp"]["low"] and pooled["ddp"]["high"] <= 1.1
    # stratified by cell: two cells whose pairs agree within the cell leave no doubt about the mean
    steady = pooled_step_ratios([cell("ddp", 2, [0.9] * 4), cell("fsdp", 2, [1.1] * 4)])["all"]
    assert steady["low"] == pytest.approx(steady["ratio"]) == pytest.approx(steady["high"])


def test_bench_order_alternates_across_pairs_and_cells(monkeypatch, tmp_path):
    """abba: over a run each side goes first equally often (cell after cell, not only pair after pair)."""
    from bench import cli, harness

    order = []

    def fake_side(cell, side, run_dir, threads, timeout):
        order.append(side)
        return {"side": side, "ok": True, "step_time_s": 1.0}

    monkeypatch.setattr(harness, "run_side", fake_side)
    monkeypatch.setattr(cli, "summarise_cell", lambda pairs: {"ok": False})
    cli.main(["--smoke", "--repeats", "2", "--no-warmup", "--strategies", "ddp", "--json", str(tmp_path / "b.json")])
    firsts = order[::2]
    assert len(firsts) >= 4 and firsts.count("hand") == firsts.count("dist_train")
    assert firsts[0] != firsts[1]  # the second cell starts with the other side


def test_a_failed_run_fails_the_benchmark(monkeypatch, tmp_path, capsys):
    """One run failing among good ones: the cell is summarised over the pairs that ran, and both
    benchmarks say so and exit 1 (they exited 0 unless every pair of a cell had failed)."""
    from bench import cli, gpu, harness

    calls = []

    def fake_side(cell, side, run_dir, threads, timeout):
        calls.append(side)
        if side == "hand" and len(calls) == 3:  # the second pair (hand-written side first)
            return {"side": side, "ok": False, "exit": 1, "log_tail": "Traceback: boom"}
        ok = dict.fromkeys(("step_time_s", "samples_per_s", "cpu_per_step_s", "time_to_first_step_s"), 1.0)
        return {"side": side, "ok": True, **ok, "tokens_per_s": 1.0, "peak_rss_mb": [1.0], "run_dir": str(run_dir)}

    monkeypatch.setattr(harness, "run_side", fake_side)
    argv = ["--smoke", "--no-warmup", "--repeats", "2", "--strategies", "ddp", "--world-sizes", "1"]
    assert cli.main([*argv, "--workloads", "resnet", "--json", str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "Traceback: boom" in out
    assert "failed runs: resnet x1 ddp (1 of 2 pairs)" in out
    (cell,) = json.loads((tmp_path / "b.json").read_text())["cells"]
    assert cell["summary"]["ok"] and cell["summary"]["pairs"] == 1

    calls.clear()
    argv = ["--tiny", "--device", "cpu", "--no-compile", "--repeats", "2", "--json", str(tmp_path / "g.json")]
    assert gpu.main(argv) == 1
    assert "failed runs: 1 of 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())["summary"]["pairs"] == 1


def test_json_goes_into_a_new_folder(monkeypatch, tmp_path):
    """--json runs/bench.json where runs/ does not exist yet: written (it was a FileNotFoundError
    traceback once every run had finished, the report lost)."""
    from bench import cli, gpu, harness

    def fake_side(cell, side, run_dir, threads, timeout):
        ok = dict.fromkeys(("step_time_s", "samples_per_s", "cpu_per_step_s", "time_to_first_step_s"), 1.0)
        return {"side": side, "ok": True, **ok, "tokens_per_s": 1.0, "peak_rss_mb": [1.0], "run_dir": str(run_dir)}

    monkeypatch.setattr(harness, "run_side", fake_side)
    argv = ["--smoke", "--no-warmup", "--strategies", "ddp", "--world-sizes", "1", "--workloads", "resnet"]
    assert cli.main([*argv, "--json", str(tmp_path / "runs" / "bench.json")]) == 0
    assert json.loads((tmp_path / "runs" / "bench.json").read_text())["cells"][0]["summary"]["ok"]
    argv = ["--tiny", "--device", "cpu", "--no-compile", "--repeats", "1"]
    assert gpu.main([*argv, "--json", str(tmp_path / "gpu" / "runs" / "gpu.json")]) == 0
    assert json.loads((tmp_path / "gpu" / "runs" / "gpu.json").read_text())["summary"]["ok"]


def test_same_heap_gives_both_sides_the_heap_thresholds(monkeypatch, tmp_path):
    """--same-heap: both sides start with dist_train's glibc thresholds in their environment (and
    dist_train's retain_freed_heap steps aside for them), so the ratio is the loop's alone."""
    from bench import cli, harness
    from dist_train.host_memory import MMAP_THRESHOLD, TRIM_THRESHOLD

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    envs = {}

    def fake_side(cell, side, run_dir, threads, timeout):
        env = harness.run_env(threads, run_dir / "times")
        envs[side] = (env.get("MALLOC_MMAP_THRESHOLD_"), env.get("MALLOC_TRIM_THRESHOLD_"))
        return {"side": side, "ok": True, "step_time_s": 1.0}

    monkeypatch.setattr(harness, "run_side", fake_side)
    monkeypatch.setattr(cli, "summarise_cell", lambda pairs: {"ok": False})
    argv = ["--smoke", "--no-warmup", "--strategies", "ddp", "--world-sizes", "1", "--workloads", "resnet"]
    cli.main([*argv, "--json", str(tmp_path / "a.json")])
    assert envs == {"dist_train": (None, None), "hand": (None, None)}
    try:
        cli.main([*argv, "--same-heap", "--json", str(tmp_path / "b.json")])
    finally:  # cli.main set them in this process
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            os.environ.pop(name, None)
    assert envs["dist_train"] == envs["hand"] == (str(MMAP_THRESHOLD), str(TRIM_THRESHOLD))


@pytest.mark.parametrize("steps", ["2", "5", "12", "23"])
def test_gpu_bench_times_a_window_between_two_reads_of_the_loss(steps):
    from bench.gpu import GPT2_SMALL, parse_args

    assert GPT2_SMALL.log_every == 5
    with pytest.raises(SystemExit) as err:
        parse_args(["--steps", steps])  # too short, or a window ending between two reads of the loss
    assert err.value.code == 2
    assert parse_args(["--steps", "30"]).steps == 30


def test_gpu_bench_step_time_is_the_mean_between_synchronised_steps():
    """On a GPU the host queues steps ahead: steps stamped 1 ms apart, then the step that reads the
    loss (every log_every steps) waits for the GPU, 10 ms a step in all. The median (1 ms) overstated
    throughput ten times; the time from one read of the loss to another is the truth, and the median
    over those windows leaves out one window's hiccup (a 100 ms pause)."""
    from bench.gpu import GPT2_SMALL
    from bench.harness import summarise_run

    ends, t, every = [], 0.0, GPT2_SMALL.log_every
    assert (GPT2_SMALL.steps - GPT2_SMALL.warmup_steps) // every >= 3  # a median of three windows or more
    for step in range(1, GPT2_SMALL.steps + 1):
        t += 0.010 * every - 0.001 * (every - 1) if step % every == 0 else 0.001
        t += 0.1 if step == GPT2_SMALL.warmup_steps + 5 else 0.0
        ends.append(t)
    record = {"steps": ends, "cpu": ends, "train_start": 0.0, "peak_rss_mb": 1.0}
    gpu = summarise_run([record], 0.0, Cell(GPT2_SMALL, 1, launcher="single"))
    assert gpu["step_time_s"] == pytest.approx(0.010)
    cpu = summarise_run([record], 0.0, Cell(dataclasses.replace(GPT2_SMALL, step_time="median"), 1))
    assert cpu["step_time_s"] == pytest.approx(0.001)  # the CPU benchmarks' robust median, unchanged


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workload", "strategy", "zero_stage"),
    [
        (LM, "ddp", 0),
        (RESNET, "ddp", 0),
        (LM, "fsdp", 0),
        (LM, "deepspeed", 2),
        (LM, "deepspeed", 3),
        (LM_BF16, "fsdp", 0),
        (dataclasses.replace(LM_BF16, fused_loss=True), "deepspeed", 3),
        (LM.scaled(compile=True), "deepspeed", 2),
    ],
    ids=[
        "lm-ddp",
        "resnet-ddp",
        "lm-fsdp",
        "lm-zero2",
        "lm-zero3",
        "lm-fsdp-bf16",
        "lm-zero3-bf16-fused",
        "lm-zero2-compiled",
    ],
)
def test_both_sides_train_the_same_model(tmp_path, workload, strategy, zero_stage):
    """dist_train and the hand-written loop (2 ranks, accumulation 2 without gradient sync on the first
    micro-step) reach the same weights: same init, data order, loss normalisation, optimizer and clipping
    (and BatchNorm running statistics for the resnet)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    cell = Cell(smoke(workload), world_size=2, strategy=strategy, zero_stage=zero_stage)
    hand_weights = tmp_path / "hand.pt"
    for side in ("dist_train", "hand"):
        run_dir = tmp_path / side
        run_dir.mkdir()
        cmd = command(cell, side, run_dir) + (["--save", str(hand_weights)] if side == "hand" else [])
        env = run_env(1, run_dir / "times") | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "extensions").exists()  # DeepSpeed on a CPU: neither side compiles its shm all-reduce
    ours = load_weights(tmp_path / "dist_train" / "out")
    theirs = torch.load(hand_weights, weights_only=True)
    assert max_abs_diff(ours, theirs) == 0.0


def test_unregistered_strategies_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(bench_cli, "registered_strategies", lambda: ["ddp"])
    args = bench_cli.parse_args(["--smoke", "--strategies", "ddp,fsdp", "--workloads", "transformer_lm"])
    cells, notes = bench_cli.build_cells(args)
    assert {c.strategy for c in cells} == {"ddp"} and len(cells) == 2  # world sizes 1 and 2
    assert any(note.startswith("fsdp: not registered") for note in notes)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--strategies", "ddp,fspd"], "unknown strategies ['fspd']"), (["--repeats", "0"], "at least 1")],
)
def test_bench_refuses_unknown_strategies_and_no_repeats(capsys, argv, message):
    """A misspelt strategy is a usage error, as a misspelt workload is (it was skipped with a note
    'not registered ... yet', and `--strategies fspd` ran nothing and exited 0 with an empty table)."""
    with pytest.raises(SystemExit) as err:
        bench_cli.parse_args(["--smoke", *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    if "--repeats" in argv:  # bench.gpu too (it ran the compile warm-up, then said 'all runs failed')
        from bench.gpu import parse_args

        with pytest.raises(SystemExit) as err:
            parse_args(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_gpu_bench_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--tiny --device cpu" in proc.stderr


def test_gpu_bench_shows_a_non_finite_last_loss_as_written():
    """metrics.jsonl writes a non-finite loss as "nan"/"inf": the line says so (it raised ValueError,
    losing the whole report, in the one case the loss is there to catch)."""
    from bench.gpu import describe

    record = {"ok": True, "side": "dist_train", "tokens_per_s": 10.0, "mfu": 0.5}
    assert describe({**record, "logged_loss": "nan"}).endswith("MFU 50.0%  last loss nan")
    assert describe({**record, "logged_loss": 2.5}).endswith("MFU 50.0%  last loss 2.5000")
    assert describe({**record, "logged_loss": None}).endswith("MFU 50.0%")


@pytest.mark.slow
def test_gpu_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--tiny", "--device", "cpu", "--no-compile", "--repeats", "1", "--json", str(out)]
    proc = run_cli([PYTHON, "-m", "bench.gpu", *args], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout
    report = json.loads(out.read_text())
    assert report["summary"]["ok"] and report["flops_per_token"] > 0
    assert report["workload"]["precision"] == "bf16" and report["options"]["residual"] == "bf16"
    assert report["workload"]["model_kwargs"]["low_precision_residual"] is True  # the default: a bf16 stream
    assert [r["side"] for r in report["runs"][0]] == ["dist_train", "hand"]
    assert 0 < report["runs"][0][0]["logged_loss"] < 10  # dist_train's last logged loss (256 words: ln 256 = 5.5)

    # a variant alone (dist_train only), then the variants that beat the baseline stacked
    variant, stacked = tmp_path / "variant.json", tmp_path / "stacked.json"
    only = ["--tiny", "--device", "cpu", "--no-compile", "--repeats", "1", "--dist-train-only"]
    two = ["--grad-accum", "2", "--sdpa-backend", "cudnn", "--fused-loss", "--residual", "fp32"]  # cuDNN: a
    # preference, no-op on a CPU
    proc = run_cli([PYTHON, "-m", "bench.gpu", *only, *two, "--json", str(variant)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(variant.read_text())
    assert report["options"]["grad_accum"] == 2 and report["workload"]["grad_accum_steps"] == 2
    assert report["workload"]["sdpa_backend"] == "cudnn" and report["workload"]["fused_loss"] is True
    assert report["workload"]["model_kwargs"]["low_precision_residual"] is False  # --residual fp32
    assert [r["side"] for r in report["runs"][0]] == ["dist_train"] and "hand-written" not in proc.stdout
    run = report["runs"][0][0]  # an optimizer step takes two micro-batches of 4 sequences
    assert run["samples_per_s"] == pytest.approx(8 / run["step_time_s"])
    proc = run_cli([PYTHON, "-m", "bench.gpu", *only, "--stack", str(out), str(variant), "--json", str(stacked)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if stacked.is_file():  # accumulation beat the baseline: the stacked run has it
        stack = "{'grad_accum': 2, 'sdpa_backend': 'cudnn', 'fused_loss': True, 'residual': 'fp32'}"
        assert f"bench.gpu --stack: {stack}" in proc.stdout
        assert json.loads(stacked.read_text())["options"]["grad_accum"] == 2
    else:
        assert "beat the baseline; nothing to run" in proc.stdout


@pytest.mark.slow
def test_gpu_profile_tiny_on_cpu():
    for fused in ([], ["--fused-loss", "--residual", "fp32"]):
        tiny = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", *fused]
        proc = run_cli([PYTHON, "-m", "bench.gpu_profile", *tiny])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        loss, residual = ("fused", "fp32") if fused else ("compiled", "bf16")
        assert f"micro-batch 4, compile mode default, loss {loss}" in proc.stdout and "top 18 kernels" in proc.stdout
        assert f"residual {residual}:" in proc.stdout
        shares = [float(line.split()[-1].rstrip("%")) for line in proc.stdout.splitlines() if line.endswith("%")]
        assert shares and sum(shares) == pytest.approx(100, abs=0.5)  # the kinds add up to the busy time
    if not torch.cuda.is_available():
        proc = run_cli([PYTHON, "-m", "bench.gpu_profile"])
        assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compile_on_cpu_keeps_bare_state_dict_keys_and_follows_eager(tmp_path):
    """train.compile (model and training loss) on the CPU: bare state_dict keys, and the run follows
    the same run in eager mode."""
    runs = {}
    for name, compiled in (("compiled", True), ("eager", False)):
        config = tiny_lm_config(tmp_path / name, train={"max_steps": 3, "compile": compiled}, log={"every_steps": 1})
        config["eval"] = {"at_end": False}
        proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(write_config(tmp_path / f"{name}.yaml", config))])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_rows(tmp_path / name) if "loss" in r]
    weights = load_weights(tmp_path / "compiled")
    assert not any("_orig_mod" in key for key in weights), sorted(weights)
    from dist_train.models.transformer_lm import transformer_lm

    assert set(weights) == set(transformer_lm(**{k: v for k, v in config["model"].items() if k != "name"}).state_dict())
    assert len(runs["compiled"]) == 3 and runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)
    assert max_abs_diff(weights, load_weights(tmp_path / "eager")) < 1e-5


def test_gpu_bench_stacks_the_variants_that_beat_the_baseline():
    from bench.gpu_variants import stacked_options

    base_options = {"strategy": "ddp", "grad_accum": 1, "micro_batch": None, "compile_mode": "default"}

    def report(rate, **changes):
        run = {"ok": True, "tokens_per_s": rate}
        return {"options": {**base_options, **changes}, "runs": [[run, {"ok": True}]]}

    baseline = report(100.0)
    assert stacked_options(baseline, [report(100.4, grad_accum=2), report(90.0, micro_batch=64)]) == {}
    assert stacked_options(baseline, [report(102.0, grad_accum=2), report(99.0, micro_batch=64)]) == {"grad_accum": 2}
    both_modes = [
        report(103.0, compile_mode="reduce-overhead"),
        report(102.0, compile_mode="max-autotune-no-cudagraphs"),
    ]
    assert stacked_options(baseline, both_modes) == {"compile_mode": "max-autotune"}
    # FSDP2 and CUDA graphs do not mix: the faster of the two stays
    assert stacked_options(baseline, [*both_modes, report(105.0, strategy="fsdp")]) == {
        "strategy": "fsdp",
        "compile_mode": "max-autotune-no-cudagraphs",
    }
    assert stacked_options(baseline, [both_modes[0], report(101.0, strategy="fsdp")]) == {
        "compile_mode": "reduce-overhead"
    }
    failed = {"options": {**base_options, "micro_batch": 64}, "runs": [[{"ok": False}]]}
    assert stacked_options(baseline, [failed]) == {}


def test_a_benchmark_stopped_by_sigterm_ends_its_run(tmp_path):
    """`timeout` (bench/gpu_session.sh's stage deadline) sends SIGTERM: the run in progress, which sits
    in its own session, ends with the benchmark (it trained on, beside the next stage's runs)."""
    import signal
    import time

    import psutil

    args = ["--tiny", "--device", "cpu", "--no-compile", "--repeats", "1", "--no-warmup-pair", "--steps", "2000"]
    bench = subprocess.Popen([PYTHON, "-m", "bench.gpu", *args, "--keep", str(tmp_path)], cwd=REPO_ROOT)
    try:
        deadline, runs = time.monotonic() + 120, []
        while not runs and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.5)  # the run's processes carry its folder (under --keep) on their command line
            runs = [
                p
                for p in psutil.process_iter(["cmdline"])
                if p.pid != bench.pid and str(tmp_path / "0-dist_train") in " ".join(p.info["cmdline"] or [])
            ]
        assert runs, "the benchmark started no run"
        time.sleep(1.0)  # the benchmark is waiting for its run
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(runs, timeout=30)
        assert not alive, [p.info["cmdline"] for p in alive]
    finally:
        bench.kill()


def test_hand_loop_with_the_fused_loss_trains_as_with_its_own_loss():
    """bench.gpu --fused-loss: the hand-written loop calls model(inputs, targets=targets) (the chunked
    loss sum over the tokens) where it took the mean cross-entropy of the logits; same weights."""
    from bench import hand_ddp
    from bench.gpu import TINY

    weights = []
    for fused in (False, True):
        spec = TINY.scaled(device="cpu", compile=False, precision="fp32", fused_loss=fused).spec()
        _, module = hand_ddp.run(spec, torch.device("cpu"))
        weights.append({name: p.detach().clone() for name, p in module.state_dict().items()})
    assert max_abs_diff(*weights) < 1e-5


@pytest.mark.slow
def test_fused_loss_bench_on_cpu(tmp_path):
    out = tmp_path / "fused.json"
    shape = ["--tokens", "512", "--vocab", "1000", "--width", "32", "--precision", "fp32", "--no-compile"]
    args = ["--device", "cpu", *shape, "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    proc = run_cli([PYTHON, "-m", "bench.fused_loss", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| ms per forward + backward |" in proc.stdout and "| peak memory above the warm start, MB |" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["side"] for r in report["runs"]["unfused"] + report["runs"]["fused"]] == ["unfused", "fused"]
    assert all(report["median"][side]["ms"] > 0 for side in ("unfused", "fused"))
