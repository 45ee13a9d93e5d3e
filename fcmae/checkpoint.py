"""Run-directory checkpoints: durable atomic writes, keep-last-K, walk-back on damage, RNG state.

Layout: ``RUN_DIR/checkpoints/checkpoint-0000123.pt`` (the K newest kept), each with a
``checkpoint-0000123.pt.sum`` beside it (size and CRC-32 of the file, written after it),
``RUN_DIR/checkpoints/last.pt`` (a relative symbolic link to the newest: a pointer, never a
second name of the same bytes) and named extras such as ``best.pt`` that the rotation never
removes.

What a run directory's "last checkpoint" is: the newest numbered file that loads, has its keys,
holds the step its name says and matches its checksum. A damaged one is renamed
``*.pt.damaged`` (kept for inspection, never tried again, never deleted) with a warning naming
it and why, and the next older one is tried. So a truncated newest file (a failing disk, a full
quota, an interrupted copy) costs the steps since the older checkpoint, not the run.

Writing: a temporary file, fsync, rename, fsync of the directory (so a power loss cannot undo
a checkpoint that was reported saved). Before writing, the rotation trims to K-1 numbered
files (never below one), so the peak is K files (2 when K = 1) and there is always a good one
on disk. A write that fails (no space, quota, I/O error, permission) removes its temporary
file and raises :class:`CheckpointWriteError` naming the file, the space needed and free, and
the last good checkpoint.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from .convert import CheckpointError, load_state_dict_file
from .files import fsync_dir, publish_mode

log = logging.getLogger("fcmae")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")
DAMAGED_SUFFIX = ".damaged"
# What every training checkpoint holds; a file without them is not one (or is damaged).
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch")
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EROFS, errno.EFBIG}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says what, where, and how to go on."""


class _ChecksumWriter:
    """A binary file wrapper that counts and CRCs what passes through it."""

    def __init__(self, f):
        self.f, self.crc, self.bytes = f, 0, 0
        self.error: OSError | None = None  # torch's C++ writer may rewrap what write() raises

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.bytes += view.nbytes
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _file_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def state_bytes(obj) -> int:
    """The tensor bytes in a (nested) checkpoint: about the size it will take on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _atomic_save(obj, path: Path) -> dict:
    """``torch.save`` to a temporary file, fsync, rename, fsync the directory. Returns the
    file's size and CRC-32. On failure the temporary file is gone and ``path`` untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    w = None
    try:
        with open(tmp, "wb") as f:
            w = _ChecksumWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if w is not None and w.error is not None and w.error is not exc:
            raise w.error from None
        raise
    fsync_dir(path.parent)
    return {"bytes": w.bytes, "crc32": w.crc}


def _write_small(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _point(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (same directory) as a relative symlink, replaced atomically;
    a hard link, then a copy, where the file system has no symlinks."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def numbered_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the numbered checkpoints in ``directory``, oldest first."""
    out = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = NUMBERED.fullmatch(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def check_checkpoint(path: Path, expect_step: int | None = None, required=REQUIRED_KEYS) -> dict:
    """Load a training checkpoint and check it is whole; raises :class:`CheckpointError`
    saying why not (checksum, unreadable, keys missing, step other than its name)."""
    sums = path.with_name(path.name + ".sum")
    if sums.is_file():
        try:
            want = json.loads(sums.read_text())
        except (ValueError, OSError):
            want = None
        if want:
            size, crc = _file_crc(path)
            if size != want.get("bytes"):
                raise CheckpointError(f"{size} bytes where {want.get('bytes')} were written (truncated or overwritten)")
            if crc != want.get("crc32"):
                raise CheckpointError("checksum mismatch: the file changed after it was written")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"holds a {type(ck).__name__}, not a training checkpoint")
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointError(f"lacks {', '.join(missing)}: not a training checkpoint")
    if expect_step is not None and ck["step"] != expect_step:
        raise CheckpointError(f"holds step {ck['step']} but is named for step {expect_step}")
    return ck


def newest_good_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` of the newest numbered checkpoint in ``directory`` that is whole,
    or None when there is none at all. Damaged ones are warned about, by name and reason, and
    renamed ``*.damaged``. Raises :class:`CheckpointError` listing every file
    tried when none is whole. A directory from before numbered files were pointers (a regular
    ``last.pt`` only) is read through its ``last.pt``."""
    directory = Path(directory)
    candidates = numbered_checkpoints(directory)
    last = directory / LAST
    if not candidates:
        if last.is_file():  # an old layout or a hand-made directory: last.pt is all there is
            try:
                return last, check_checkpoint(last, required=())
            except CheckpointError as exc:
                raise CheckpointError(f"{last} is damaged ({exc}) and there is no other checkpoint in "
                                      f"{directory}") from None
        return None
    tried = []
    for step, path in reversed(candidates):
        try:
            ck = check_checkpoint(path, step)
        except CheckpointError as exc:
            tried.append(f"{path.name}: {exc}")
            kept = _quarantine(path)
            log.warning("checkpoint %s is damaged (%s); kept as %s, trying the next older one",
                        path, exc, kept.name)
            continue
        if tried:
            _repoint_last(directory, path)
        return path, ck
    raise CheckpointError(f"no checkpoint in {directory} loads; tried, newest first:\n  - " + "\n  - ".join(tried)
                          + "\nstart afresh with resume=never and another run_name, or restore the directory")


def _quarantine(path: Path) -> Path:
    dest = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{n}")
        n += 1
    try:
        os.replace(path, dest)
        sums = path.with_name(path.name + ".sum")
        if sums.exists():
            os.replace(sums, dest.with_name(dest.name + ".sum"))
        fsync_dir(path.parent)
    except FileNotFoundError:  # another rank moved it first
        return dest
    except OSError as exc:
        log.warning("could not rename damaged %s (%s); it will be tried again next time", path, exc)
        return path
    return dest


def _repoint_last(directory: Path, target: Path) -> None:
    try:
        _point(directory / LAST, target)
        fsync_dir(directory)
    except OSError as exc:
        log.warning("could not point %s at %s (%s)", directory / LAST, target.name, exc)


def run_checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint directory that ``path`` stands for: a run directory, its
    ``checkpoints/`` folder, or the ``last.pt`` in it; None for any other file."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_DIR).is_dir():
            return path / CHECKPOINT_DIR
        if numbered_checkpoints(path) or (path / LAST).exists():
            return path
        return None
    if path.name == LAST and (path.is_symlink() or path.exists()):
        return path.parent
    return None


def load_resolved(path: str | Path) -> tuple[Path, dict | None]:
    """``(file, checkpoint)``: for a run directory (or its ``last.pt``) the newest whole
    training checkpoint, already loaded; for any other file the file itself (``checkpoint``
    None: the caller reads its format)."""
    path = Path(path)
    ck_dir = run_checkpoint_dir(path)
    if ck_dir is not None:
        found = newest_good_checkpoint(ck_dir)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint yet ({ck_dir}/checkpoint-*.pt); "
                                  "pass a pretraining run directory or a checkpoint file")
        log.info("using %s (step %d), the newest whole checkpoint of %s", found[0], found[1]["step"], path)
        return found
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without checkpoints ({CHECKPOINT_DIR}/checkpoint-*.pt); "
                              "pass a pretraining run directory or a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return path, None


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """``(file, contents)`` of any checkpoint we accept: a run directory (or its ``last.pt``)
    gives its newest whole checkpoint; a file is read by its format (``.safetensors``, or a
    torch pickle read weights-only)."""
    src, ck = load_resolved(path)
    return src, ck if ck is not None else load_state_dict_file(src)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep
        self._warned_space = False

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def exists(self) -> bool:
        return bool(numbered_checkpoints(self.dir)) or self.last.is_file()

    def newest(self) -> tuple[int, Path] | None:
        found = numbered_checkpoints(self.dir)
        return found[-1] if found else None

    def describe_last_good(self) -> str:
        newest = self.newest()
        return f"{newest[1]} (step {newest[0]})" if newest else "none yet"

    def save(self, state: dict, step: int) -> Path:
        """Write ``checkpoint-<step>.pt`` and point ``last.pt`` at it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"checkpoint-{step:07d}.pt"
        self._trim(self.keep - 1, protect=path)
        sums = self._write(state, path)
        _write_small(path.with_name(path.name + ".sum"), json.dumps({"step": step, **sums}))
        _point(self.last, path)
        fsync_dir(self.dir)
        self._trim(self.keep, protect=path)
        self._warn_if_next_will_not_fit(sums["bytes"])
        return path

    def save_as(self, state: dict, name: str) -> Path:
        """An extra checkpoint kept by name (``best.pt``), outside the keep-K rotation."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        self._write(state, path)
        return path

    def _write(self, state: dict, path: Path) -> dict:
        try:
            return _atomic_save(state, path)
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise CheckpointWriteError(self._write_failure(exc, path, state)) from None

    def _write_failure(self, exc: OSError, path: Path, state: dict) -> str:
        needed = state_bytes(state)
        newest = self.newest()
        if newest is not None:
            needed = max(needed, newest[1].stat().st_size)
        try:
            free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
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
            old.with_name(old.name + ".sum").unlink(missing_ok=True)

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


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our training checkpoints (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}  # plain types: weights_only loads it
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
