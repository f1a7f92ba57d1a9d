"""Formatting shared by the tools: byte sizes and aligned plain-text tables."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, three significant digits)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover - loop always returns


def size_label(n: int) -> str:
    """Message sizes as nccl-tests prints them: 1 KB, 64 KB, 256 MB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:g} {unit}"
        n //= 1024
    return f"{n} GB"  # pragma: no cover


def table(header: list[str], rows: list[list[str]], indent: str = "  ", align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` has one `l` or `r` per column (default: the
    first column left-aligned, the others right-aligned)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(row: list[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return indent + "  ".join(parts).rstrip()

    return "\n".join(line(row) for row in cells)


def key_values(pairs: list[tuple[str, object]], indent: str = "  ") -> str:
    """`key: value` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{indent}{(k + ':').ljust(width + 1)} {v}" for k, v in pairs)
