"""Run-directory checkpoints: durable atomic writes, keep-last-K, walk-back on damage, RNG state.

Layout: ``RUN_DIR/checkpoints/checkpoint-0000123.pt`` (the K newest kept), each with a
``checkpoint-0000123.pt.sum`` beside it (size and CRC-32 of the file, made durable before the
checkpoint takes its name), ``RUN_DIR/checkpoints/last.pt`` (a relative symbolic link to the newest,
or a small text file naming it where links are not allowed: a pointer, never a second copy) and
named extras such as ``best.pt`` that the rotation never removes.

What a run directory's "last checkpoint" is: the newest numbered file that matches its checksum,
loads, has its keys and holds the step its name says. A file is called damaged only on proof: its
size or CRC-32 differs from its ``.sum``, it is not a zip archive (``torch.save``'s format) or one
of its members fails the zip's own CRC-32, it holds no training checkpoint, or another step. A
training run (rank 0 alone, holding the run directory's lock) renames a damaged file
``*.pt.damaged`` (kept for inspection, never tried again, never deleted) and tries the next older
one; read-only commands (export, evaluation, ``init_from``) skip it and say so. An error that is not
proof (out of memory, an I/O error, a file whose bytes are intact but do not load) renames nothing:
it stops, naming the file. A checkpoint without a readable ``.sum`` is "unverified": a warning names
it and its bytes are checked against the zip's own CRC-32s instead.

Writing: a temporary file, fsync, the ``.sum`` (fsynced), rename, fsync of the directory (so a power
loss cannot undo a checkpoint that was reported saved). Before writing, the rotation trims to K-1
numbered files (never below one), so the peak is K files (2 when K = 1) and there is always a good
one on disk. A write that fails (no space, quota, I/O error, permission) removes its temporary
file and raises :class:`CheckpointWriteError` naming the file, the space needed and free, and
the last good checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .files import fsync_dir
from .weights_file import CheckpointError

from .checkpoint_write import (CheckpointWriteError, _file_crc, _point, _sum_path,  # noqa: F401 (re-exported)
                               non_finite_tensors, state_bytes)

log = logging.getLogger("fcmae")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")
DAMAGED_SUFFIX = ".damaged"
DIVERGED_SUFFIX = ".diverged"  # weights taken after the loss blew up: kept, never resumed from
ABANDONED_SUFFIX = ".abandoned"  # newer than the checkpoint a resume=PATH rolled back to: kept, never resumed from
SET_ASIDE = re.compile(r"checkpoint-\d+\.pt\.(damaged|diverged|abandoned)\d*")
RESUMED_FROM = "resumed_from.json"  # the last resume=PATH decision: a rerun of it follows its timeline
POINTER_MAX_BYTES = 256  # a text last.pt (no links allowed) is one file name
# What every training checkpoint holds; a file without them is not one (or is damaged).
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch")

class CheckpointDamaged(CheckpointError):
    """Proof that a checkpoint file is not what was written: a checksum, format, key or step mismatch."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint could not be read for a reason that proves nothing about the file (memory, I/O,
    an intact file this torch cannot load): nothing is renamed, the run stops naming the file."""


def resolve_pointer(path: Path) -> Path:
    """The file a ``last.pt`` stands for: itself when it is a link or a real checkpoint; the named
    sibling when it is a text pointer (written where links are not allowed)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return path
    try:
        if path.stat().st_size <= POINTER_MAX_BYTES:
            name = path.read_bytes().decode("utf-8", "replace").strip()
            if NUMBERED.fullmatch(name):
                return path.with_name(name)
    except OSError:
        pass
    return path


def pointed_at(link: Path) -> str | None:
    """The file name ``last.pt`` points at (link or text pointer), None when it is neither."""
    if link.is_symlink():
        return Path(os.readlink(link)).name
    target = resolve_pointer(link)
    return target.name if target != link else None


def numbered_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the numbered checkpoints in ``directory``, oldest first."""
    out = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = NUMBERED.fullmatch(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def set_aside_checkpoints(directory: Path) -> list[Path]:
    """The ``*.damaged``, ``*.diverged`` and ``*.abandoned`` checkpoints of a directory (kept, never resumed from)."""
    return sorted(p for p in directory.iterdir() if SET_ASIDE.fullmatch(p.name)) if directory.is_dir() else []


def read_sums(path: Path) -> dict | None:
    """The ``.sum`` sidecar of ``path`` as ``{"bytes", "crc32"}``; None when it is missing,
    unreadable or malformed (the checkpoint is then "unverified")."""
    try:
        want = json.loads(_sum_path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(want, dict):
        return None
    size, crc = want.get("bytes"), want.get("crc32")
    if not (isinstance(size, int) and isinstance(crc, int)) or isinstance(size, bool) or isinstance(crc, bool):
        return None
    return {"bytes": size, "crc32": crc}


def _verify_bytes(path: Path) -> str:
    """Raise :class:`CheckpointDamaged` unless ``path``'s bytes are what was written; returns how
    that was checked. With a ``.sum``: size and CRC-32. Without one: the zip's own member CRC-32s."""
    want = read_sums(path)
    if want is not None:
        size, crc = _file_crc(path)
        if size != want["bytes"]:
            raise CheckpointDamaged(f"{size} bytes where {want['bytes']} were written (truncated or overwritten)")
        if crc != want["crc32"]:
            raise CheckpointDamaged("checksum mismatch: the file changed after it was written")
        return "its .sum"
    log.warning("checkpoint %s is unverified: its .sum is missing or unreadable; checking it against the zip "
                "archive's own CRC-32s instead", path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as exc:
        raise CheckpointDamaged(f"not a whole zip archive, the format torch.save writes ({exc})") from None
    except (EOFError, ValueError) as exc:
        raise CheckpointDamaged(f"not a whole zip archive ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise CheckpointDamaged(f"member {bad} fails its CRC-32: the file changed after it was written")
    return "the zip archive's CRC-32s"


def check_checkpoint(path: Path, expect_step: int | None = None, required=REQUIRED_KEYS) -> dict:
    """Load a training checkpoint and check it is whole. Raises :class:`CheckpointDamaged` with
    the proof (checksum, format, keys, step) or :class:`CheckpointUnreadable` when it cannot be
    read for another reason (memory, I/O, a version of torch that cannot load intact bytes)."""
    path = Path(path)
    try:
        verified_by = _verify_bytes(path)
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except (OSError, MemoryError) as exc:
        raise CheckpointUnreadable(f"{path} could not be read ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); nothing was "
                                   "renamed: fix the cause (memory, disk, permissions) and run the same command "
                                   "again") from None
    except Exception as exc:
        raise CheckpointUnreadable(
            f"{path} is intact (checked by {verified_by}) but does not load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); nothing was renamed: if this is a "
            "lack of memory, retry with more; if another torch wrote it, load it with that version") from None
    if not isinstance(ck, dict):
        raise CheckpointDamaged(f"holds a {type(ck).__name__}, not a training checkpoint")
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointDamaged(f"lacks {', '.join(missing)}: not a training checkpoint")
    if expect_step is not None and ck["step"] != expect_step:
        raise CheckpointDamaged(f"holds step {ck['step']} but is named for step {expect_step}")
    return ck


def newest_good_checkpoint(directory: Path, quarantine: bool = False) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` of the newest numbered checkpoint in ``directory`` that is whole,
    or None when there is none at all. Damaged ones are warned about, by name and reason, and, with
    ``quarantine`` (a training run holding the directory's lock), renamed ``*.damaged``; read-only
    callers leave them in place. Raises :class:`CheckpointError` listing every file tried when
    none is whole, and :class:`CheckpointUnreadable` at the first file that cannot be read for a
    reason that proves no damage. A directory from before numbered files were pointers (a regular
    ``last.pt`` only) is read through its ``last.pt``."""
    directory = Path(directory)
    candidates = numbered_checkpoints(directory)
    last = directory / LAST
    if not candidates:
        if last.is_file() and resolve_pointer(last) == last:  # an old layout: last.pt is all there is
            try:
                return last, check_checkpoint(last, required=())
            except CheckpointDamaged as exc:
                raise CheckpointError(f"{last} is damaged ({exc}) and there is no other checkpoint in "
                                      f"{directory}") from None
        return None
    tried = []
    for step, path in reversed(candidates):
        try:
            ck = check_checkpoint(path, step)
        except CheckpointDamaged as exc:
            tried.append(f"{path.name}: {exc}")
            if quarantine:
                kept = _quarantine(path)
                log.warning("checkpoint %s is damaged (%s); kept as %s, trying the next older one",
                            path, exc, kept.name)
            else:
                log.warning("checkpoint %s is damaged (%s); skipping it (left in place: only a training run "
                            "renames it), trying the next older one", path, exc)
            continue
        if tried and quarantine:
            _repoint_last(directory, path)
        return path, ck
    raise CheckpointError(f"no checkpoint in {directory} loads; tried, newest first:\n  - " + "\n  - ".join(tried)
                          + "\nstart afresh with resume=never and another run_name, or restore the directory")


def _quarantine(path: Path, suffix: str = DAMAGED_SUFFIX) -> Path:
    dest = path.with_name(path.name + suffix)
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}{suffix}{n}")
        n += 1
    try:
        os.replace(path, dest)
        sums = _sum_path(path)
        if sums.exists():
            os.replace(sums, dest.with_name(dest.name + ".sum"))
        fsync_dir(path.parent)
    except FileNotFoundError:
        return dest
    except OSError as exc:
        log.warning("could not rename %s (%s); it will be tried again next time", path, exc)
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


def load_checkpoint(path: str | Path) -> dict:
    """One training checkpoint file (a text ``last.pt`` pointer is followed) as the flat dict on disk,
    verified as every read verifies it: for tools and tests that look at raw entries. The app reads
    checkpoints through :mod:`fcmae.storage.checkpoint_record`."""
    return check_checkpoint(resolve_pointer(Path(path)), required=())


def step_of(path: Path) -> int | None:
    """The step a checkpoint file holds, read without loading its tensors (memory-mapped); None when it
    cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # unreadable or not a training checkpoint: the caller leaves it where it is
        return None


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
