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

import contextlib
import io
import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..distributed import host_to_device
from .image_io import DataError
from .samples import PretrainSamples, collate_masked, sample_seed, seeded_rngs
from .transforms import crop_geometry

log = logging.getLogger("fcmae")

FILE_SOURCES = ("imagefolder", "folder", "filelist", "shards")  # the sources that read image files
MAX_DEVICE_SHRINK = 32  # crops shrinking more than this (per side) are resized by the CPU path
EXIF_ORIENTATION = 0x0112
RESIZE_BUDGET_BYTES = 1 << 30  # the padded float images of one batched resize; a batch over it is split
DECODE_AHEAD = 2  # batches the decode thread may have ready before the loop takes them
JOIN_TIMEOUT_S = 10.0  # how long the loop waits for the decode thread to stop at the end of an epoch


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

    def __init__(self, source, transform, img_size: int, mask_ratio: float, crop_scale, hflip: bool, seed: int = 0):
        super().__init__(source, transform, img_size, mask_ratio, seed)
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


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic kernel PIL and torch's antialiased resize use (a = -0.5), support 2."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``[m, out_size, in_size]``: row ``i`` of sample ``b`` holds the taps of output pixel ``i`` of an
    antialiased bicubic resize of the crop ``[start[b], start[b] + length[b])`` to ``out_size`` (PIL's
    and ``F.interpolate(..., antialias=True)``'s convention: the kernel widened by the shrink factor,
    the window rounded as theirs, each row normalised), zero outside the crop. A batch of crops of
    different sizes is then two batched matmuls, whatever the batch size."""
    f64 = dict(dtype=torch.float64, device=start.device)
    start, length = start.to(torch.float64)[:, None, None], length.to(torch.float64)[:, None, None]
    scale = length / out_size
    support = 2.0 * scale.clamp(min=1.0)
    center = scale * (torch.arange(out_size, **f64)[None, :, None] + 0.5)
    x = torch.arange(in_size, **f64)[None, None, :] - start  # input positions in crop coordinates
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    w = _cubic((x - center + 0.5) / scale.clamp(min=1.0)) * ((x >= lo) & (x < hi))
    return (w / w.sum(-1, keepdim=True)).float()


def resize_groups(shapes: list[tuple[int, int]], budget: int = RESIZE_BUDGET_BYTES) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: consecutive runs of images whose padded float copy (``n x 3 x max H x max W``)
    fits ``budget``; one run for a usual batch, more only when very large images would not fit."""
    groups, a, max_h, max_w = [], 0, 0, 0
    for i, (h, w) in enumerate(shapes):
        nh, nw = max(max_h, h), max(max_w, w)
        if i > a and (i - a + 1) * 3 * nh * nw * 4 > budget:
            groups.append((a, i))
            a, nh, nw = i, h, w
        max_h, max_w = nh, nw
    if shapes:
        groups.append((a, len(shapes)))
    return groups


class DeviceDecoder:
    """``EncodedImages -> ([B, 3, S, S] normalised float images on device, extra bad count)``."""

    def __init__(self, dataset: PretrainSamples, img_size: int, mean, std, device: torch.device,
                 decoder: str = "auto", resize: str = "auto"):
        self.dataset, self.size, self.device = dataset, img_size, device
        # batched (two dense matmuls per group of images): a fixed number of launches per batch, what a
        # GPU needs; per-image (F.interpolate on each crop, which computes only the taps in reach): what a
        # CPU does faster (the dense matmul costs ~15 GFLOP per batch of 32 ImageNet-sized images there)
        self.batched = resize == "batched" or (resize == "auto" and device.type == "cuda")
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.decode, self.decoder_name = jpeg_decoder(decoder)
        self._fallback = None  # torchvision's decoder, for an image TorchCodec refuses

    def decode_all(self, jpegs: list) -> list:
        """Decoded ``[3, H, W]`` uint8 images on the device; ``None`` where one cannot be decoded.
        One batched call; if it fails, the batch is halved until the culprits are alone (a bad JPEG
        costs about log2(B) more batched calls, not B single ones)."""
        if not jpegs:
            return []
        try:
            return list(self.decode(jpegs, self.device))
        except RuntimeError:
            if len(jpegs) == 1:
                return [self._decode_alone(jpegs[0])]
            half = len(jpegs) // 2
            return self.decode_all(jpegs[:half]) + self.decode_all(jpegs[half:])

    def _decode_alone(self, data):
        """One image the batched decoder refused: torchvision's decoder next (when TorchCodec was the
        first), else ``None`` (the CPU path then reads it, or skips, names and counts it)."""
        if self.decoder_name != "torchcodec":
            return None
        if self._fallback is None:
            self._fallback = jpeg_decoder("torchvision")[0]
        try:
            return self._fallback(data, self.device)
        except RuntimeError:
            return None

    def augment(self, imgs: list, geometry: torch.Tensor) -> torch.Tensor:
        """``[m, 3, S, S]`` normalised: each decoded ``[3, H, W]`` uint8 image cropped and resized as the CPU
        path does (bicubic, antialiased), rounded to 8-bit levels as a PIL image would be, flipped where
        drawn, normalised. ``geometry`` ``[m, 5]`` (top, left, h, w, flip) on the device. A fixed number
        of batched ops per group of images (:func:`resize_groups`), not a few per image: the images are
        padded into one tensor and the crops are folded into the resize weights. (On a CPU device, unless
        ``resize="batched"``, one resize per image: see ``__init__``.)"""
        if not self.batched:
            out = torch.stack([self._crop_resize(img, *g) for img, g in zip(imgs, geometry.tolist())])
            return (out - self.mean) / self.std
        outs = []
        for a, b in resize_groups([tuple(img.shape[-2:]) for img in imgs]):
            with warnings.catch_warnings():  # "prototype stage": used for one padding copy, nothing else
                warnings.simplefilter("ignore", UserWarning)
                nested = torch.nested.as_nested_tensor(imgs[a:b], dtype=torch.float32)
            padded = nested.to_padded_tensor(0.0)
            g = geometry[a:b]
            wy = resize_weights(g[:, 0], g[:, 2], padded.shape[-2], self.size)
            wx = resize_weights(g[:, 1], g[:, 3], padded.shape[-1], self.size)
            wx = torch.where(g[:, 4].bool()[:, None, None], wx.flip(1), wx)  # a flip reverses the output columns
            out = wy.unsqueeze(1) @ padded @ wx.transpose(1, 2).unsqueeze(1)
            outs.append(out.round_().clamp_(0, 255))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return (out - self.mean) / self.std

    def _crop_resize(self, img: torch.Tensor, top: int, left: int, h: int, w: int, flip: int) -> torch.Tensor:
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)[0]
        return out.flip(-1) if flip else out

    def __call__(self, enc: EncodedImages, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = torch.empty(len(enc), 3, self.size, self.size, device=self.device)
        if len(enc.pixel_index):
            out[host_to_device(enc.pixel_index, self.device)] = host_to_device(enc.pixels, self.device)
        geometry = enc.geometry.tolist()  # host tensors: no device sync
        # A crop that shrinks by more than MAX_DEVICE_SHRINK goes through the CPU path: CUDA's antialiased
        # bicubic resize needs shared memory in proportion to the shrink and fails past ~47x (a 12 MP
        # photo at img_size=64); PIL has no such limit, and this keeps the result identical to it.
        on_device = [j for j, (_, _, h, w, _) in enumerate(geometry) if max(h, w) <= MAX_DEVICE_SHRINK * self.size]
        decoded = dict(zip(on_device, self.decode_all([enc.jpegs[j] for j in on_device]) if on_device else []))
        ok = [j for j in range(len(geometry)) if decoded.get(j) is not None]
        extra_bad = 0
        for j in sorted(set(range(len(geometry))) - set(ok)):  # too large a shrink, or undecodable on the
            row = int(enc.jpeg_index[j])  # device: the CPU path reads it (or skips, names and counts it)
            x, _, bad, _ = self.dataset.read(int(keys[row]))
            out[row] = x.to(self.device)
            extra_bad += bad
        if ok:
            idx = torch.tensor(ok)
            rows = host_to_device(enc.jpeg_index[idx], self.device)
            out[rows] = self.augment([decoded[j] for j in ok], host_to_device(enc.geometry[idx], self.device))
        return out, extra_bad


class _Failure:
    """An exception of the decode thread, carried to the loop's thread and raised there."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class DeviceBatches:
    """A loader of encoded batches seen as a loader of :class:`~fcmae.data.samples.MaskedBatch` (images on the device).

    The batches are decoded and augmented in a background thread, up to :data:`DECODE_AHEAD` ahead of
    the loop, so the host work of decoding overlaps the training step instead of adding to it. On
    CUDA the thread works on its own stream and hands each batch over with an event that the training
    stream waits on: the host never waits for a decode to finish. An error in the thread (a
    :class:`DataError`, a worker that died) is raised in the loop's thread, as it would have been."""

    def __init__(self, loader, decoder: DeviceDecoder, ahead: int = DECODE_AHEAD):
        self.loader, self.decoder, self.ahead = loader, decoder, ahead
        self.decode_seconds = 0.0  # host CPU time the decode thread spent decoding (benchmarks read it)
        self.batches_decoded = 0

    def __len__(self) -> int:
        return len(self.loader)

    def _decode(self, batch):
        imgs, extra_bad = self.decoder(batch.images, batch.keys)
        bad = batch.bad
        if extra_bad:
            bad = bad.clone()
            bad[0] += extra_bad  # the engine sums a batch's bad counts
        return batch._replace(images=imgs, bad=bad)

    @staticmethod
    def _put(handoff: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it, handoff: queue.Queue, stop: threading.Event) -> None:
        device = self.decoder.device
        stream = None
        try:  # everything, the stream's setup too: any failure reaches the loop with its cause
            if device.type == "cuda":
                if device.index is not None:  # a bare "cuda" is the current device already
                    torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
            for batch in it:
                if stop.is_set():
                    return
                start = time.thread_time()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    decoded = self._decode(batch)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                self.decode_seconds += time.thread_time() - start
                self.batches_decoded += 1
                if not self._put(handoff, (decoded, event), stop):
                    return
            self._put(handoff, _END, stop)
        except BaseException as exc:  # carried to the loop's thread
            self._put(handoff, _Failure(exc), stop)

    @staticmethod
    def _take(handoff: queue.Queue, thread: threading.Thread):
        while True:
            try:
                return handoff.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and handoff.empty():
                    raise RuntimeError("the device-decode thread stopped without handing over a batch or an error")

    def __iter__(self):
        device = self.decoder.device
        it = iter(self.loader)  # in this thread: the sampler's epoch and start are set here
        handoff: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(it, handoff, stop), name="fcmae-device-decode",
                                  daemon=True)
        thread.start()
        try:
            while True:
                item = self._take(handoff, thread)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)  # the training stream waits; the host does not
                    batch.images.record_stream(current)
                yield batch
        finally:
            stop.set()
            thread.join(timeout=JOIN_TIMEOUT_S)
            if thread.is_alive():  # blocked in the loader (a read that does not return): a daemon, left behind
                log.warning("the device-decode thread did not stop within %.0f s (blocked reading a batch?); "
                            "leaving it behind", JOIN_TIMEOUT_S)
