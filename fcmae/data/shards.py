"""Sharded datasets: many images in a few tar files (``data=shards``), and ``fcmae-shards pack``.

Millions of small files are what a cluster's shared filesystem or object store serves worst; a few
hundred large archives are what it serves best. The archives are plain tar files in the WebDataset
layout (``000000042.jpg`` + ``000000042.cls`` per sample, the image's original bytes, never
re-encoded), so ``webdataset`` and ``tar`` read them too; ``index.json`` beside them, written last,
lists every member's shard, offset and size.

We read them by random access through that index rather than as a stream: a shard set is then a
map-style dataset like a folder, and every guarantee of the file sources holds unchanged: exact
resume mid-epoch, per-sample seeded crops and masks (keys are indices), DDP sharding by rank
(``ResumableSampler``), unreadable members skipped, named (``shard-000003.tar:000000042.jpg``) and
counted. A streaming reader (WebDataset, MosaicML Streaming) would give up exact resume or
per-sample keys, or both. Paths may be local or, with ``fsspec`` and its backend installed, any
URL it opens (``s3://``, ``gs://``, ``https://``): documented, not tested here. The packer is
:mod:`fcmae.data.shards_pack` (``fcmae-shards pack``).
"""
from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from .image_io import RGB, Channels, DataError, class_index

INDEX = "index.json"
FORMAT = "fcmae-shards/1"
# Open shard handles kept per process: random access touches every shard each epoch, and ImageNet
# in 1 GB shards is ~1,300 files, more than a default limit of 1,024 open files per process.
MAX_OPEN = 64


def _open(path: str, mode: str = "rb"):
    if "://" in path:
        try:
            import fsspec
        except ImportError:
            raise DataError(f"{path}: reading shards from a URL needs fsspec (pip install fsspec and its "
                            "backend, e.g. s3fs)") from None
        return fsspec.open(path, mode).open()
    return open(path, mode)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _own_file(root: str, name) -> str:
    """A shard's file name from the index, refused unless it names a file inside the shard set's own
    folder: a dataset must not point at other files (``/etc/...``, ``../..``, a link leading out)."""
    ok = isinstance(name, str) and name and not name.startswith(("/", "\\")) and "://" not in name
    ok = ok and ".." not in Path(name).parts
    if ok and "://" not in root:
        base = os.path.realpath(root)
        target = os.path.realpath(os.path.join(root, name))
        ok = os.path.commonpath([base, target]) == base and target != base
    if not ok:
        raise DataError(f"{root}/{INDEX} names shard {name!r}, which is not a file inside {root}; a shard set "
                        "may only name its own files (pack it again with fcmae-shards pack)")
    return name


class ShardImages(Dataset):
    """The images of a shard set (the folder or URL holding ``index.json``). Returns ``(PIL RGB image,
    label)`` (label 0 for unlabelled sets); ``classes``: the class names, where the set has them.
    ``channels``: how a member becomes the run's input (:class:`fcmae.data.image_io.Channels`)."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None, channels: Channels = RGB):
        self.root, self.channels = str(root), channels
        try:
            with _open(_join(self.root, INDEX)) as f:
                index = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{self.root} holds no {INDEX}: not a shard set (pack one with fcmae-shards pack SRC "
                            f"{self.root}), or its packing did not finish") from None
        if index.get("format") != FORMAT:
            raise DataError(f"{self.root}/{INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
        self.shards = [_own_file(self.root, s.get("file")) for s in index["shards"]]
        self.members = [(i, *m) for i, s in enumerate(index["shards"]) for m in s["members"]]
        # the original path of each member (indexes packed before they were kept have none)
        self.sources = [src for s in index["shards"] for src in (s.get("sources") or [None] * len(s["members"]))]
        if not self.members:
            raise DataError(f"{self.root} is an empty shard set")
        own = index.get("classes")
        labels = [m[4] for m in self.members]
        if classes is not None and own is not None:  # match another set's classes by name
            matched, position = class_index(own, classes, self.root)
            labels, own = [position[own[label]] for label in labels], matched
        self.labels, self.classes = labels, own
        self._files: OrderedDict = OrderedDict()  # (pid, shard) -> handle, least recently used first

    def __len__(self) -> int:
        return len(self.members)

    def describe(self, index: int) -> str:
        shard, _, _, name, _ = self.members[index]
        source = self.sources[index] if index < len(self.sources) else None
        return f"{_join(self.root, self.shards[shard])}:{name}" + (f" (packed from {source})" if source else "")

    def read_bytes(self, index: int) -> bytes:
        """The member's stored bytes (the original image file)."""
        shard, offset, size, _, _ = self.members[index]
        key = (os.getpid(), shard)  # one handle per worker process and shard, at most MAX_OPEN
        f = self._files.get(key)
        if f is None:
            while len(self._files) >= MAX_OPEN:
                (pid, _), old = self._files.popitem(last=False)
                if pid == os.getpid():  # a handle inherited through fork belongs to the parent
                    old.close()
            f = self._files[key] = _open(_join(self.root, self.shards[shard]))
        else:
            self._files.move_to_end(key)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.describe(index)}: {len(data)} of {size} bytes (a truncated shard)")
        return data

    def __getitem__(self, index: int):
        return self.channels.read(io.BytesIO(self.read_bytes(index)), name=self.members[index][3]), self.labels[index]

    def __getstate__(self):  # open handles do not travel to loader workers
        return {**self.__dict__, "_files": OrderedDict()}
