"""`data.name: hf`: local json/jsonl/csv/parquet/text files through `datasets.load_dataset`,
tokenised once, cached as tensors, and served as a TensorDataset.

Tokenizers: `bytes` (built in: ids 0 pad, 1 eos, 2 unk, byte b -> b + 3; vocabulary 259, the
ByT5 layout) or a local folder loaded with `AutoTokenizer.from_pretrained(local_files_only=True)`.
Tasks: `lm` packs all texts (each followed by eos) into `block_size` windows, items
`(ids[i:i+T], ids[i+1:i+T+1])`; `classification` truncates/right-pads each text to `max_length`,
items `(ids, label)`, string labels numbered in sorted order (numerically when all are numbers).

Preprocessing runs once: rank 0 builds `<cache_dir>/<hash of files and settings>/data.pt`
(temp file + rename) while the other ranks wait at a barrier, then every rank loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from ..checkpoint import fsync_path
from ..errors import UserError

log = logging.getLogger("dist_train")

# bump when the preprocessing changes, so old caches are not reused (4: numeric labels in numeric order;
# 5: no second eos after a text the tokenizer already closes with one)
CACHE_VERSION = 5
BYTE_PAD, BYTE_EOS, BYTE_OFFSET = 0, 1, 3
FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}


def hf_dataset(
    split: str,
    files: dict[str, Any] | str,
    task: str = "lm",
    tokenizer: str = "bytes",
    text_column: str = "text",
    label_column: str = "label",
    block_size: int = 128,
    max_length: int = 128,
    format: str | None = None,
    cache_dir: str | None = None,
) -> Dataset | None:
    """`files`: {train: path or [paths], eval: ...} (a single path: train only)."""
    if task not in ("lm", "classification"):
        raise UserError(f"data.task must be lm or classification, got {task!r}")
    if format is not None and format not in set(FORMATS.values()):
        raise UserError(
            f"data.format must be one of {', '.join(sorted(set(FORMATS.values())))} or null, got {format!r}"
        )
    for key, value in (("block_size", block_size), ("max_length", max_length)):
        if type(value) is not int or value < 1:  # 0: empty items, the run's first step failed with a traceback
            raise UserError(f"data.{key} must be a whole number of tokens >= 1, got {value!r}")
    paths = _paths(files if isinstance(files, dict) else {"train": files})
    if split not in paths:
        return None
    settings = {
        "task": task,
        "tokenizer": _tokenizer_identity(tokenizer),
        "text_column": text_column,
        "label_column": label_column if task == "classification" else None,
        "length": block_size if task == "lm" else max_length,
        "format": format,
        "version": CACHE_VERSION,
    }
    files_id = {name: [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in ps] for name, ps in paths.items()}
    key = hashlib.sha256(json.dumps([files_id, settings], sort_keys=True).encode()).hexdigest()[:16]
    first = next(iter(paths.values()))[0]
    folder = (Path(cache_dir) if cache_dir else first.parent / ".dist_train_cache") / key
    data = _prepare(folder, lambda scratch: _preprocess(paths, settings, tokenizer, format, scratch))
    return TensorDataset(data[f"{split}_inputs"], data[f"{split}_targets"])


def _paths(files: dict[str, Any]) -> dict[str, list[Path]]:
    paths = {}
    for name, value in files.items():
        if name not in ("train", "eval"):
            raise UserError(f"data.files has split {name!r}: use `train` and `eval`")
        if value is None or value == []:  # a split without files has no items (`eval: null`: no evaluation)
            continue
        paths[name] = [Path(p).expanduser().resolve() for p in (value if isinstance(value, list) else [value])]
        for path in paths[name]:
            if not path.is_file():
                raise UserError(f"data.files.{name}: no file {str(path)!r}")
    if not paths:
        raise UserError("data.files is empty: give {train: FILE, eval: FILE}")
    return paths


def _tokenizer_identity(tokenizer: str) -> Any:
    """What the cache key records of the tokenizer: `bytes`, or its folder's files with sizes and times."""
    if tokenizer == "bytes":
        return "bytes"
    folder = Path(tokenizer).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"data.tokenizer must be `bytes` or a local tokenizer folder; {tokenizer!r} is neither")
    return [str(folder)] + sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def _prepare(folder: Path, build) -> dict[str, torch.Tensor]:
    """Rank 0 builds the cache if missing, the others wait at a barrier; then every rank loads it."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    data_file = folder / "data.pt"
    error = None
    if rank == 0 and not data_file.exists():
        try:
            _build_atomic(folder, build, rank)
        except Exception as err:  # noqa: BLE001 - re-raised after the barrier, so no rank hangs
            error = err
    if distributed:
        # The barrier's timeout is the process group's (dist.timeout_s): raise it for big corpora.
        gpu = dist.get_backend() == "nccl"
        try:
            dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if gpu else {}))
        except Exception as err:  # noqa: BLE001 - a rank timed out waiting; rank 0 then sees it leave
            if error is not None:
                raise error from None
            # the same words on every rank (said once per node): rank 0's "Connection closed by peer"
            # named neither the wait nor the setting
            raise UserError(
                f"hf data: the ranks waiting for rank 0 to preprocess into {folder} gave up after dist.timeout_s "
                f"({type(err).__name__} at the barrier); raise dist.timeout_s, or build the cache beforehand "
                "with a one-process run of the same config"
            ) from None
    if error is not None:
        raise error
    if not data_file.exists():
        # Rank 0 failed (and says why), or the cache folder is not shared with this node: build here.
        _build_atomic(folder, build, rank)
    try:
        return torch.load(data_file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a file cut short by a node crash, or not ours
        raise UserError(
            f"hf data: the preprocessed cache {data_file} cannot be read ({type(err).__name__}: {err}); "
            f"delete the folder {folder} and start again to rebuild it"
        ) from None


def _build_atomic(folder: Path, build, rank: int) -> None:
    started = time.time()
    try:  # next to the data files by default, which are often read-only (a shared dataset)
        folder.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="scratch-", dir=folder)  # datasets' own arrow cache, dropped afterwards
    except OSError as err:
        raise UserError(
            f"hf data: cannot write the preprocessing cache {folder} ({err.strerror}); "
            "set data.cache_dir to a folder this user can write in"
        ) from None
    log.info("hf data: preprocessing into %s", folder)
    try:
        tensors, meta = build(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # a unique name: ranks of several nodes (pids alike in containers) may build into one shared folder
    tmp = folder / f"data.pt.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    torch.save(tensors, tmp)
    fsync_path(tmp)  # on disk before the rename: a node crash leaves no short data.pt
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "data.pt")  # atomic: readers see the whole file or none
    with open(folder.parent / "builds.log", "a") as f:  # provenance: which rank built what, when
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} rank {rank} pid {os.getpid()} built {folder.name} ")
        f.write(f"in {time.time() - started:.1f}s\n")
    log.info("hf data: %s", json.dumps(meta))


def _load_split(datasets, name: str, paths: list[Path], fmt: str | None, settings: dict, tmp: str):
    suffix = (paths[0].suffix if paths[0].suffix != ".gz" else Path(paths[0].stem).suffix).lower()  # x.tsv.gz: .tsv
    if fmt is None:
        fmt = FORMATS.get(suffix)
        if fmt is None:
            raise UserError(f"cannot tell the format of {str(paths[0])!r}: set data.format (json, csv, parquet, text)")
    kwargs: dict[str, Any] = {"cache_dir": tmp}
    if fmt == "text":
        kwargs["sample_by"] = "document" if settings["task"] == "lm" else "line"  # an LM keeps a file's newlines
    if fmt == "csv":
        # texts as written: pandas reads `NA`, `null`, `None`, `nan` as missing (an empty text) and an
        # all-numeric column as numbers (`007` -> 7); only an empty label field is missing
        kwargs["keep_default_na"] = False
        kwargs["converters"] = {settings["text_column"]: str}
        if settings["label_column"] is not None:
            kwargs["na_values"] = {settings["label_column"]: [""]}
    if fmt == "csv" and suffix == ".tsv":
        kwargs["delimiter"] = "\t"
    files = [str(p) for p in paths]
    try:
        return datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets wraps the reader's error: say what it was
        cause = err.__cause__ or err
        if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):  # empty, header only
            raise UserError(f"data.files.{name}: {', '.join(files)} has no rows") from None
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())  # one line
        raise UserError(
            f"data.files.{name}: cannot read {', '.join(files)} as {fmt} ({detail}); fix the file or set data.format"
        ) from None


def _encoder(tokenizer: str):
    """-> (encode(list of texts, max tokens or None) -> list of id lists, pad id, eos id or None, vocabulary size).

    A tokenizer truncates itself, so the special tokens that close a text ([SEP]) survive."""
    if tokenizer == "bytes":

        def encode_bytes(texts: list[str], max_length: int | None = None) -> list[list[int]]:
            return [[b + BYTE_OFFSET for b in (t or "").encode("utf-8")][:max_length] for t in texts]

        return encode_bytes, BYTE_PAD, BYTE_EOS, 256 + BYTE_OFFSET
    os.environ["HF_HUB_OFFLINE"] = "1"
    from ..imports import require

    transformers = require("transformers", "hf", "data.tokenizer=<folder>")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def encode_hf(texts: list[str], max_length: int | None = None) -> list[list[int]]:
        limit = {"truncation": True, "max_length": max_length} if max_length else {}
        return tok([t or "" for t in texts], verbose=False, **limit)["input_ids"]

    return encode_hf, pad, tok.eos_token_id, len(tok)


def _preprocess(paths: dict[str, list[Path]], settings: dict, tokenizer: str, fmt: str | None, scratch: str):
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from ..imports import require

    datasets = require("datasets", "hf", "data.name=hf")
    datasets.disable_progress_bars()  # rank 0's log stays readable
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read: our one line says why
    encode, pad, eos, vocab = _encoder(tokenizer)
    task, length, text_column = settings["task"], settings["length"], settings["text_column"]
    splits = {name: _load_split(datasets, name, ps, fmt, settings, scratch) for name, ps in paths.items()}
    for name, ds in splits.items():
        needed = [text_column] + ([settings["label_column"]] if task == "classification" else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise UserError(f"data.files.{name} has no column {missing[0]!r} (columns: {ds.column_names})")
        if getattr(ds.features[text_column], "dtype", None) not in ("string", "large_string"):
            raise UserError(
                f"data.files.{name}: column {text_column!r} holds {ds.features[text_column]}, not text: "
                "set data.text_column to the text field"
            )
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"pad_id": pad, "eos_id": eos, "vocab_size": vocab, "task": task}
    label_map = _label_map(splits, settings["label_column"]) if task == "classification" else None
    if label_map:
        meta["labels"] = label_map
    for name, ds in splits.items():
        limit = length if task == "classification" else None  # an LM packs whole texts
        ids = [encode(batch[text_column], limit) for batch in ds.iter(batch_size=1000)]
        ids = [row for chunk in ids for row in chunk]
        if task == "lm":
            inputs, targets = _pack(ids, eos, length, name)
        else:
            inputs = torch.full((len(ids), length), pad, dtype=torch.long)
            for i, row in enumerate(ids):
                row = row[:length]
                inputs[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            labels = ds[settings["label_column"]]
            targets = torch.tensor(
                [label_map[_label_key(v)] if label_map else int(v) for v in labels], dtype=torch.long
            )
        tensors[f"{name}_inputs"], tensors[f"{name}_targets"] = inputs, targets
        meta[f"{name}_items"] = len(inputs)
    return tensors, meta


def _label_map(splits: dict, column: str) -> dict[str, int] | None:
    """None when every label is already an integer; else sorted distinct labels -> 0..K-1."""
    for name, ds in splits.items():  # a list or mapping (a multi-label row, a nested field) has no class id
        if bad := next((v for v in ds[column] if isinstance(v, (list, dict))), None):
            raise UserError(
                f"data.label_column {column!r} of the {name} split holds {type(bad).__name__}s ({bad!r:.60}): each "
                "row needs one label, a string or a number (multi-label targets are not a classification task here)"
            )
    values = {v for ds in splits.values() for v in ds[column]}
    if None in values:
        raise UserError(f"data.label_column {column!r} has empty labels")
    if all(isinstance(v, int) for v in values):  # bool is an int too
        return None
    names = {_label_key(v) for v in values}
    numeric = all(_number(name) is not None for name in names)  # "2" before "10", as a csv's ints are kept
    label_map = {label: i for i, label in enumerate(sorted(names, key=_number if numeric else None))}
    if "train" in splits:
        unseen = names - {_label_key(v) for v in splits["train"][column]}
        if unseen:
            log.warning(
                "hf data: label(s) %s appear only outside the train split; they still take class ids "
                "(%d classes in all): the model needs num_labels >= %d",
                ", ".join(sorted(unseen)),
                len(label_map),
                len(label_map),
            )
    return label_map


def _number(name: str) -> float | None:
    try:
        value = float(name)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "nan" is a name: a NaN key would not sort


def _label_key(value: Any) -> str:
    """A label's name in the mapping. 1.0 and 1 are one label (the set above keeps whichever came
    first), so they need one name: one json split may write 1.0 where another writes 1."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _pack(ids: list[list[int]], eos: int | None, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the texts (eos after each) and cut into block_size windows shifted by one.

    A tokenizer that closes every text with eos itself (T5, ByT5, BART, llama's add_eos_token) gets
    no second one."""
    closed = [row if eos is None or row[-1:] == [eos] else row + [eos] for row in ids]
    stream = torch.tensor([t for row in closed for t in row], dtype=torch.long)
    blocks = (len(stream) - 1) // block_size
    if blocks < 1:
        raise UserError(f"data.files.{name} has {len(stream)} tokens: too few for one block of {block_size}")
    inputs = stream[: blocks * block_size].view(blocks, block_size)
    targets = stream[1 : blocks * block_size + 1].view(blocks, block_size)
    return inputs, targets
