"""Reload on change: polls the file's identity, which a ConfigMap symlink swap changes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def file_signature(path: str) -> tuple[int, int, int] | None:
    """Inode, mtime and size of what `path` resolves to now; None while it is missing."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


async def watch_file(path: str, on_change: Callable[[], object], interval: float = 1.0) -> None:
    last = file_signature(path)
    while True:
        await asyncio.sleep(interval)
        current = file_signature(path)
        if current is not None and current != last:
            last = current
            on_change()
