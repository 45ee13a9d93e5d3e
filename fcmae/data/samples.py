"""Samples keyed by ``(epoch, index)``: every random choice for a sample (crop, flip, mask) is a
pure function of ``(seed, epoch, index)``, so the worker count does not change a run and a resumed
run sees exactly the samples and masks an uninterrupted one would. Also the collation of
pretraining batches and the un-augmented evaluation samples."""
from __future__ import annotations

from typing import NamedTuple

import contextlib
import logging
import random

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..models.masking import PATCH_SIZE, image_shape, num_visible, random_mask
from .image_io import DataError
from .sources import describe_sample

log = logging.getLogger("fcmae.data")

MAX_CONSECUTIVE_BAD = 20


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """torch, Python and numpy RNGs seeded with ``seed`` for one sample's transform (timm's
    RandAugment and random erasing draw from all three), then restored: the global streams
    that drop path and mixup use are untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from ``(seed, epoch, index)`` (SplitMix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)

class KeyedSamples(Dataset):
    """Wraps a source: ``key = epoch * len(source) + index`` -> one augmented sample.

    The transform runs under a seed that is a function of ``(seed, epoch, index)``.
    An unreadable file is logged by name and the next index stands in for it,
    so batches keep their size; ``bad`` counts the files skipped for a sample.
    """

    patch_size = PATCH_SIZE  # the image sides must be multiples of it

    def __init__(self, source: Dataset, transform, seed: int = 0):
        self.source, self.transform, self.seed = source, transform, seed
        self._pixel_type: str | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def pixel_type(self) -> str | None:
        """The source's pixel type (read once; checkpoints record it for exports)."""
        if self._pixel_type is None:
            from .sources import first_pixel_type
            self._pixel_type = first_pixel_type(self.source) or ""
        return self._pixel_type or None

    def _describe(self, index: int) -> str:
        return describe_sample(self.source, index)

    def describe_key(self, key: int) -> str:
        """The file behind sample ``key`` (an epoch's key), in words."""
        return self._describe(int(key) % len(self.source))

    def read(self, key: int):
        """``(image tensor, label, bad, per-sample seed)`` for ``key``."""
        epoch, index = divmod(int(key), len(self.source))
        s = sample_seed(self.seed, epoch, index)
        bad, failures = 0, []
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self.source)
            try:
                img, label = self.source[i]
                break
            except Exception as exc:  # a corrupt or unreadable file: skip it, name it
                bad += 1
                failures.append(self._describe(i))
                log.warning("skipping unreadable image %s (%s: %s)", self._describe(i), type(exc).__name__, exc)
        else:
            raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive images could not be read, e.g. {failures[:3]}")
        with seeded_rngs(s):
            x = self.transform(img)
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise DataError(
                f"{self._describe(i)} became {tuple(x.shape[-2:])} after transforms; height and width must be "
                f"multiples of {self.patch_size} (set data.img_size to a multiple of {self.patch_size})"
            )
        return x, label, bad, s


class PretrainSamples(KeyedSamples):
    """``key -> (image, mask, bad, key)``; the mask is also a function of the sample's seed."""

    def __init__(self, source: Dataset, transform, img_size: int, mask_ratio: float, seed: int = 0,
                 patch_size: int = PATCH_SIZE):
        super().__init__(source, transform, seed)
        self.img_size, self.patch_size = img_size, patch_size
        h, w = image_shape(img_size)
        self.num_patches = (h // patch_size) * (w // patch_size)
        self.keep = num_visible(self.num_patches, mask_ratio)

    def mask_for(self, sample_seed: int) -> torch.Tensor:
        """The sample's mask ``[num_patches]`` (1 = masked), a function of its seed alone."""
        g = torch.Generator().manual_seed(sample_seed ^ 0x5DEECE66D)
        return random_mask(1, self.num_patches, keep=self.keep, generator=g)[0]

    def __getitem__(self, key: int):
        x, _, bad, s = self.read(key)
        return x, self.mask_for(s), bad, int(key)


class LabelledSamples(KeyedSamples):
    """``key -> (image, label, bad, key)`` for supervised fine-tuning."""

    def __getitem__(self, key: int):
        x, label, bad, _ = self.read(key)
        return x, int(label), bad, int(key)

class MaskedBatch(NamedTuple):
    """A pretraining batch (:func:`collate_masked`; the device decoder's before decoding holds the
    encoded images in ``images``)."""
    images: torch.Tensor  # (N, C, H, W)
    masks: torch.Tensor  # (N, L) over the 32-px patches, 1 = masked
    bad: torch.Tensor  # (N,) unreadable images replaced by a stand-in (the engine sums them)
    keys: torch.Tensor  # (N,) the samples' keys (what the resumable sampler indexes)
    visible_per_sample: int  # the masks' common count of visible patches, checked by the collation


class LabelledBatch(NamedTuple):
    """A fine-tuning batch (:func:`collate_labelled`)."""
    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # (N,) class indices
    bad: torch.Tensor  # (N,)
    keys: torch.Tensor  # (N,)


def collate_labelled(samples: list) -> LabelledBatch:
    """Fine-tuning batches from :class:`LabelledSamples`' ``(image, label, bad, key)``."""
    return LabelledBatch(*default_collate(samples))


def collate_masked(samples: list) -> MaskedBatch:
    """Pretraining batches (:class:`MaskedBatch`): the masks' common
    count of visible patches is counted here, on the CPU, once, and travels with the batch, so
    the model's static-size fast path gets a checked count rather than a promise."""
    imgs, masks, bad, keys = default_collate(samples)
    visible = (masks == 0).sum(dim=1)
    if not bool((visible == visible[0]).all()) or int(visible[0]) < 1:
        raise DataError(f"a pretraining batch's masks keep {sorted(set(visible.tolist()))} patches per sample; "
                        "every mask must keep the same number, at least 1")
    return MaskedBatch(imgs, masks, bad, keys, int(visible[0]))

class EvalImages(Dataset):
    """Un-augmented labelled images: ``index -> (image, label, ok)``; an unreadable file
    gives ``ok = False`` (logged by name) and is left out of the metrics."""

    def __init__(self, source: Dataset, transform, img_size: int, in_chans: int = 3):
        self.source, self.transform, self.img_size, self.in_chans = source, transform, img_size, in_chans

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            img, label = self.source[index]
            return self.transform(img), int(label), True
        except Exception as exc:
            log.warning("skipping unreadable image %s (%s: %s)", describe_sample(self.source, index),
                        type(exc).__name__, exc)
            return torch.zeros(self.in_chans, *image_shape(self.img_size)), -1, False

