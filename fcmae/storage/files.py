"""Finishing touches of a file write that every writer shares: the mode a colleague can read, a
directory fsync that makes a rename durable, and one error for a write the disk refused.

Every file a run writes (checkpoints, reconstruction images, metrics lines, exports) goes through
:func:`write_atomic` or :func:`append_line`: a full disk, a quota or a read-only file system then
gives the same one-line :class:`DiskWriteError` (the loop stops every rank on it), and never leaves
a 0-byte or half-written file behind."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import UserError

# What the disk (not our code) refused: no space, quota, I/O error, permission, read-only, too big.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


class DiskWriteError(UserError, RuntimeError):
    """A file could not be written; the message says what, where, and how to go on."""


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


def free_space(directory: str | os.PathLike) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


RESUME_ADVICE = ("Free space (or fix the permission), or move the run directory elsewhere, then run the same "
                 "command again to resume")


def describe_write_failure(exc: OSError, path: str | os.PathLike, what: str = "file", advice: str = RESUME_ADVICE) -> str:
    code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno else type(exc).__name__
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"could not write {what} {path}: {reason} (errno {code}); {free_space(Path(path).parent)}. {advice}"


def is_disk_refusal(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


@contextlib.contextmanager
def disk_refusals(path: str | os.PathLike, what: str = "file", advice: str = RESUME_ADVICE):
    """Turn a write the disk refuses (no space, quota, read-only, permission) into one
    :class:`DiskWriteError` line naming ``path``; any other error passes through."""
    try:
        yield
    except OSError as exc:
        if is_disk_refusal(exc):
            raise DiskWriteError(describe_write_failure(exc, path, what, advice)) from None
        raise


def publish_atomic(path: str | os.PathLike, write: Callable[[Path], None], durable: bool = False,
                   before_publish: Callable[[Path], None] | None = None) -> Path:
    """The one way a file of ours takes its name: ``write(tmp)`` to a temporary file beside ``path``,
    fsync it (``durable``), ``before_publish(tmp)`` (a checkpoint's checksum sidecar, made durable
    first), rename it into place, fsync the directory (``durable``: a power loss cannot undo it). On
    any failure the temporary file is removed and ``path`` stays as it was; the error passes through
    for the caller to word (:func:`write_atomic`; a checkpoint's own message says what it needs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        publish_mode(tmp)
        if before_publish is not None:
            before_publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file",
                 advice: str = RESUME_ADVICE) -> Path:
    """:func:`publish_atomic`, with a refusal by the disk raised as one :class:`DiskWriteError` line."""
    with disk_refusals(path, what, advice):
        return publish_atomic(path, write)


def append_line(path: str | os.PathLike, line: str, what: str = "log") -> None:
    """Append one whole line (``line`` without its newline) or nothing: a write the disk refuses is
    cut back to the file's earlier length, so a JSON-lines file never holds a half record."""
    path = Path(path)
    data = (line + "\n").encode()
    fd = None
    with disk_refusals(path, what):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            if fd is not None:
                os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
