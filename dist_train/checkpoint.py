"""Atomic step-N checkpoints with a verified manifest, retention and resume.

Layout under `<output_dir>/checkpoints/`:
    step-00000100/manifest.json   step, epoch, data position, world size, strategy, config hash,
                                  trainer state, and every file with its size and SHA-256
    step-00000100/...             strategy state (DDP: rank 0's model.pt and optimizer.pt; DeepSpeed
                                  deepspeed/, FSDP dcp/: every rank's shards) and rank-XXXXX.pt
                                  per rank (RNG streams, its own buffers, its logging window)
    latest                        text: the folder name of the newest complete checkpoint

A save writes into `.tmp-step-N/` (leftovers of crashed saves removed first), fsyncs every file and
the folder, renames it to `step-N/`, then replaces `latest` through a temporary file and a rename.
A crash at any instant leaves the previous checkpoint and `latest` valid. A step saved before (a run resumed from an older
checkpoint re-reached it) is replaced by the new save: the old folder is renamed aside first. Files are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import UserError

log = logging.getLogger("dist_train")

STEP_DIR = re.compile(r"^step-(\d{8,})$")  # 9 digits and more from step 100,000,000 on
MANIFEST = "manifest.json"
LOCK_FILE = ".dist_train.lock"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def folder_step(folder: Path) -> int:
    """The step of a `step-N` folder: checkpoints sort by it (names sort wrong past 8 digits)."""
    return int(STEP_DIR.match(folder.name).group(1))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` whole once the block ends, durably (the data and the rename
    fsynced): a crash or an error in the block leaves the old `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def lock_output_dir(output_dir: Path) -> int:
    """Rank 0: hold `<output_dir>/.dist_train.lock` (a POSIX lock, NFS-wide) for the whole run; returns
    its descriptor, to be closed at the end. A second run started into the same folder meanwhile is
    refused (UserError): it would delete the first one's checkpoint in progress and interleave their
    rows. The kernel drops the lock when its process ends, however it ends (kill -9 included), so
    none outlives its run. OSError when the folder cannot be written in."""
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks: run unguarded
            log.warning("cannot lock %s (%s): nothing stops a second run in this folder", output_dir, err.strerror)
            return fd
        holder = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(
            f"run.output_dir {output_dir} is in use by another run ({holder}): wait for it to end or choose "
            "another run.output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


RUN_OUTPUTS = {"config.yaml": False, "metrics.jsonl": False, "model.safetensors": False, "checkpoints": True}


def in_the_way(output_dir: Path, tensorboard: bool = False) -> str | None:
    """A folder where the run writes a file, or a file where it keeps a folder of its own (checkpoints/,
    and tb/ under log.tensorboard): said before anything is built (config.yaml failed at once,
    checkpoints/ at the first save, model.safetensors after the last step, tb/ before the first step,
    each with a traceback, status 1)."""
    for name, folder in (RUN_OUTPUTS | ({"tb": True} if tensorboard else {})).items():
        path = output_dir / name
        if path.exists() and path.is_dir() != folder:
            return (
                f"run.output_dir {output_dir}: {name} is a {'file' if folder else 'folder'}, where the run keeps its "
                f"{'folder' if folder else 'file'} of that name; move it away or choose another run.output_dir"
            )
    return None


def in_a_checkpoint(output_dir: Path) -> str | None:
    """A run.output_dir that is a checkpoint folder or lies inside one (a step folder named where a
    resume path belonged): the run's files, its lock file first, would make that checkpoint fail its
    verification (files the manifest does not list), so every later resume skipped or refused it."""
    path = Path(output_dir).resolve()
    for folder in (path, *path.parents):
        where = "is" if folder == path else "lies inside"
        if STEP_DIR.match(folder.name) and os.path.isfile(folder / MANIFEST):  # False where it may not look
            return (
                f"run.output_dir {output_dir} {where} the checkpoint folder {folder}: the run's files would damage "
                f"that checkpoint; choose another run.output_dir (checkpoint.resume={folder} starts from it)"
            )
        if folder.name == "checkpoints" and os.path.isfile(folder / "latest"):  # another run's checkpoint store
            return (
                f"run.output_dir {output_dir} {where} {folder}, the checkpoints of the run in {folder.parent}: its "
                f"files would mix with them; choose another run.output_dir (checkpoint.resume={folder.parent} resumes "
                "that run)"
            )
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_np = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# --- writing ------------------------------------------------------------------------------------------


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary folder for step `step`.

    Leftovers of crashed saves go first, whatever their step: nothing reads them, and a save killed
    at a step the run never saves again (a stop signal's) would otherwise keep its files for good.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if stale.name.startswith((".tmp-", ".replaced-")) and stale.is_dir():
            shutil.rmtree(stale)
    tmp = root / f".tmp-{step_dir_name(step)}"
    tmp.mkdir()
    return tmp


def fsync_files(folder: Path, names: list[str]) -> None:
    for name in names:
        fsync_path(folder / name)


def aside_path(root: Path, kind: str, name: str) -> Path:
    """A free `.KIND-NAME-PID[.N]` path under `root` for a folder set aside: a process id repeats (one
    process that runs twice, a container's ranks started again), and a rename onto a folder fails."""
    path = root / f".{kind}-{name}-{os.getpid()}"
    n = 0
    while path.exists():
        n += 1
        path = root / f".{kind}-{name}-{os.getpid()}.{n}"
    return path


def commit_save(
    root: Path, tmp: Path, step: int, meta: dict, files: list[str], keep_last: int, keep_every: int | None
) -> Path:
    """Rank 0, after every rank wrote and fsynced its files: manifest, rename, `latest`, retention."""
    entries = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in sorted(files)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": entries}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    final = root / step_dir_name(step)
    replaced = None
    if final.exists():  # a resumed or rewound run re-reached a saved step: the new save is the run's
        # a damaged copy is set aside for good (never delete evidence); an intact one until the new one is in
        replaced = aside_path(root, "replaced" if _intact(final) else "corrupt", final.name)
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_path(root)
    write_atomic(root / "latest", (final.name + "\n").encode())
    if replaced is not None and replaced.name.startswith(".replaced-"):
        shutil.rmtree(replaced)
    apply_retention(root, keep_last, keep_every)
    return final


def apply_retention(root: Path, keep_last: int, keep_every: int | None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, except multiples of `keep_every`.
    Only folders with a manifest count among the newest: a stray by a step name past them (an empty
    folder, a file) is no checkpoint; one older than they goes with the old checkpoints."""
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    complete = [step for step in steps if (root / step_dir_name(step) / MANIFEST).is_file()]
    if not keep_last or len(complete) <= keep_last:
        return
    latest = read_latest(root)
    for step in (step for step in steps if step < complete[-keep_last]):
        name = step_dir_name(step)
        if name == latest or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(root / name, ignore_errors=True)


def _own_step(root: Path, resumed: Path | None) -> Path | None:
    """`resumed` as one of `root`'s `step-N` folders (a link to one followed: `checkpoints/best`), else
    None: a folder set aside there and resumed by path (`.abandoned-step-N-PID`) is another trajectory,
    as another run's checkpoint is."""
    if resumed is None:
        return None
    real = resumed.resolve()
    return real if STEP_DIR.match(real.name) and real.parent == root.resolve() else None


def other_trajectories(root: Path, resumed: Path | None) -> list[Path]:
    """The entries by a step name under `root` that a run starting from `resumed` does not continue: all of
    them for a run that starts afresh or from another folder's checkpoint (checkpoint.resume=never,
    fine-tuning into a used folder), the ones past `resumed` for a run that resumes an older checkpoint of
    its own (a rewind by path, a fallback past a damaged newest one)."""
    if not root.is_dir():
        return []
    own = _own_step(root, resumed)
    through = folder_step(own) if own else -1
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and folder_step(p) > through)


def other_trajectories_summary(root: Path, names: list[str]) -> str:
    """What becomes of `other_trajectories`, in the words the run and `dist-train check` both use."""
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
    return (
        f"{len(names)} checkpoint(s) in {root} that this run does not continue ({shown}) are set aside once its "
        "first step ran, as .abandoned-<name>-<pid>: kept, not counted by checkpoint.keep_last, never resumed by "
        "auto; delete them when no longer needed"
    )


def set_aside_other_trajectories(root: Path, resumed: Path | None) -> list[str]:
    """Rank 0, once the run's first step ran: move `other_trajectories` out of the way, as
    `.abandoned-step-N-PID` (never deleted), and point `latest` at `resumed` (or remove it). Left in
    place they counted toward keep_last (the run kept fewer of its own), and `checkpoint.resume: auto`
    (the newest intact step first) would resume the other trajectory. `latest` is also repaired when
    nothing is set aside: after a crash between a save's rename and the update of `latest`, a resume
    takes the newer folder, and a run with no step left to save would leave `latest` naming the one
    before (which a resume by run folder reads). Returns the names set aside."""
    others = other_trajectories(root, resumed)
    own = _own_step(root, resumed)
    if own and read_latest(root) != own.name:  # first: it never names a missing folder
        write_atomic(root / "latest", (own.name + "\n").encode())
    elif not own and others:
        (root / "latest").unlink(missing_ok=True)
    for path in others:
        os.rename(path, aside_path(root, "abandoned", path.name))
    if others:
        fsync_path(root)
    return [path.name for path in others]


def _intact(folder: Path) -> bool:
    try:
        verify(folder)
        return True
    except ValueError:
        return False


# --- reading --------------------------------------------------------------------------------------------


def read_latest(root: Path) -> str | None:
    """The text of `root/latest` (undecodable bytes replaced), None when there is none."""
    try:
        return (root / "latest").read_bytes().decode("utf-8", errors="replace").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:  # made by hand (`ln -s step-N latest`); a save could not replace it either
        raise UserError(
            f"{root / 'latest'} is a folder or a link to one, not the text file dist_train keeps there: "
            "remove it (a resume finds the newest intact checkpoint without it)"
        ) from None
    except PermissionError as err:  # another user's run folder
        raise UserError(
            f"{root / 'latest'} cannot be read ({err.strerror}): get read access to the run folder, or name one of "
            "its step-XXXXXXXX folders"
        ) from None


MANIFEST_FIELDS = {"step": int, "world_size": int, "strategy": str, "trainer": dict, "files": dict}


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _number(value) -> bool:
    return type(value) in (int, float)


def _text_or_none(value) -> bool:
    return value is None or type(value) is str


# The values a run writes in its manifest's trainer state (state.TrainState) and plateau state
# (schedules.PlateauState): any other was edited by hand, and resuming it failed steps later (a
# negative sample count, at the next batch) or trained on from a state no run reached.
PLATEAU_FIELDS = {
    "scale": lambda v: _number(v) and v >= 0,
    "best": lambda v: v is None or _number(v),
    "bad_evals": _count,
    "cooldown_left": _count,
    "reductions": _count,
    "watched": _text_or_none,
}
TRAINER_FIELDS = {
    "step": _count,
    "epoch": _count,
    "samples_in_epoch": _count,
    "skipped_steps": _count,
    "nonfinite_streak": lambda v: type(v) is list and len(v) == 2 and all(map(_count, v)),
    "best_metric": lambda v: v is None or _number(v),
    "evals_without_improvement": _count,
    "best_of": _text_or_none,
    "window_count": lambda v: _number(v) and v >= 0,
    "lr_schedule": lambda v: (
        type(v) is dict and all(k in PLATEAU_FIELDS and PLATEAU_FIELDS[k](x) for k, x in v.items())
    ),
    "last_eval_step": lambda v: type(v) is int and v >= -1,
    "early_stopped": lambda v: type(v) is bool,
    "started_from": _text_or_none,
}


def _check_manifest(folder: Path, manifest) -> None:
    """The fields a resume reads, and a file list that covers every file a load may read."""
    where = f"{folder}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise ValueError(f"{where} is not a dist_train manifest")
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{where}: `{key}` is missing or not a {kind.__name__} (edited or not a dist_train manifest)"
            )
    for key, value in manifest["trainer"].items():  # a field this version does not know: state.py says so
        if key in TRAINER_FIELDS and not TRAINER_FIELDS[key](value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"{where}: the trainer state's `{key}` is {shown}, not a value a run writes (edited)")
    if manifest["trainer"].get("step", manifest["step"]) != manifest["step"]:
        raise ValueError(f"{where}: the trainer state's step is not the manifest's (edited)")
    for name, entry in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{where}: file name {name!r} points outside the checkpoint")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"{where}: the entry of {name} has no size and sha256")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        # DeepSpeed copies its conversion scripts (zero_to_fp32.py) beside the checkpoint; nothing loads them
        helper_script = path.parent == folder and path.suffix == ".py"
        if path.is_file() and name != MANIFEST and name not in manifest["files"] and not helper_script:
            raise ValueError(f"{folder.name}: file {name} is not in the manifest (unverified: edited or foreign)")


def verify(folder: Path, checksums: bool = True) -> dict:
    """The manifest of a complete, intact checkpoint folder; ValueError saying what is wrong otherwise.
    `checksums=False` checks every file's presence and size only (reads no data: `dist-train check`)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no {MANIFEST} (incomplete or not a checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{folder}/{MANIFEST} is not valid JSON") from None
    except OSError as err:  # a folder by that name, an I/O error
        raise ValueError(f"{folder}/{MANIFEST} cannot be read ({err.strerror})") from None
    _check_manifest(folder, manifest)
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder.name}: file {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise ValueError(
                f"{folder.name}: file {name} has {path.stat().st_size} bytes, manifest says {entry['size']}"
            )
        try:
            intact = not checksums or sha256_file(path) == entry["sha256"]
        except OSError as err:  # another user's file this one may not read, an I/O error
            raise ValueError(f"{folder.name}: file {name} cannot be read ({err.strerror})") from None
        if not intact:
            raise ValueError(f"{folder.name}: file {name} fails its checksum (corrupted)")
    return manifest


@dataclass(frozen=True)
class Found:
    folder: Path
    manifest: dict
    origin: str | None = None  # a checkpoint named by path that a run starts from (TrainState.started_from)


def _started_from(resume: str, output_dir: Path, manifest: dict | None = None) -> bool:
    """Whether a checkpoint of the run in `output_dir` (or the one `manifest` describes) records that
    the run started from the checkpoint or run folder `resume` (TrainState.started_from). Without a
    manifest it reads the manifests only, no checksums: cheap enough for every start."""
    named = Path(resume).resolve()
    if manifest is not None:
        manifests = [manifest]
    else:
        manifests = []
        for path in (output_dir / "checkpoints").glob("step-*/" + MANIFEST):
            try:
                manifests.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    for candidate in manifests:
        trainer = candidate.get("trainer") if isinstance(candidate, dict) else None
        origin = trainer.get("started_from") if isinstance(trainer, dict) else None
        if isinstance(origin, str) and named in (Path(origin), *Path(origin).parents[:2]):
            return True
    return False


def resume_path(resume: str) -> Path:
    """The checkpoint folder a `checkpoint.resume` path names (a checkpoint folder, or a run folder's
    `latest`), not verified yet; UserError when it names none."""
    path = Path(resume)
    try:
        exists = path.exists()
        named = exists and (path / MANIFEST).exists()
        root = path / "checkpoints" if exists and not named and (path / "checkpoints").is_dir() else path
    except PermissionError as err:  # in (or being) a folder this user may not enter: another user's run
        raise UserError(
            f"checkpoint.resume: {path} cannot be read ({err.strerror}): get read access to the run folder, or "
            "name a checkpoint you can read"
        ) from None
    if not exists:
        raise UserError(
            f"checkpoint.resume: {path} does not exist (give a step-XXXXXXXX folder, a run folder, auto or never)"
        )
    if not named:
        latest = read_latest(root)
        if latest is None:
            raise UserError(
                f"checkpoint.resume: {path} is neither a checkpoint folder nor a run folder with checkpoints/latest"
            )
        path = root / latest
        if not STEP_DIR.match(latest) or not path.is_dir():
            raise UserError(f"checkpoint.resume: {root}/latest names {latest!r}, which is not a checkpoint folder")
    return path


def resume_candidates(root: Path) -> list[Path]:
    """The `step-N` folders under `root` in the order `checkpoint.resume: auto` tries them: the newest
    step first. `latest` does not come first: a crash between a save's rename and its `latest` update
    leaves `latest` naming the checkpoint before, and resuming that one set the complete newer one aside.
    Nothing else leaves a newer step folder beside `latest` that a run should not continue: a run that
    sets later ones aside (a rewind by path, a fallback past a damaged newest one) resumes by its path
    again after a crash, or skips the damaged ones again."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=folder_step, reverse=True)


def find_resume_checkpoint(resume: str, output_dir: Path) -> Found | None:
    """Resolve `checkpoint.resume` to a verified checkpoint (rank 0 only: it reads every byte).

    `auto`: the newest intact `step-*` folder (`latest` names it, except after a crash between a
    save's rename and the update of `latest`); a corrupt candidate is reported in one line and skipped. A path: a checkpoint folder or a run folder; must be intact, unless this
    run started from it and has checkpoints of its own since: the same command started again (a
    requeue, a restart after exit 75) continues from those.
    """
    if resume == "never":
        return None
    if resume != "auto":
        own = find_resume_checkpoint("auto", output_dir) if _started_from(resume, output_dir) else None
        if own is not None and _started_from(resume, output_dir, own.manifest):  # the one auto picked
            log.info("checkpoint.resume: this run started from %s; continuing from its own %s", resume, own.folder.name)
            return own
        path = resume_path(resume)
        try:
            return Found(path, verify(path), origin=str(path.resolve()))
        except ValueError as err:
            raise UserError(f"checkpoint.resume: {err}") from None

    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    latest = read_latest(root)
    named = STEP_DIR.match(latest) if latest and (root / latest).is_dir() else None
    if latest and not named:
        log.warning(
            "checkpoints/latest names %r, which is not a checkpoint folder; looking for the newest intact checkpoint",
            latest,
        )
    for folder in resume_candidates(root):
        try:
            found = Found(folder, verify(folder))
        except ValueError as err:
            log.warning("skipping checkpoint %s: %s; falling back to an older one", folder.name, err)
            continue
        if named and folder_step(folder) > int(named.group(1)):
            log.info(
                "checkpoints/latest names %s, but %s is newer and complete (a crash came between its rename and the "
                "update of latest): taking %s",
                latest,
                folder.name,
                folder.name,
            )
        return found
    return None


def load_payload(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one bad-checkpoint message
        raise UserError(f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def config_hash(training_config: dict) -> str:
    """A short hash of the training-relevant config (model, data, batch shape, optimiser, schedule)."""
    return hashlib.sha256(json.dumps(training_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
