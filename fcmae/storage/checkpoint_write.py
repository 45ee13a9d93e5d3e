"""Writing a checkpoint whole or not at all: a temporary file checksummed as it is written, fsynced,
its ``.sum`` made durable, then the rename and the directory's fsync; a failure removes the temporary
file and says why (:class:`CheckpointWriteError`). Pointers (``last.pt``) written the same way."""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch

from .files import DiskWriteError, publish_atomic

log = logging.getLogger("fcmae")

class CheckpointWriteError(DiskWriteError):
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


def non_finite_tensors(obj) -> list[str]:
    """Names of the floating-point tensors in a (nested) state that hold a NaN or an infinity (one
    host sync for all of them)."""
    names, tensors = [], []

    def walk(node, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() and node.numel():
                names.append(prefix or "tensor")
                tensors.append(torch.isfinite(node).all())
            return
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
        for k, v in items:
            walk(v, f"{prefix}.{k}" if prefix else str(k))
    walk(obj, "")
    if not tensors:
        return []
    finite = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sum")


def _atomic_save(obj, path: Path, sums_step: int | None = None) -> dict:
    """``torch.save`` through :func:`fcmae.storage.files.publish_atomic` (durable), checksummed as it
    is written, with the ``.sum`` sidecar made durable before the checkpoint takes its name when
    ``sums_step`` is given. Returns the file's size and CRC-32. On failure the temporary file (and a
    new sidecar) is gone and ``path`` untouched; a disk error raises the ``OSError`` the disk gave
    (not torch's wrapper of it), for the store to word."""
    sums: dict = {}
    sidecar: list[Path] = []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            w = _ChecksumWriter(f)
            try:
                torch.save(obj, w)
            except BaseException as exc:
                if w.error is not None and w.error is not exc:
                    raise w.error from None
                raise
            f.flush()
        sums.update(bytes=w.bytes, crc32=w.crc)

    def sums_first(tmp: Path) -> None:
        if sums_step is not None:
            _write_small(_sum_path(path), json.dumps({"step": sums_step, **sums}))
            sidecar.append(_sum_path(path))

    try:
        publish_atomic(path, write, durable=True, before_publish=sums_first)
    except BaseException:
        for p in sidecar:
            p.unlink(missing_ok=True)
        raise
    return sums


def _write_small(path: Path, text: str) -> None:
    """A small file, whole or not at all, on disk before this returns (the sidecar, a text pointer)."""
    publish_atomic(path, lambda tmp: tmp.write_text(text), durable=True)


def _point(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (same directory) as a relative symlink, replaced atomically; where the
    file system has no symlinks, a small text file holding the target's name (never a copy: the
    peak of K checkpoints must hold). Readers follow both (:func:`resolve_pointer`)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        _write_small(link, target.name + "\n")
        return
    os.replace(tmp, link)


