"""Finishing touches of a file write that every writer shares: the mode a colleague can read,
and a directory fsync that makes a rename durable."""
from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a finished file the mode a plain ``open()`` would (0644 under the usual umask 022):
    temporary files may be created 0600, and on a shared cluster a colleague must read the result."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(Path(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
