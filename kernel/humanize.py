"""Sizes and times as people read them: ``1.2 GiB``, ``3 minutes ago``."""

from __future__ import annotations

import time


def size(n: float) -> str:
    """``512 bytes``, ``3.4 KiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{int(n)} byte{'s' if n != 1 else ''}"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """``850 ms``, ``4.2 s``, ``3 minutes``, ``2 hours``, ``5 days``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    raise AssertionError("unreachable")


def ago(timestamp: float, now: float | None = None) -> str:
    """``just now``, ``3 minutes ago``."""
    delta = (time.time() if now is None else now) - timestamp
    if delta < 10:
        return "just now"
    if delta < 60:
        return f"{int(delta)} seconds ago"
    return f"{duration(delta)} ago"


def when(timestamp: float) -> str:
    """Local wall-clock time plus how long ago: ``2026-11-22 19:30 (3 minutes ago)``."""
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(timestamp))} ({ago(timestamp)})"


def names(items: list[str], limit: int = 20) -> str:
    """``a, b, c`` with ``and 12 more`` past ``limit``."""
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


def plural(n: int, word: str) -> str:
    """``1 variable``, ``3 variables``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> list[str]:
    """Rows as aligned text lines: columns padded to width, those in ``right`` right-aligned, the last never padded."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if c in right else (cell if c == len(row) - 1 else cell.ljust(w))
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
