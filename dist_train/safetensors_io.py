"""Minimal reader/writer for the safetensors format (https://github.com/huggingface/safetensors).

Layout: 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and [begin, end) byte offsets into the data that follows, then the raw little-endian
bytes. Written here so exporting weights needs no extra dependency; files load with the
`safetensors` package as well.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .checkpoint import atomic_file

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
NAMES = {v: k for k, v in DTYPES.items()}


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically and durably (checkpoint.atomic_file). The header needs only
    shapes and dtypes; then one tensor at a time goes to host memory and into the file from a view of
    its storage: the export never holds a second copy of the model."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    names, offset = sorted(tensors), 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with atomic_file(Path(path)) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            tensor = tensors[name].detach().cpu().contiguous()
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (no pickle involved)."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > len(raw):
        raise ValueError(f"{path}: header length {header_len} runs past the end of the file")
    header = json.loads(raw[8 : 8 + header_len])
    data = memoryview(raw)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        dtype = NAMES[info["dtype"]]
        flat = (
            torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
            if end > begin
            else torch.empty(0, dtype=torch.uint8)
        )
        out[name] = flat.view(dtype).reshape(info["shape"])
    return out
