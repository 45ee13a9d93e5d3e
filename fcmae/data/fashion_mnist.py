"""Fashion-MNIST read straight from its four IDX files (Debian: ``dataset-fashion-mnist``).

60k train / 10k test grey 28x28 images of 10 clothing classes: real labelled images that
need no network. Images come out as 3-channel PIL images at 28x28; the usual transforms
resize them to ``img_size``.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .image_io import RGB, Channels

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


class FashionMNISTError(RuntimeError):
    """The IDX files are missing or malformed; the message names the fix."""


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FashionMNISTError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with `{INSTALL_HINT}` "
        f"(files land in {DEFAULT_ROOT}) or point the root at a folder holding the four IDX files")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array; ``magic`` 2051 = images, 2049 = labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    found, = struct.unpack(">I", data[:4])
    if found != magic:
        raise FashionMNISTError(f"{path}: IDX magic {found}, expected {magic}; is this the right file?")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FashionMNISTError(f"{path}: {body.size} bytes of data for shape {dims}; the file is truncated")
    return body.reshape(dims)


class FashionMNIST(Dataset):
    """``split`` is ``train`` or ``test``. Returns ``(28x28 image, label)``: a PIL RGB image (the grey
    replicated) under the default ``channels``, natively one band under ``data.channels=grey``."""

    def __init__(self, root: str | Path | None = None, split: str = "train", channels: Channels = RGB):
        if split not in _FILES:
            raise FashionMNISTError(f"split={split!r}; use train or test")
        root = Path(root or DEFAULT_ROOT)
        images_file, labels_file = (_find(root, stem) for stem in _FILES[split])
        self.images = read_idx(images_file, _IMAGE_MAGIC)
        self.labels = read_idx(labels_file, _LABEL_MAGIC).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise FashionMNISTError(f"{images_file} has {len(self.images)} images, {labels_file} "
                                    f"{len(self.labels)} labels")
        self.split, self.channels = split, channels
        self.classes = len(CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        return f"fashion-mnist {self.split} image #{index}"

    def __getitem__(self, index: int):
        return self.channels.convert(Image.fromarray(self.images[index])), int(self.labels[index])
