"""Checkpoints in one process (fast): atomic save under injected crashes, corrupt-file fallbacks,
retention, the non-finite guard. Multi-rank resume/signal/elastic tests are in test_resume.py."""

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, as_plain_user, launch, load_weights, max_abs_diff, read_rows, run_cli, write_config

import dist_train.checkpoint as ckpt
from dist_train.cli import main
from dist_train.config import from_dict
from dist_train.distributed import DistContext
from dist_train.errors import UserError
from dist_train.strategies.ddp import DDPStrategy
from dist_train.trainer import TrainingError, train

SINGLE = DistContext(0, 0, 1, 1, torch.device("cpu"), None, "single")


class Crash(BaseException):
    """Stands in for the process dying: nothing after the crash point runs."""


def mlp_raw(output_dir, **sections):
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 5},
        "model": {"name": "mlp", "hidden_dim": 32, "dropout": 0.2},  # dropout: resume must restore the RNG
        "data": {"name": "synthetic_vectors", "num_samples": 256, "eval_samples": 40},
        "train": {"max_steps": 6, "micro_batch_size": 8, "grad_accum_steps": 2},
        "eval": {"every_steps": 3},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "log": {"every_steps": 1, "plot": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def run(output_dir, **sections):
    return train(from_dict(mlp_raw(output_dir, **sections)), SINGLE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert run(out)["status"] == "finished"
    return out


def crash_when_saving_step_4(monkeypatch, stage):
    """Patch the save path so the process 'dies' at `stage` while writing the step-4 checkpoint."""

    def saving_4(*args):
        return any("step-00000004" in str(a) for a in args)

    def around(module, name, before: bool):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if saving_4(*args) and before:
                raise Crash(stage)
            result = original(*args, **kwargs)
            if saving_4(*args) and not before:
                raise Crash(stage)
            return result

        monkeypatch.setattr(module, name, wrapper)

    def around_file(name: str, before: bool):
        original = ckpt.write_atomic

        def wrapper(path, data):
            hit = path.name == name and ("step-00000004" in str(path) or b"step-00000004" in data)
            if hit and before:
                raise Crash(stage)
            original(path, data)
            if hit and not before:
                raise Crash(stage)

        monkeypatch.setattr(ckpt, "write_atomic", wrapper)

    if stage == "after_strategy_files":
        around(DDPStrategy, "save", before=False)
    elif stage == "after_fsync":
        around(ckpt, "fsync_files", before=False)
    elif stage in ("before_manifest", "after_manifest"):
        around_file("manifest.json", before=stage.startswith("before"))
    elif stage in ("before_rename", "after_rename"):
        around(ckpt.os, "rename", before=stage.startswith("before"))
    elif stage in ("before_latest", "after_latest"):
        around_file("latest", before=stage.startswith("before"))
    elif stage == "before_retention":
        original = ckpt.apply_retention

        def retention(root, keep_last, keep_every):
            if ckpt.read_latest(root) == "step-00000004":
                raise Crash(stage)
            original(root, keep_last, keep_every)

        monkeypatch.setattr(ckpt, "apply_retention", retention)


STAGES = [
    "after_strategy_files",
    "after_fsync",
    "before_manifest",
    "after_manifest",
    "before_rename",
    "after_rename",
    "before_latest",
    "after_latest",
    "before_retention",
]
RENAMED = {"after_rename", "before_latest", "after_latest", "before_retention"}  # step-4 has its name


@pytest.mark.parametrize("stage", STAGES)
def test_crash_at_any_save_stage_resumes_from_a_complete_checkpoint(tmp_path, monkeypatch, reference, stage):
    with monkeypatch.context() as patch:
        crash_when_saving_step_4(patch, stage)
        with pytest.raises(Crash):
            run(tmp_path)
    root = tmp_path / "checkpoints"
    latest = ckpt.read_latest(root)
    assert latest in ("step-00000002", "step-00000004")
    ckpt.verify(root / latest)  # `latest` always names a complete checkpoint
    ckpt.verify(root / "step-00000002")  # the earlier good checkpoint is untouched
    # once step 4's folder has its name it is complete, and the newest: resumed even before `latest` names
    # it (resuming step 2 set the complete step 4 aside, and the crash cost its steps)
    complete = "step-00000004" if stage in RENAMED else "step-00000002"
    assert run(tmp_path)["status"] == "finished"
    assert max_abs_diff(load_weights(reference), load_weights(tmp_path)) == 0.0
    resumed = [r for r in read_rows(tmp_path) if "resumed_from" in r]
    assert resumed == [{"resumed_from": complete, "step": int(complete[-8:])}]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".abandoned-")]
    expected = [r for r in read_rows(reference) if r["step"] > resumed[0]["step"]]
    got = read_rows(tmp_path)
    got = got[got.index(resumed[0]) + 1 :]
    assert _stable(got) == _stable(expected)  # identical metrics rows after the resume point


def _write_latest(path: Path, version: int) -> None:
    ckpt.write_atomic(path, f"step-{version:08d}\n".encode())


def _write_weights(path: Path, version: int) -> None:
    from dist_train.safetensors_io import save_file

    save_file({"w": torch.full((64, 64), float(version))}, path, metadata={"step": str(version)})


def _write_int8_export(path: Path, version: int) -> None:
    from types import SimpleNamespace

    from dist_train.compress.qat import save_quantized

    cfg = SimpleNamespace(compress=SimpleNamespace(qat_backend="x86"), model=SimpleNamespace(name="mlp", kwargs={}))
    save_quantized(torch.nn.Linear(4, version), path, "dynamic", cfg)


@pytest.mark.parametrize(
    "name, write",
    [("latest", _write_latest), ("model.safetensors", _write_weights), ("model_int8.pt", _write_int8_export)],
)
def test_a_crash_while_a_file_is_written_atomically_leaves_its_previous_content(tmp_path, monkeypatch, name, write):
    """`latest`, the manifest, the exported weights and the int8 exports are written to a temporary file,
    fsynced, then renamed over the old one, and the rename is fsynced: a crash before the rename (here at
    the fsync of the new bytes) leaves the previous content whole. The int8 exports were renamed without
    an fsync (a power loss could leave an empty file under the final name), and neither they nor the
    weights fsynced the folder after the rename."""
    path = tmp_path / name
    synced_folders = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: synced_folders.append(Path(p)))
    write(path, 2)
    assert synced_folders == [tmp_path]  # the rename itself is on disk
    before = path.read_bytes()

    def crash(fd):
        raise Crash("fsync")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(Crash):
        write(path, 4)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing half-written left beside it


def _stable(rows):
    timing = {"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_rss_mb"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _checkpointed_run(tmp_path, reference):
    shutil.copytree(reference, tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints"


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _truncate_unlisted(folder: Path) -> None:
    """The manifest stops listing a file (so no checksum covers it), and the file is damaged."""
    _edit_manifest(folder, lambda m: m["files"].pop("model.pt"))
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:100])


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:100]),  # truncated
        lambda folder: _flip_byte(folder / "optimizer.pt"),
        lambda folder: (folder / "rank-00000.pt").unlink(),
        lambda folder: (folder / "manifest.json").write_text("{not json"),
        lambda folder: _edit_manifest(folder, lambda m: m.pop("trainer")),
        lambda folder: _edit_manifest(folder, lambda m: m.pop("world_size")),
        lambda folder: _edit_manifest(folder, lambda m: m.update(trainer="x")),
        lambda folder: _edit_manifest(folder, lambda m: m["trainer"].update(samples_in_epoch=-7)),
        lambda folder: _edit_manifest(folder, lambda m: m["trainer"].update(nonfinite_streak="x")),
        lambda folder: _edit_manifest(folder, lambda m: m["trainer"].update(lr_schedule={"scale": "x"})),
        lambda folder: _edit_manifest(folder, lambda m: m["trainer"].update(step=5)),
        lambda folder: _edit_manifest(folder, lambda m: m["files"].update({"model.pt": {}})),
        lambda folder: _edit_manifest(folder, lambda m: m["files"].update({"../../x": m["files"]["model.pt"]})),
        _truncate_unlisted,
        lambda folder: ((folder / "manifest.json").unlink(), (folder / "manifest.json").mkdir()),
    ],
    ids=[
        "truncated",
        "flipped-byte",
        "missing-file",
        "bad-manifest",
        "no-trainer",
        "no-world-size",
        "trainer-not-a-mapping",
        "negative-sample-count",  # resumed, it saved a checkpoint from it, then failed at the next batch
        "streak-not-a-pair",
        "plateau-state-edited",
        "trainer-step-not-the-manifests",
        "entry-without-checksum",
        "name-outside",
        "file-not-listed",
        "manifest-a-folder",
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, damage):
    run_dir, root = _checkpointed_run(tmp_path, reference)
    damage(root / "step-00000006")
    found = ckpt.find_resume_checkpoint("auto", run_dir)
    assert found.folder.name == "step-00000004"
    with pytest.raises(UserError, match="checkpoint.resume: .*step-00000006"):
        ckpt.find_resume_checkpoint(str(root / "step-00000006"), run_dir)
    # resuming redoes steps 5-6 and sets only the damaged folder aside (kept); the good ones stay
    assert run(run_dir, train={"max_steps": 6})["status"] == "finished"
    for step in (2, 4, 6):
        ckpt.verify(root / f"step-{step:08d}")
    assert list(root.glob(".abandoned-step-00000006-*"))
    assert max_abs_diff(load_weights(reference), load_weights(run_dir)) == 0.0


@pytest.mark.parametrize("content", [b"step-00000099\n", b"\xff\xfe", b"../../elsewhere"])
def test_latest_naming_no_checkpoint_falls_back(tmp_path, reference, content):
    run_dir, root = _checkpointed_run(tmp_path, reference)
    (root / "latest").write_bytes(content)
    assert ckpt.find_resume_checkpoint("auto", run_dir).folder.name == "step-00000006"
    with pytest.raises(UserError, match="which is not a checkpoint folder"):
        ckpt.find_resume_checkpoint(str(run_dir), run_dir)


def test_latest_made_a_folder_or_a_link_to_one_is_one_line(tmp_path, reference):
    """`ln -s step-N latest` by hand: reading it raised IsADirectoryError (a traceback, status 1)."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    (root / "latest").unlink()
    (root / "latest").symlink_to("step-00000006")
    for resume in ("auto", str(run_dir)):
        with pytest.raises(UserError, match="checkpoints/latest is a folder or a link to one"):
            ckpt.find_resume_checkpoint(resume, run_dir)


def test_the_manifest_checks_name_every_field_of_the_trainer_and_plateau_states():
    """An edited trainer state is damage (skipped by auto, one line by path): every field a run writes
    has its check, so a field added to TrainState or PlateauState needs one."""
    from dist_train.schedules import PlateauState
    from dist_train.state import TrainState

    assert set(ckpt.TRAINER_FIELDS) == {f.name for f in dataclasses.fields(TrainState)}
    assert set(ckpt.PLATEAU_FIELDS) == {f.name for f in dataclasses.fields(PlateauState)}
    written = dataclasses.asdict(TrainState(lr_schedule=dataclasses.asdict(PlateauState())))
    assert all(ckpt.TRAINER_FIELDS[key](value) for key, value in json.loads(json.dumps(written)).items())


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("rank-00000.pt", {}, "its per-rank state does not fit this version ('rng')"),
        ("rank-00000.pt", {"rng": "x", "window_loss_sum": 0.0}, "its per-rank state does not fit this version"),
        ("optimizer.pt", [1, 2], "does not fit this model or optimizer"),
    ],
    ids=["rank-file-empty", "rank-file-rng-not-ours", "optimizer-a-list"],
)
def test_a_checkpoint_file_of_foreign_content_with_its_checksum_is_one_line(tmp_path, reference, name, content, said):
    """Checksums recomputed for another payload (a file swapped in by hand): a KeyError or TypeError
    traceback, status 1, as the load met it."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    folder = root / "step-00000006"
    torch.save(content, folder / name)
    entry = {"size": (folder / name).stat().st_size, "sha256": ckpt.sha256_file(folder / name)}
    _edit_manifest(folder, lambda m: m["files"].update({name: entry}))
    with pytest.raises(UserError) as refused:
        run(run_dir, train={"max_steps": 8})
    assert str(refused.value).startswith(f"checkpoint {folder}") and said in str(refused.value)
    assert "\n" not in str(refused.value)


def test_trainer_state_of_another_version_is_a_clear_error(tmp_path, reference):
    """Checksums intact, fields unknown to this version: not damage to skip, but a mismatch to say."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    _edit_manifest(root / "step-00000006", lambda m: m["trainer"].update(bogus=1))
    with pytest.raises(UserError, match="trainer state does not fit this version"):
        run(run_dir, train={"max_steps": 8})


def test_a_checkpoint_of_another_optimizer_names_optim_name(tmp_path):
    """SGD's checkpoint resumed by AdamW failed as "does not fit ... ('step')"; AdamW's resumed by SGD
    trained on silently, Adam's moments carried in SGD's state into every later checkpoint."""
    assert run(tmp_path / "sgd", optim={"name": "sgd"}, train={"max_steps": 2})["status"] == "finished"
    with pytest.raises(UserError, match=r"written with optim\.name=sgd, this run uses adamw: resume with optim"):
        run(tmp_path / "sgd", train={"max_steps": 4})
    assert run(tmp_path / "adamw", train={"max_steps": 2})["status"] == "finished"
    with pytest.raises(UserError, match=r"written with optim\.name=adamw, this run uses sgd"):
        run(tmp_path / "adamw", optim={"name": "sgd", "momentum": 0.9}, train={"max_steps": 4})


def test_a_checkpoint_of_another_compress_layout_names_the_compress_key(tmp_path):
    """Pruning reparametrises weights (weight_orig, weight_mask) and QAT inserts fake-quant modules: a
    float checkpoint resumed with compress.prune or compress.qat switched on (or a pruned one with it off)
    was refused as 'does not fit this model or optimizer (Missing key(s) ...): resume with the model,
    optim.name and optim.param_groups it was written with', naming none of the keys that changed."""
    plain = {"every_steps": None}
    assert run(tmp_path / "plain", train={"max_steps": 2}, eval=plain)["status"] == "finished"
    config = write_config(tmp_path / "qat.yaml", mlp_raw(tmp_path / "plain", compress={"qat": True}))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["check", str(config), "--json"]) == 0
    (warning,) = [w for w in json.loads(out.getvalue())["warnings"] if "compress.qat=" in w]
    assert "written with compress.qat=False, this run uses compress.qat=True, so it will stop with an error" in warning
    for compress, said in (
        ({"prune": "unstructured", "prune_end_step": 3}, "compress.prune"),
        ({"qat": True}, "compress.qat"),
    ):
        with pytest.raises(
            UserError, match=rf"written with {said}=(none|False), this run uses {said}=(unstructured|True)"
        ):
            run(tmp_path / "plain", train={"max_steps": 4}, eval=plain, compress=compress)
    pruned = {"prune": "unstructured", "prune_end_step": 1}
    assert run(tmp_path / "pruned", train={"max_steps": 2}, eval=plain, compress=pruned)["status"] == "finished"
    with pytest.raises(UserError, match=r"written with compress.prune=unstructured, this run uses compress.prune=none"):
        run(tmp_path / "pruned", train={"max_steps": 4}, eval=plain)
    structured = {**pruned, "prune": "structured"}  # the same layout: it resumes
    assert run(tmp_path / "pruned", train={"max_steps": 4}, eval=plain, compress=structured)["step"] == 4


def test_changed_keys_show_their_values_as_the_config_writes_them(tmp_path):
    """`model.low_precision_residual: False -> True` read as Python, not as the YAML the user wrote."""
    from helpers import tiny_lm_config

    from dist_train.state import config_changes, recorded_training_config

    def cfg(**model):
        raw = tiny_lm_config(tmp_path)
        return from_dict({**raw, "model": {**raw["model"], **model}})

    manifest = {"training_config": recorded_training_config(cfg(low_precision_residual=False, dropout=None))}
    changed = config_changes(manifest, cfg(low_precision_residual=True, dropout=0.1))
    assert changed == "model.dropout: null -> 0.1; model.low_precision_residual: false -> true"


def test_a_resume_with_other_training_keys_names_them(tmp_path, caplog):
    """The warning said only 'the training config differs from the one checkpoint step-00000002 was
    written with' (and check 'config hash differs'), whichever keys changed: an edited LR and a data
    seed changed by mistake read alike. Both now name the keys with their old and new values."""
    assert run(tmp_path, train={"max_steps": 2})["status"] == "finished"
    changed = {"train": {"max_steps": 4, "lr": 1e-4}, "data": {"seed": 7}, "run": {"seed": 6}}
    said = "(data.seed: unset -> 7; run.seed: 5 -> 6; train.lr: 0.0003 -> 0.0001)"
    config = write_config(tmp_path / "c.yaml", mlp_raw(tmp_path, **changed))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["check", str(config), "--json"]) == 0
    assert [w for w in json.loads(out.getvalue())["warnings"] if said[1:-1] in w]
    caplog.set_level("WARNING", logger="dist_train")
    assert run(tmp_path, **changed)["step"] == 4
    assert [r for r in caplog.records if r.getMessage().endswith(f"step-00000002 was written with {said}")]


def test_checkpoint_for_another_model_shape_is_a_clear_error(tmp_path, reference):
    run_dir, _ = _checkpointed_run(tmp_path, reference)
    with pytest.raises(UserError, match="does not fit this model"):
        run(run_dir, model={"hidden_dim": 48})
    config = write_config(tmp_path / "c.yaml", mlp_raw(run_dir, model={"hidden_dim": 48}))
    proc = run_cli([PYTHON, "-m", "dist_train", "--config", str(config)], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert (
        proc.returncode == 2
        and lines[-1].startswith("dist_train: error: checkpoint")
        and "Traceback" not in proc.stderr
    )


def test_manifest_lists_every_file_with_size_and_checksum(reference):
    folder = reference / "checkpoints" / "step-00000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1 and manifest["strategy"] == "ddp"
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "rank-00000.pt"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == ckpt.sha256_file(folder / name)
    assert manifest["trainer"]["step"] == 6 and len(manifest["config_hash"]) == 16


def test_retention_keeps_the_newest_and_the_milestones(tmp_path):
    run(tmp_path, train={"max_steps": 10}, checkpoint={"every_steps": 2, "keep_last": 2, "keep_every": 4})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000004", "step-00000008", "step-00000010"]


def test_retention_never_deletes_the_checkpoint_latest_names(tmp_path):
    """A run rewound to step 6 of a run that saved 6 and 8 saves step 7, which `latest` names: with
    keep_last 1 only step 8 is among the newest, yet step 7 stays (deleting it left `latest` dangling)."""
    keep = {"every_steps": 2, "keep_last": 2}
    run(tmp_path, train={"max_steps": 8}, checkpoint=keep)
    root = tmp_path / "checkpoints"
    rewound = {"every_steps": 1, "keep_last": 1, "resume": str(root / "step-00000006")}
    assert run(tmp_path, train={"max_steps": 7}, checkpoint=rewound)["step"] == 7
    assert ckpt.read_latest(root) == "step-00000007"
    ckpt.verify(root / "step-00000007")


def test_a_rewind_sets_the_later_checkpoints_aside_and_keeps_its_own(tmp_path):
    """Rewound to step 4 of a run that saved 4, 6 and 8, with keep_last 2: the later folders counted
    among the newest, so the rewound run kept only its step 6 (and old step 8) where it keeps 5 and 6;
    a fallback past a damaged step 6 then resumed old step 8, another trajectory."""
    run(tmp_path, train={"max_steps": 8}, checkpoint={"every_steps": 2, "keep_last": 3})
    root = tmp_path / "checkpoints"
    rewound = {"every_steps": 1, "keep_last": 2, "resume": str(root / "step-00000004")}
    assert run(tmp_path, train={"max_steps": 6}, checkpoint=rewound)["step"] == 6
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert ckpt.read_latest(root) == "step-00000006"
    assert sorted(p.name.rsplit("-", 1)[0] for p in root.glob(".abandoned-*")) == [
        ".abandoned-step-00000006",
        ".abandoned-step-00000008",
    ]
    (root / "step-00000006" / ckpt.MANIFEST).write_text("{}")  # damaged: auto falls back to its own step 5
    assert run(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 1})["step"] == 6
    assert [row for row in read_rows(tmp_path) if "resumed_from" in row][-1] == {
        "resumed_from": "step-00000005",
        "step": 5,
    }


def test_a_rewind_that_cannot_set_the_later_checkpoints_aside_stops_in_one_line(tmp_path, monkeypatch):
    """Rewound to step 2 of a run that saved 2, 4 and 6, where step 6 cannot be renamed aside: the run went
    on with a warning, and the next `checkpoint.resume=auto` took old step 6 (the newest intact step
    folder) over the rewound run's own checkpoints. It stops after its first step instead, saying why
    and what to do, and the old checkpoints stay whole."""
    run(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    root = tmp_path / "checkpoints"
    real = ckpt.os.rename

    def refuse_step_6(src, dst):
        if Path(src).name == "step-00000006" and ".abandoned-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", refuse_step_6)
    rewound = {"every_steps": 2, "resume": str(root / "step-00000002")}
    with pytest.raises(UserError, match=r"could not set aside the checkpoints in .* \(\[Errno 13\] Permission denied"):
        run(tmp_path, train={"max_steps": 8}, checkpoint=rewound)
    ckpt.verify(root / "step-00000006")
    assert not (root / "step-00000003").exists()  # it stopped before any save of its own


@pytest.mark.slow
def test_a_latest_made_a_folder_by_hand_stops_every_rank_of_a_rewind_in_one_line(tmp_path):
    """A rewind by a step folder's path does not read `latest`; setting aside at the first step does, on
    rank 0 alone: a `latest` that is a folder made by hand must stop every rank with rank 0's one line,
    not rank 0 alone while the others wait for it in a collective."""
    run(tmp_path / "run", train={"max_steps": 4})
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").unlink()
    (root / "latest").mkdir()
    raw = mlp_raw(tmp_path / "run", train={"max_steps": 6}, checkpoint={"resume": str(root / "step-00000002")})
    proc = launch(raw, tmp_path, nproc=2, launcher="forked", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "is a folder or a link to one" in line]
    assert len(said) == 1, proc.stderr[-2000:]
    assert "Connection closed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_next_start_repairs_latest_after_a_crash_before_the_last_saves_update_of_it(tmp_path, monkeypatch):
    """The process died after the last step's folder got its name, before `latest` named it: the next
    start resumes that step and has nothing left to train or save, so `latest` kept naming step 2, and
    a run resuming this one by its folder (`checkpoint.resume=<run dir>`, read through `latest`) started
    from step 2."""
    with monkeypatch.context() as patch:
        crash_when_saving_step_4(patch, "before_latest")
        with pytest.raises(Crash):
            run(tmp_path / "run", train={"max_steps": 4})
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.read_latest(root) == "step-00000002"
    assert run(tmp_path / "run", train={"max_steps": 4})["status"] == "finished"
    assert ckpt.read_latest(root) == "step-00000004"
    assert ckpt.resume_path(str(tmp_path / "run")) == root / "step-00000004"


def test_a_set_aside_checkpoint_resumed_by_path_sets_aside_the_trajectory_it_replaces(tmp_path):
    """Rewound to step 2 of a run that saved 2, 4 and 6, then taken back to the set-aside step 6 by path
    (`.abandoned-step-00000006-PID`): its name is no step-N, so the run failed at its first step with
    AttributeError ('NoneType' object has no attribute 'group', status 1). It continues that trajectory:
    the rewound run's 2 and 4 are set aside in turn."""
    run(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    root = tmp_path / "checkpoints"
    run(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2, "resume": str(root / "step-00000002")})
    (old_6,) = root.glob(".abandoned-step-00000006-*")
    assert run(tmp_path, train={"max_steps": 8}, checkpoint={"every_steps": 2, "resume": str(old_6)})["step"] == 8
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000008"]
    assert ckpt.read_latest(root) == "step-00000008"
    assert len(list(root.glob(".abandoned-step-00000002-*"))) == 1  # old 4 and 6, rewound 2 and 4: all kept
    assert len(list(root.glob(".abandoned-step-00000004-*"))) == 2
    assert len(list(root.glob(".abandoned-*"))) == 4


def test_a_fresh_run_in_a_used_folder_sets_the_old_checkpoints_aside_after_its_first_step(tmp_path):
    """checkpoint.resume=never where another run saved steps 6 and 8: once the new run's first step ran,
    they leave the step-N names, so a fallback past the new run's damaged `latest` resumes its own step 2,
    not the old run's step 8 (which it did, and ended there: nothing to train). A config refused before
    its first step moves nothing."""
    run(tmp_path, train={"max_steps": 8}, checkpoint={"every_steps": 2, "keep_last": 2})
    root = tmp_path / "checkpoints"
    with pytest.raises(UserError):  # refused at its first batch: the old run's folders stay as they were
        run(tmp_path, train={"max_steps": 4, "loss": "mse"}, checkpoint={"resume": "never"})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    assert run(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2, "resume": "never"})["step"] == 4
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert len(list(root.glob(".abandoned-step-0000000[68]-*"))) == 2
    (root / "step-00000004" / ckpt.MANIFEST).write_text("{}")
    assert run(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2})["step"] == 4
    assert [row for row in read_rows(tmp_path) if "resumed_from" in row][-1] == {
        "resumed_from": "step-00000002",
        "step": 2,
    }


def test_a_checkpoint_inside_a_logging_window_resumes_its_loss(tmp_path, monkeypatch):
    """Logged every 3 steps, saved every 2: the step-4 checkpoint holds step 4's loss, the first of the
    open window (steps 4-6); resumed there, the run logs step 6 as the uninterrupted run does."""
    sections = {"log": {"every_steps": 3, "plot": False}}
    run(tmp_path / "whole", **sections)
    with monkeypatch.context() as patch:
        crash_when_saving_step_4(patch, "before_retention")
        with pytest.raises(Crash):
            run(tmp_path / "resumed", **sections)
    run(tmp_path / "resumed", **sections)
    rows = read_rows(tmp_path / "resumed")
    after = rows[rows.index({"resumed_from": "step-00000004", "step": 4}) + 1 :]
    expected = [r for r in read_rows(tmp_path / "whole") if r["step"] > 4]
    assert [r["step"] for r in after if "loss" in r] == [6] and _stable(after) == _stable(expected)


def test_resume_never_and_explicit_path(tmp_path, reference):
    run_dir, root = _checkpointed_run(tmp_path, reference)
    assert run(tmp_path / "fresh", checkpoint={"resume": str(root / "step-00000004")})["status"] == "finished"
    assert read_rows(tmp_path / "fresh")[0] == {"resumed_from": "step-00000004", "step": 4}
    assert max_abs_diff(load_weights(reference), load_weights(tmp_path / "fresh")) == 0.0
    assert run(run_dir, checkpoint={"resume": "never"}, train={"max_steps": 2})["step"] == 2


def nan_raw(output_dir, **model):
    return {
        "run": {"output_dir": str(output_dir)},
        "model": {"name": "userpkg.nan:nan_model", **model},
        "data": {"name": "synthetic_vectors", "num_samples": 256},
        "train": {"max_steps": 8, "max_nonfinite_steps": 3},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    assert train(from_dict(nan_raw(tmp_path, nan_calls=[3])), SINGLE)["status"] == "finished"
    rows = [r for r in read_rows(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert rows[2]["grad_norm"] == "nan"
    weights = load_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(TrainingError, match=r"not finite for 3 steps in a row \(by step 5\)"):
        train(from_dict(nan_raw(tmp_path, nan_from=3)), SINGLE)


def test_starting_a_finished_run_again_repeats_nothing(tmp_path, reference):
    """The same command after the run finished (a requeue that came late, a re-submitted script):
    the final checkpoint is found, nothing is trained, evaluated or saved again, the weights stay."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    before = read_rows(run_dir)
    stamp = (root / "step-00000006" / "manifest.json").stat().st_mtime_ns
    assert run(run_dir) == {"status": "finished", "step": 6}
    assert read_rows(run_dir) == [*before, {"resumed_from": "step-00000006", "step": 6}]
    assert (root / "step-00000006" / "manifest.json").stat().st_mtime_ns == stamp
    assert max_abs_diff(load_weights(reference), load_weights(run_dir)) == 0.0


def test_a_stop_signal_save_that_crashed_leaves_no_folder_behind(tmp_path, monkeypatch, reference):
    """A stop signal at step 3 (no checkpoint step), and the process killed while it saves (SLURM's
    grace ran out): no later save is of step 3, yet its half-written folder must not stay for good."""
    from dist_train.control import Control

    with monkeypatch.context() as patch:
        stop_at_3 = {"step": 0}

        def should_stop(self):
            stop_at_3["step"] += 1
            return stop_at_3["step"] == 4  # the boundary after step 3

        patch.setattr(Control, "should_stop", should_stop)
        original = DDPStrategy.save

        def save(self, folder):
            if "step-00000003" in str(folder):
                raise Crash("killed while saving")
            return original(self, folder)

        patch.setattr(DDPStrategy, "save", save)
        with pytest.raises(Crash):
            run(tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-00000003").is_dir()  # what the crash left
    assert run(tmp_path)["status"] == "finished"
    assert sorted(p.name for p in root.iterdir()) == ["latest", *(f"step-{s:08d}" for s in (2, 4, 6))]
    assert max_abs_diff(load_weights(reference), load_weights(tmp_path)) == 0.0


def test_a_run_output_dir_it_cannot_write_in_is_one_line(tmp_path):
    """An existing folder this user cannot write in (read-only, another owner's): the first write,
    config.yaml, raised PermissionError (a traceback, status 1) after the model and data were built."""
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path / "c.yaml", mlp_raw(out))
    out.chmod(0o555)
    try:
        proc = run_cli([*as_plain_user(), PYTHON, "-m", "dist_train", "--config", str(config)], timeout=120)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"dist_train: error: run.output_dir {out}: cannot write in it (Permission denied); choose another"
    ]
    assert list(out.iterdir()) == []


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two launches into one run.output_dir at once: each save began by deleting the other's
    `.tmp-step-N/` in progress (the first died in torch.save, status 1, with a traceback) and both
    appended to metrics.jsonl. Rank 0 holds a lock on the folder for the whole run now."""
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path / "c.yaml", mlp_raw(out))
    cmd = [PYTHON, "-m", "dist_train", "--config", str(config)]
    fd = os.open(out / ".dist_train.lock", os.O_RDWR | os.O_CREAT)  # as a run in progress holds it
    os.write(fd, b"pid 4242 on node7\n")
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = run_cli(cmd, timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dist_train: error: run.output_dir {out} is in use by another run (pid 4242 on node7): wait for it to "
        "end or choose another run.output_dir"
    ], proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".dist_train.lock"]  # nothing of the run written
    proc = run_cli(cmd, timeout=120)  # the holder gone (however it ended), the folder is free again
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "latest").is_file()


def test_a_resume_after_a_torn_metrics_row_keeps_its_marker(tmp_path, reference):
    """A crash mid-row left metrics.jsonl without its last newline: the resumed run appended its
    `resumed_from` marker to that fragment, one malformed line, and the marker was lost to readers."""
    from dist_train.plots import read_metrics

    run_dir, _ = _checkpointed_run(tmp_path, reference)
    rows = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "metrics.jsonl").write_bytes(rows[: rows.rindex(b"\n", 0, -1) + 30])  # the last row cut short
    assert run(run_dir, train={"max_steps": 8})["status"] == "finished"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = read_metrics(run_dir)
    assert len(kept) == len(lines) - 1  # the fragment alone is skipped
    assert {"resumed_from": "step-00000006", "step": 6} in kept
    assert [r["step"] for r in kept if "loss" in r][-2:] == [7, 8]


def test_retention_counts_no_stray_by_a_step_name(tmp_path):
    """An empty step folder or a file by a step name past the run's steps counted as the newest
    checkpoints: keep_last=2 kept the stray and `latest` only, and deleted step 8. A folder older than
    the kept ones (a delete cut short: its manifest gone first) still goes with the old checkpoints.
    A fresh run sets every entry by a step name aside at its first step, so the strays come mid-run."""
    root = tmp_path / "checkpoints"
    real_retention = ckpt.apply_retention

    def strays_then_retention(root, keep_last, keep_every):
        if not (root / "step-00000099").exists():
            (root / "step-00000099").mkdir()
            (root / "step-00000001").mkdir()
            (root / "step-00000001" / "model.pt").write_text("left over")
            (root / "step-00000098").write_text("not a checkpoint")
        real_retention(root, keep_last, keep_every)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "apply_retention", strays_then_retention)
        run(tmp_path, train={"max_steps": 10}, checkpoint={"every_steps": 2, "keep_last": 2})
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-00000008", "step-00000010", "step-00000098", "step-00000099"]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "model.safetensors", "checkpoints", "tb"])
def test_a_file_or_folder_in_the_way_of_the_runs_own_is_a_clear_error(tmp_path, name):
    """A folder named model.safetensors failed the export after the last step (checkpoints/ as a file:
    the first save; config.yaml, metrics.jsonl: the start; tb as a file under log.tensorboard: the
    start, leaving an empty metrics.jsonl), each a traceback, status 1."""
    out = tmp_path / "out"
    if name in ("checkpoints", "tb"):
        out.mkdir()
        (out / name).write_text("")
    else:
        (out / name).mkdir(parents=True)
    with pytest.raises(UserError, match=f"run.output_dir {out}: {name} is a .* move it away or choose another"):
        run(out, log={"tensorboard": True})
    assert not (out / "config.yaml").is_file() and not (out / "metrics.jsonl").is_file()  # refused before writing
    if name == "tb":  # without TensorBoard a file named tb is nobody's business
        assert run(out)["status"] == "finished"


def test_an_output_dir_in_a_checkpoint_folder_is_refused_before_it_damages_it(tmp_path, reference):
    """A step folder given as run.output_dir (where checkpoint.resume belonged): the run trained and wrote
    its lock file, config.yaml, checkpoints/... into it, and the checkpoint then failed verification
    (files its manifest does not list): a resume by path refused it, auto skipped it."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    step = root / "step-00000004"
    for out in (step, step / "new" / "sub"):
        with pytest.raises(UserError) as refused:
            run(out)
        where = "is" if out == step else "lies inside"
        assert str(refused.value).startswith(f"run.output_dir {out} {where} the checkpoint folder {step}: the run's")
        assert not (step / "new").exists()
        ckpt.verify(step)  # untouched
    for out in (root, root / "new"):  # the run's checkpoint store: config.yaml, metrics.jsonl... among them
        with pytest.raises(UserError) as refused:
            run(out)
        where = "is" if out == root else "lies inside"
        assert str(refused.value).startswith(f"run.output_dir {out} {where} {root}, the checkpoints of the run in")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004", "step-00000006"]


def test_a_config_its_first_batch_refuses_leaves_the_folder_as_it_was(tmp_path, reference):
    """Restarted with a loss the outputs cannot take (status 2 at the first step): config.yaml already
    named the refused config, and metrics.jsonl claimed a resume that logged nothing."""
    run_dir, _ = _checkpointed_run(tmp_path, reference)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(UserError, match="differ in shape"):
        run(run_dir, train={"max_steps": 8, "loss": "mse"})
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert run(run_dir, train={"max_steps": 8})["status"] == "finished"
    assert "max_steps: 8" in (run_dir / "config.yaml").read_text()
    rows = read_rows(run_dir)[len(before["metrics.jsonl"].splitlines()) :]
    assert rows[0] == {"resumed_from": "step-00000006", "step": 6} and rows[1]["step"] == 7


def test_a_checkpoint_file_it_cannot_read_is_one_line(tmp_path, reference):
    """A checkpoint named by path whose file this user may not read (another user's run, umask 077):
    verifying its checksum raised PermissionError (a traceback, status 1)."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    (root / "step-00000006" / "optimizer.pt").chmod(0)
    config = write_config(tmp_path / "c.yaml", mlp_raw(tmp_path / "new", checkpoint={"resume": str(run_dir)}))
    proc = run_cli([*as_plain_user(), PYTHON, "-m", "dist_train", "--config", str(config)], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "dist_train: error: checkpoint.resume: step-00000006: file optimizer.pt cannot be read (Permission denied)"
    ], proc.stderr[-2000:]


def test_a_resume_path_in_a_folder_it_may_not_enter_is_one_line(tmp_path, reference):
    """checkpoint.resume names a run inside, or a step folder that is, a folder this user may not enter
    (another user's, mode 700): Path.exists raised PermissionError in the run and in dist-train check
    (a traceback, status 1)."""
    run_dir, root = _checkpointed_run(tmp_path / "other", reference)
    config = write_config(tmp_path / "c.yaml", mlp_raw(tmp_path / "new"))
    try:
        for locked, resume in ((tmp_path / "other", run_dir), (root / "step-00000006", root / "step-00000006")):
            locked.chmod(0)
            for command in ([], ["check"]):
                cmd = [*as_plain_user(), PYTHON, "-m", "dist_train", *command, "--config", str(config)]
                proc = run_cli([*cmd, f"checkpoint.resume={resume}"], timeout=120)
                assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
                    f"dist_train: error: checkpoint.resume: {resume} cannot be read (Permission denied): get read "
                    "access to the run folder, or name a checkpoint you can read"
                ], proc.stderr[-2000:]
            locked.chmod(0o755)
    finally:
        (tmp_path / "other").chmod(0o755)
        (root / "step-00000006").chmod(0o755)


def test_a_latest_it_cannot_read_is_one_line(tmp_path, reference):
    """checkpoint.resume names another user's run whose `latest` this user may not read: reading it
    raised PermissionError (a traceback, status 1)."""
    run_dir, root = _checkpointed_run(tmp_path, reference)
    (root / "latest").chmod(0)
    config = write_config(tmp_path / "c.yaml", mlp_raw(tmp_path / "new", checkpoint={"resume": str(run_dir)}))
    proc = run_cli([*as_plain_user(), PYTHON, "-m", "dist_train", "--config", str(config)], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dist_train: error: {root / 'latest'} cannot be read (Permission denied): get read access to the run "
        "folder, or name one of its step-XXXXXXXX folders"
    ], proc.stderr[-2000:]


def test_steps_past_eight_digits_are_checkpoints_too(tmp_path):
    """From step 100,000,000 on (a tiny model's run of a few days) folder names have 9 digits: the
    8-digit pattern did not match them, so retention deleted none (the disk filled up) and a resume
    ignored them and `latest`, going back to the last 8-digit checkpoint."""
    root = tmp_path / "checkpoints"
    meta = {"world_size": 1, "strategy": "ddp", "trainer": {}}
    for step in (99_999_998, 99_999_999, 100_000_000, 100_000_001):
        tmp = ckpt.begin_save(root, step)
        (tmp / "model.pt").write_bytes(b"weights")
        ckpt.commit_save(root, tmp, step, meta, ["model.pt"], keep_last=3, keep_every=None)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-100000000", "step-100000001", "step-99999999"]
    assert ckpt.find_resume_checkpoint("auto", tmp_path).folder.name == "step-100000001"
    (root / "latest").unlink()  # the newest by step, not by name
    assert ckpt.find_resume_checkpoint("auto", tmp_path).folder.name == "step-100000001"


def test_exported_weights_keep_complex_and_unsigned_buffers(tmp_path):
    """A persistent complex buffer (rotary factors) failed the export after the last step with
    `KeyError: torch.complex64` (status 1, traceback), in every run started again too."""
    raw = mlp_raw(tmp_path, eval={"every_steps": None})
    raw["model"] = {"name": "userpkg.buffers:rotary"}
    assert train(from_dict(raw), SINGLE)["status"] == "finished"
    weights = load_weights(tmp_path)
    assert weights["freqs_cis"].dtype == torch.complex64 and weights["phases"].dtype == torch.complex64
    assert torch.equal(weights["freqs_cis"], torch.polar(torch.ones(4), torch.arange(4.0)))
    assert weights["ids"].dtype == torch.uint16 and weights["ids"].tolist() == [0, 1, 2, 3]
