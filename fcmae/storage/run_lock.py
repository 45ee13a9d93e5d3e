"""One run per run directory: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock``, held by rank 0 for
the whole run.

Two commands writing one directory interleave their metrics and overwrite each other's checkpoints,
and the loser may report "done" on the winner's weights. The lock file holds the holder's host, pid
and start time so that the refusal can name it. The kernel drops a ``flock`` when its process dies
(a SIGKILL, a Slurm requeue's old job), so a stale file never blocks a later run. Read-only commands
(export, evaluation) do not take it.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError
from .files import WRITE_ERRNOS

log = logging.getLogger("fcmae")

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # this process's lock descriptors: a forked worker closes its copies


def close_inherited_locks() -> None:
    """In a forked child (a data worker): close the copies of the parent's lock descriptors. The lock
    stays the parent's (a flock belongs to the open file, which the parent still holds), and an orphaned
    child can no longer keep it after the parent dies."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


class RunDirectoryBusy(ConfigError):
    """Another process holds the run directory's lock."""


class RunDirectoryUnwritable(ConfigError):
    """The run directory cannot be written (read-only file system, permissions)."""


def unwritable_message(run_dir: Path, exc: OSError) -> str:
    return (f"run directory {run_dir} is not writable ({os.strerror(exc.errno) if exc.errno else exc}); "
            "a run needs to write checkpoints and logs there: fix the permission, or run elsewhere "
            "(hydra.run.dir=/writable/path, or from a writable working directory)")


class RunLock:
    """``with RunLock(run_dir):`` holds the lock or raises :class:`RunDirectoryBusy` at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise RunDirectoryUnwritable(unwritable_message(self.run_dir, exc)) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryBusy(_busy_message(self.run_dir, holder)) from None
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # some network file systems
                log.warning("cannot lock %s (%s): make sure no other run uses this directory", self.path,
                            os.strerror(exc.errno))
            else:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in WRITE_ERRNOS:
                raise RunDirectoryUnwritable(unwritable_message(self.run_dir, exc)) from None
            raise
        self.fd = fd
        _HELD.add(fd)
        return self

    def check_free(self) -> None:
        """Raise :class:`RunDirectoryBusy` if another process holds the lock now; creates nothing (Hydra
        asks before it writes the run directory's ``.hydra/`` record, which a refused run must not touch)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or none readable): nothing holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusy(_busy_message(self.run_dir, _read_holder(fd))) from None
        finally:
            os.close(fd)  # closing drops a lock this probe took

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _busy_message(run_dir: Path, holder: str) -> str:
    return (f"run directory {run_dir} is in use by another run ({holder}); wait for it to finish, or start this one "
            "elsewhere (another run_name, or hydra.run.dir=...)")


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def check_writable(directory: str | Path) -> None:
    """Raise :class:`RunDirectoryUnwritable` unless a file can be created in ``directory`` (made
    if missing). Permission bits do not stop root, a read-only file system does: so try it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise RunDirectoryUnwritable(unwritable_message(directory, exc)) from None
        raise
