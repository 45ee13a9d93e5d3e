"""The numbered checkpoints of one run directory (:class:`CheckpointManager`): save, rotate, point
``last.pt`` at the newest, set aside the ones a blow-up fed or a rollback abandoned (and keep the
rollback's record), tidy our own leftovers."""
from __future__ import annotations

import errno
import json
import logging
import time
import os
import shutil
from pathlib import Path


from .files import WRITE_ERRNOS, free_space, fsync_dir, write_atomic

from .checkpoint import (ABANDONED_SUFFIX, CHECKPOINT_DIR, DIVERGED_SUFFIX, LAST, NUMBERED, RESUMED_FROM, _quarantine,
                         _repoint_last, numbered_checkpoints, pointed_at, resolve_pointer, step_of)
from .checkpoint_write import CheckpointWriteError, _atomic_save, _point, _sum_path, state_bytes

log = logging.getLogger("fcmae")

class CheckpointManager:
    """The numbered checkpoints of one run directory. Only the process holding the directory's
    lock (rank 0 of the run) writes, renames or tidies through it."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep
        self._warned_space = False

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def exists(self) -> bool:
        return bool(numbered_checkpoints(self.dir)) or (self.last.is_file() and resolve_pointer(self.last) == self.last)

    def newest(self) -> tuple[int, Path] | None:
        found = numbered_checkpoints(self.dir)
        return found[-1] if found else None

    def describe_last_good(self) -> str:
        newest = self.newest()
        return f"{newest[1]} (step {newest[0]})" if newest else "none yet"

    @staticmethod
    def _own_temporary(name: str) -> bool:
        """A temporary file of one of the run's own writes (``.checkpoint-0000004.pt.tmp``, ``.last.pt.tmp``,
        ``.best.pt.sum.tmp``, the resume record's): never another tool's, such as an export writing beside
        the checkpoints."""
        if not (name.startswith(".") and name.endswith(".tmp")):
            return False
        inner = name[1:-4]
        return inner.endswith((".pt", ".pt.sum")) or inner == RESUMED_FROM

    def tidy(self) -> None:
        """Start-up housekeeping of a directory this process holds the lock of: the temporary
        files of our writes a kill interrupted (they take space the next checkpoint needs), and
        sidecars whose checkpoint never took its name."""
        if not self.dir.is_dir():
            return
        freed = 0
        for p in self.dir.iterdir():
            stale = self._own_temporary(p.name)
            orphan = p.name.endswith(".pt.sum") and NUMBERED.fullmatch(p.name[:-4]) and not p.with_name(p.name[:-4]).exists()
            if stale or orphan:
                try:
                    size = p.stat().st_size if not p.is_symlink() else 0
                    p.unlink()
                except OSError:
                    continue
                freed += size
                log.info("removed %s, left by an interrupted write (%.1f MiB)", p, size / 2**20)
        if freed:
            fsync_dir(self.dir)
        newest = self.newest()
        if newest is not None:
            self._warn_if_next_will_not_fit(newest[1].stat().st_size)

    def point_last_at(self, path: Path) -> None:
        """Make ``last.pt`` name ``path`` when it does not already (a kill between a checkpoint's
        rename and the pointer's update leaves it one behind)."""
        if pointed_at(self.last) != path.name:
            log.info("pointing %s at %s", self.last, path.name)
            _repoint_last(self.dir, path)

    def set_aside_from(self, first_step: int) -> list[Path]:
        """Rename the numbered checkpoints of step >= ``first_step`` ``*.diverged`` (weights taken
        after the loss blew up: kept for inspection, never resumed from); re-point ``last.pt``."""
        moved = [_quarantine(p, DIVERGED_SUFFIX) for step, p in numbered_checkpoints(self.dir) if step >= first_step]
        newest = self.newest()
        if newest is not None:
            self.point_last_at(newest[1])
        elif self.last.is_symlink() or self.last.is_file():
            self.last.unlink(missing_ok=True)
        return moved

    def roll_back_to(self, step: int, source: Path) -> list[Path]:
        """A resume from ``source`` (step ``step``): the numbered checkpoints of later steps, and the named
        extras (``best.pt``) written after it, belong to a timeline the run abandons: renamed
        ``*.abandoned`` (kept, never resumed from); ``last.pt`` follows. The decision is recorded
        (:meth:`record_resume`)."""
        moved = [_quarantine(p, ABANDONED_SUFFIX) for s, p in numbered_checkpoints(self.dir) if s > step]
        moved += [_quarantine(p, ABANDONED_SUFFIX) for p in self._named_extras() if (step_of(p) or 0) > step]
        newest = self.newest()
        if newest is not None:
            self.point_last_at(newest[1])
        elif moved and (self.last.is_symlink() or self.last.is_file()):
            self.last.unlink(missing_ok=True)
        self.record_resume(step, source, [p.name for p in moved])
        return moved

    def record_resume(self, step: int, source: Path, abandoned: list[str] = ()) -> None:
        """Record a ``resume=PATH`` decision (:data:`RESUMED_FROM`), so that a rerun of the same command (a
        requeue) continues the run's timeline instead of going back to ``source`` again."""
        self._mkdir()
        record = {"path": str(Path(source).absolute()), "step": step, "abandoned": list(abandoned),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(self.dir / RESUMED_FROM, lambda tmp: tmp.write_text(json.dumps(record) + "\n"), "resume record")

    def _named_extras(self) -> list[Path]:
        """The checkpoints kept by name (``best.pt``, ``best-ema.pt``): outside the rotation."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.pt") if p.name != LAST and not NUMBERED.fullmatch(p.name)
                      and p.is_file() and not p.is_symlink())

    def resumed_from(self) -> dict | None:
        """The record of the last ``resume=PATH`` in this directory (None: none, or unreadable)."""
        try:
            return json.loads((self.dir / RESUMED_FROM).read_text())
        except (OSError, ValueError):
            return None

    def save(self, state: dict, step: int) -> Path:
        """Write ``checkpoint-<step>.pt`` and point ``last.pt`` at it."""
        self._mkdir()
        path = self.dir / f"checkpoint-{step:07d}.pt"
        self._trim(self.keep - 1, protect=path)
        sums = self._write(state, path, sums_step=step)
        try:
            _point(self.last, path)
        except OSError as exc:
            raise CheckpointWriteError(self._write_failure(exc, self.last, {})) from None
        fsync_dir(self.dir)
        self._trim(self.keep, protect=path)
        self._warn_if_next_will_not_fit(sums["bytes"])
        return path

    def save_as(self, state: dict, name: str) -> Path:
        """An extra checkpoint kept by name (``best.pt``), outside the keep-K rotation."""
        self._mkdir()
        path = self.dir / name
        self._write(state, path)
        return path

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise CheckpointWriteError(self._write_failure(exc, self.dir, {})) from None

    def _write(self, state: dict, path: Path, sums_step: int | None = None) -> dict:
        try:
            return _atomic_save(state, path, sums_step)
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise CheckpointWriteError(self._write_failure(exc, path, state)) from None

    def _write_failure(self, exc: OSError, path: Path, state: dict) -> str:
        needed = state_bytes(state)
        newest = self.newest()
        if newest is not None:
            needed = max(needed, newest[1].stat().st_size)
        free = free_space(self.dir if self.dir.is_dir() else self.dir.parent)
        return (f"could not write checkpoint {path}: {os.strerror(exc.errno)} (errno {errno.errorcode.get(exc.errno, exc.errno)}); "
                f"it needs about {needed / 2**20:.1f} MiB, {free}. The partial file was removed; the last good "
                f"checkpoint is {self.describe_last_good()}. Free space (or fix the permission), or move the run "
                "directory elsewhere, then run the same command again to resume from it")

    def _trim(self, keep: int, protect: Path) -> None:
        """Delete the oldest numbered checkpoints until ``keep`` remain (never fewer than one,
        never ``protect``)."""
        found = [p for _, p in numbered_checkpoints(self.dir) if p != protect]
        for old in found[: max(len(found) - max(keep, 1), 0)]:
            old.unlink(missing_ok=True)
            _sum_path(old).unlink(missing_ok=True)

    def _warn_if_next_will_not_fit(self, size: int) -> None:
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return
        found = numbered_checkpoints(self.dir)
        freed = sum(p.stat().st_size for _, p in found[: max(len(found) - max(self.keep - 1, 1), 0)])
        if free + freed < size * 1.05:
            if not self._warned_space:
                log.warning("%s has %.1f MiB free; the next checkpoint needs about %.1f MiB and will not fit: "
                            "free space or move the run directory before then", self.dir, free / 2**20, size / 2**20)
            self._warned_space = True
        else:
            self._warned_space = False


