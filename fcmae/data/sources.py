"""What a dataset is: synthetic images, a flat folder, an image folder, a file list (labelled or
not), Fashion-MNIST and shards; ``build_source`` picks the pretraining source from the config,
``labelled_source`` the fine-tuning and evaluation sets. Items are ``(image, label)``: a PIL RGB image, or
a ``[C, H, W]`` float tensor under other ``data.channels`` (:class:`fcmae.data.image_io.Channels`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..models.masking import image_shape
from .fashion_mnist import FashionMNIST, FashionMNISTError
from .image_io import RGB, BandCountError, Channels, DataError, class_index
from .shards import ShardImages

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".npy")


class SyntheticImages(Dataset):
    """Procedural images with class structure (oriented gratings + a shape), no download.

    Class ``c = index % classes`` sets the grating orientation/frequency and the
    shape kind; colours, phase and placement vary per image. Deterministic in
    ``(seed, index)``. Returns ``(PIL image, label)``.

    The grating (the class cue) always has a contrast of 0.2-0.3 on a background near grey. With a
    background drawn over [0.2, 0.8] and a grating as faint as 0.05, the colour nuisance buried the
    cue: fine-tuning from the 1-minute pretraining demo stayed at chance (15.6%) while random init
    reached 88%, and the demo's pretrained features scored below random ones in k-NN.
    """

    def __init__(self, num_images: int, classes: int = 8, size: int = 256, seed: int = 0, channels: Channels = RGB):
        self.num_images, self.classes, self.size, self.seed = num_images, classes, size, seed
        self.channels = channels

    def __len__(self) -> int:
        return self.num_images

    def describe(self, index: int) -> str:
        return f"synthetic image #{index}"

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, index))
        c = index % self.classes
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        theta = math.pi * c / self.classes
        freq = 3.0 + 2.0 * (c % 4) + rng.uniform(-0.5, 0.5)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
        img = rng.uniform(0.4, 0.6, 3).astype(np.float32) + 0.3 * wave[..., None] * rng.uniform(0.7, 1.0, 3)
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        if c % 2 == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            inside = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        img[inside] = rng.uniform(0.0, 1.0, 3)
        img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
        return self.channels.convert(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))), c


class ImageFiles(Dataset):
    """Images from a list of paths. Returns ``(image, label)``: a PIL RGB image, or a ``[C, H, W]`` tensor
    for other ``channels`` (:class:`fcmae.data.image_io.Channels`); unreadable files raise."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None = None, channels: Channels = RGB):
        self.paths, self.channels = list(paths), channels
        self.labels = list(labels) if labels is not None else [0] * len(self.paths)
        self.classes: list[str] | None = None  # class names by label, where the source has them

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def __getitem__(self, index: int):
        return self.channels.read(self.paths[index]), self.labels[index]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def labelled_files(entries: Sequence[tuple[Path, str]], classes: Sequence[str] | None, where,
                   channels: Channels = RGB) -> ImageFiles:
    """``(path, class name)`` pairs -> :class:`ImageFiles` whose labels index ``classes`` (a
    training set's, so another set is matched by name) or, without it, the sorted names found.
    A class not among ``classes`` is an error naming it and ``where`` it was found."""
    classes, index = class_index((c for _, c in entries), classes, where)
    out = ImageFiles([p for p, _ in entries], [index[c] for _, c in entries], channels)
    out.classes = classes
    return out


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None, channels: Channels = RGB) -> ImageFiles:
    """``root/<class>/**/<image>``; labels are class indices. ``classes``: the class names
    the labels index (a train set's), so a val set with a subset of the folders, or folders in
    another order, gets the train set's indices; a folder not among them is an error. Without
    it, the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory (expected class folders root/<class>/<image>)")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    entries = []
    for name in folders:
        for dirpath, _, files in sorted(os.walk(root / name)):
            entries += [(Path(dirpath) / f, name) for f in sorted(files) if _is_image(Path(f))]
    if not entries:
        raise DataError(
            f"no images found under class folders of {root} (extensions {', '.join(IMAGE_EXTENSIONS)}); "
            "for a flat folder use data=folder"
        )
    # every class folder counts, an empty one too (as torchvision's ImageFolder): indices stay put
    return labelled_files(entries, folders if classes is None else classes, root, channels)


def scan_folder(root: str | Path, channels: Channels = RGB) -> ImageFiles:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory")
    paths = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files if _is_image(Path(f)))
    if not paths:
        raise DataError(f"no images found in {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(paths, channels=channels)


def read_file_list(list_file: str | Path, channels: Channels = RGB) -> ImageFiles:
    """One path per line; blank lines and ``#`` comments ignored; relative to the list's folder."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"data.root={list_file} is not a file (data=filelist expects a text file of image paths)")
    base = list_file.parent
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            paths.append(p if p.is_absolute() else base / p)
    if not paths:
        raise DataError(f"{list_file} lists no images")
    return ImageFiles(paths, channels=channels)


def read_labelled_list(list_file: str | Path, classes: Sequence[str] | None = None,
                       channels: Channels = RGB) -> ImageFiles:
    """A labelled file list: one ``path class_name`` per line (the class is the last
    whitespace-separated field; paths relative to the list's folder; blank lines and ``#``
    comments ignored). Labels index the sorted class names, or ``classes`` (a training set's),
    so a val list is matched by name; a class not among them is an error naming it."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"{list_file} is not a file (a labelled file list: one 'path class_name' per line)")
    entries = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_file}:{n}: {line!r} has no class; write 'path class_name'")
        p = Path(parts[0])
        entries.append((p if p.is_absolute() else list_file.parent / p, parts[1]))
    if not entries:
        raise DataError(f"{list_file} lists no images")
    return labelled_files(entries, classes, list_file, channels)


def synthetic_size(img_size) -> int:
    """Synthetic images are drawn a little larger than the crop, as 256 -> 224 (the longer side of
    ``[H, W]``)."""
    return int(round(max(image_shape(img_size)) * 8 / 7))


def build_source(data_cfg, seed: int = 0, channels: Channels = RGB) -> Dataset:
    src = data_cfg.source
    if src == "synthetic":
        return SyntheticImages(data_cfg.synthetic_images, data_cfg.synthetic_classes,
                               synthetic_size(data_cfg.img_size), seed, channels)
    if src == "imagefolder":
        return scan_image_folder(data_cfg.root, channels=channels)
    if src == "folder":
        return scan_folder(data_cfg.root, channels)
    if src == "filelist":
        return read_file_list(data_cfg.root, channels)
    if src == "fashion_mnist":
        return fashion_mnist(data_cfg.root, "train", channels)
    if src == "shards":
        return ShardImages(data_cfg.root, channels=channels)
    raise DataError(f"data.source={src!r}; use synthetic, imagefolder, folder, filelist, shards or fashion_mnist")


def check_bands(source: Dataset, channels: Channels, where: str = "data") -> None:
    """At start: the first readable sample must give the bands the model takes (``model.in_chans``),
    or the run stops here with the fix, instead of skipping every file as unreadable later. Files
    that cannot be read at all are the loader's business (skipped, named, counted): up to five are tried."""
    for index in range(min(len(source), 5)):
        try:
            source[index]
            return
        except BandCountError as exc:
            raise DataError(f"{where}: {describe_sample(source, index)} has {exc}; {exc.fix}") from None
        except Exception:  # unreadable: the next file may tell
            continue


def fashion_mnist(root: str | None, split: str, channels: Channels = RGB) -> FashionMNIST:
    """Fashion-MNIST's ``train`` or ``test`` split; a missing file is a :class:`DataError`."""
    try:
        return FashionMNIST(root, split, channels)
    except FashionMNISTError as exc:
        raise DataError(str(exc)) from None

def first_pixel_type(source: Dataset) -> str | None:
    """The pixel type of the source's first readable file (:func:`fcmae.data.image_io.pixel_type`); the
    8-bit built-in sources say ``uint8``; None where it cannot tell (shards, an unreadable start)."""
    from .image_io import pixel_type
    while hasattr(source, "source") and not isinstance(source, ImageFiles):  # subsets wrap their source
        source = source.source
    if isinstance(source, ImageFiles):
        for path in source.paths[:5]:
            try:
                return pixel_type(path, source.channels)
            except Exception:  # unreadable: the next may tell
                continue
        return None
    if isinstance(source, (SyntheticImages, FashionMNIST)):
        return "uint8"
    return None


def describe_sample(source: Dataset, index: int) -> str:
    """The file path of a sample when the source knows it, for error messages."""
    describe = getattr(source, "describe", None)
    return describe(index) if describe else f"sample #{index}"


def labelled_source(source: str, root: str | None, split: str, num_images: int, classes: int, img_size: int,
                    seed: int, per_class: int | None = None, subset_seed: int = 0,
                    class_names: Sequence[str] | None = None, channels: Channels = RGB) -> Dataset:
    """A labelled set: ``imagefolder`` at ``root``; Fashion-MNIST (``train`` -> its train split,
    ``val`` -> its test split; ``root`` null = the Debian path); or synthetic images (``split``
    picks a disjoint seed, so train and val images differ but share the class structure).
    ``per_class`` keeps that many images of each class, a fixed draw for ``subset_seed``.
    ``class_names``: the training set's classes (:func:`class_names_of`), so an image folder's
    labels are matched by name, not by position."""
    if source == "fashion_mnist":
        full = fashion_mnist(root, {"train": "train", "val": "test"}[split], channels)
    elif source == "synthetic":
        offset = {"train": 1, "val": 2}[split]
        full = SyntheticImages(num_images, classes, synthetic_size(img_size), seed + 7919 * offset, channels)
    elif source == "imagefolder":
        if not root:
            raise DataError(f"the {split} set needs a folder: set its root (root/<class>/<image>)")
        full = scan_image_folder(root, class_names, channels)
    elif source == "filelist":
        if not root:
            raise DataError(f"the {split} set needs a list file: set its root (one 'path class_name' per line)")
        full = read_labelled_list(root, class_names, channels)
    elif source == "shards":
        if not root:
            raise DataError(f"the {split} set needs a shard set: set its root (a folder packed by fcmae-shards pack)")
        full = ShardImages(root, class_names, channels)
        if full.classes is None:
            raise DataError(f"{root} was packed without labels (from a folder or a plain file list); pack an "
                            "ImageFolder or a labelled file list for fine-tuning and evaluation")
    else:
        raise DataError(f"labelled source {source!r}; use synthetic, imagefolder, filelist, shards or fashion_mnist")
    return PerClassSubset(full, per_class, subset_seed) if per_class else full


def labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, SyntheticImages):
        return np.arange(len(dataset)) % dataset.classes
    return np.asarray(dataset.labels)


def class_names_of(dataset: Dataset) -> list[str] | None:
    """The class names a labelled set's labels index, where it has them (image folders)."""
    if isinstance(dataset, PerClassSubset):
        return class_names_of(dataset.source)
    names = getattr(dataset, "classes", None)
    return list(names) if isinstance(names, (list, tuple)) else None


def num_classes_of(dataset: Dataset) -> int:
    if isinstance(dataset, PerClassSubset):
        return num_classes_of(dataset.source)
    if isinstance(dataset, SyntheticImages):
        return dataset.classes
    names = class_names_of(dataset)
    return len(names) if names else int(max(dataset.labels)) + 1


class PerClassSubset(Dataset):
    """``per_class`` images of every class of ``source``: a fixed draw for ``seed`` (low-label
    fine-tuning, evaluation on a labelled budget). Same items as the source."""

    def __init__(self, source: Dataset, per_class: int, seed: int):
        labels = labels_of(source)
        rng = np.random.default_rng(seed)
        picked = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if per_class > idx.size:
                raise DataError(f"{per_class} labelled images per class asked for, but class {c} has {idx.size}")
            picked.append(rng.permutation(idx)[:per_class])
        self.source, self.indices = source, np.sort(np.concatenate(picked))
        self.labels = labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return describe_sample(self.source, int(self.indices[index]))

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

