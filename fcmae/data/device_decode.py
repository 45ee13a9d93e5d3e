"""Batched decode on the training device (``data.decode=gpu``): the loader workers only read each
JPEG's bytes and draw its crop and flip; the device decodes the batch (nvjpeg, through
torchvision) and crops, resizes, flips and normalises it.

Why: a CPU worker decodes and augments ~125 ImageNet-sized JPEGs/s, so a 16-core host cannot feed
one compiled GPU (issue #18). What stays as on the CPU path (:mod:`fcmae.data.samples`):

- the geometry: :func:`fcmae.data.transforms.crop_geometry` under the same per-sample seed, so a sample's
  crop, flip and mask depend on (seed, epoch, index) only; exact resume holds and the two paths are
  interchangeable (pixels differ by the resize implementations, not by what is cropped);
- what the GPU decoder cannot take (PNG, greyscale or CMYK JPEG, an EXIF rotation, an unreadable
  header) is decoded by the worker, per sample, through the CPU path;
- a JPEG the device cannot decode is read again through the CPU path in the main process, which
  skips it, names it and counts it in ``bad_images`` exactly as a worker would have.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .image_io import DataError
from .samples import PretrainSamples, collate_masked, sample_seed, seeded_rngs
from .transforms import crop_geometry

log = logging.getLogger("fcmae")

FILE_SOURCES = ("imagefolder", "folder", "filelist", "shards")  # the sources that read image files
EXIF_ORIENTATION = 0x0112


def resolve_decode(choice: str, source: str, device: torch.device) -> str:
    """``cpu`` or ``gpu`` for ``data.decode``: ``auto`` is ``gpu`` when training on CUDA from
    image files, else ``cpu``. ``gpu`` on a CPU device still works (the main process decodes; it
    exists for tests) but does not scale with the cores as ``cpu``'s workers do, and says so."""
    if choice == "auto":
        return "gpu" if device.type == "cuda" and source in FILE_SOURCES else "cpu"
    if choice == "gpu" and source not in FILE_SOURCES:
        raise DataError(f"data.decode=gpu decodes image files, and data.source={source} has none; "
                        f"use data.decode=cpu (or auto), or a source among {', '.join(FILE_SOURCES)}")
    if choice == "gpu" and device.type != "cuda":
        log.warning("data.decode=gpu on %s: the main process decodes every batch, one core's worth; it is "
                    "meant for CUDA (on the CPU, data.decode=cpu with loader workers scales with the cores)", device)
    return choice


def device_decode_error(device: torch.device, decoder: str = "auto") -> str | None:
    """Why the device cannot decode JPEGs (a tiny one is tried), or None when it can: a build without
    nvJPEG should cost a warning at start-up, not a run that decodes everything the slow way."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, "JPEG")
    try:
        decode, _ = jpeg_decoder(decoder)
        img = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)[0]
        if tuple(img.shape) != (3, 16, 16):
            return f"a 16x16 test JPEG decoded to shape {tuple(img.shape)}"
    except Exception as exc:  # any failure here means: do not use this path
        return f"{type(exc).__name__}: {exc}"
    return None


def read_jpeg(path_or_read) -> tuple[torch.Tensor, int, int] | None:
    """``(file bytes, height, width)`` of a JPEG the device decoder takes as it is (8-bit RGB/YCbCr,
    no EXIF rotation), reading its header only; ``None`` for anything else, which the CPU path
    then decodes (or skips and counts, if it cannot be read at all). Takes a path, or a function
    that returns the bytes (a shard member)."""
    try:
        data = path_or_read() if callable(path_or_read) else Path(path_or_read).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB" or img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
            width, height = img.size
    except Exception:  # unreadable: the CPU path will say which file and why
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width


@dataclass
class EncodedImages:
    """A batch's images before the device decodes them.

    ``data``: the file bytes of the samples at ``jpeg_index`` end to end in one uint8 tensor, sample
    ``j`` at ``data[offsets[j]:offsets[j + 1]]``, with ``geometry`` ``[m, 5]`` (top, left, h, w, flip)
    each; ``pixels`` ``[k, 3, S, S]``: the samples at ``pixel_index``, already decoded and normalised
    by a worker (the per-sample fallback). One tensor for all the bytes: a worker passes each tensor
    to the main process through its own file descriptor, and one per image ran a worker out of them
    (``Too many open files`` at batch ~250 under the common limit of 1024)."""
    data: torch.Tensor
    offsets: torch.Tensor
    jpeg_index: torch.Tensor
    geometry: torch.Tensor
    pixels: torch.Tensor
    pixel_index: torch.Tensor

    @property
    def jpegs(self) -> list:
        """Each JPEG's bytes: views of ``data``, split in the process that decodes."""
        bounds = self.offsets.tolist()
        return [self.data[a:b] for a, b in zip(bounds, bounds[1:])]

    def __len__(self) -> int:
        return len(self.jpeg_index) + len(self.pixel_index)

    def pin_memory(self) -> "EncodedImages":
        # The DataLoader's pin-memory thread calls this: what goes to the device is copied without
        # blocking from pinned memory (the bytes stay pageable: the decoder reads them on the host).
        return EncodedImages(self.data, self.offsets, self.jpeg_index.pin_memory(), self.geometry.pin_memory(),
                             self.pixels.pin_memory(), self.pixel_index.pin_memory())


class EncodedPretrainSamples(PretrainSamples):
    """``key -> (jpeg bytes | None, geometry | pixels, mask, bad, key)`` for a worker that does not
    decode: JPEGs stay bytes with their crop and flip drawn; anything else goes through the CPU path
    (:meth:`PretrainSamples.read`) here. Same seeds and masks as :class:`PretrainSamples`."""

    def __init__(self, source, transform, img_size: int, mask_ratio: float, crop_scale, hflip: bool, seed: int = 0,
                 patch_size: int = 32):
        super().__init__(source, transform, img_size, mask_ratio, seed, patch_size)
        self.crop_scale, self.hflip = tuple(crop_scale), hflip

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.source))
        s = sample_seed(self.seed, epoch, index)
        read = getattr(self.source, "read_bytes", None)
        jpeg = read_jpeg((lambda: read(index)) if read else self.source.paths[index])
        if jpeg is None:
            x, _, bad, _ = self.read(key)
            return None, x, self.mask_for(s), bad, int(key)
        data, height, width = jpeg
        with seeded_rngs(s):
            geometry = torch.tensor(crop_geometry(height, width, self.crop_scale, self.hflip), dtype=torch.int64)
        return data, geometry, self.mask_for(s), 0, int(key)


def collate_encoded(samples: list) -> tuple:
    """A :class:`~fcmae.data.samples.MaskedBatch` whose ``images`` are :class:`EncodedImages`, not yet decoded."""
    jpeg_index = [i for i, sample in enumerate(samples) if sample[0] is not None]
    pixel_index = [i for i, sample in enumerate(samples) if sample[0] is None]
    pixels = (torch.stack([samples[i][1] for i in pixel_index]) if pixel_index
              else torch.empty(0, dtype=torch.float32))
    geometry = (torch.stack([samples[i][1] for i in jpeg_index]) if jpeg_index
                else torch.empty(0, 5, dtype=torch.int64))
    parts = [samples[i][0] for i in jpeg_index]
    data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    offsets = torch.tensor([0, *[len(p) for p in parts]], dtype=torch.int64).cumsum(0)
    images = EncodedImages(data, offsets, torch.tensor(jpeg_index, dtype=torch.int64), geometry, pixels,
                           torch.tensor(pixel_index, dtype=torch.int64))
    # masks, bad and keys as the CPU path collates them (one placeholder image per sample)
    placeholder = collate_masked([(torch.zeros(()), *sample[2:]) for sample in samples])
    return placeholder._replace(images=images)


def jpeg_decoder(name: str = "auto"):
    """``(decode(bytes tensor | list of them, device) -> [3, H, W] uint8 | list, name)``: TorchCodec's
    decoder (``pip install 'fcmae[gpu]'``; nvJPEG on CUDA, batched) when installed, else
    torchvision's, the same nvJPEG path, deprecated since torchvision 0.29 in favour of TorchCodec.
    Both take a list in one call and raise ``RuntimeError`` on a JPEG they cannot decode."""
    if name in ("auto", "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg as codec_decode
            return (lambda data, device: codec_decode(data, mode="RGB", device=device)), "torchcodec"
        except ImportError:
            if name == "torchcodec":
                raise
    from torchvision.io import ImageReadMode, decode_jpeg as tv_decode

    def decode(data, device):
        with warnings.catch_warnings():  # the deprecation is ours to handle (above), not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            return tv_decode(data, mode=ImageReadMode.RGB, device=device)
    return decode, "torchvision"
