"""The device decoder of ``data.decode=gpu``: a batch of encoded JPEGs decoded on the training device
(nvJPEG through TorchCodec), cropped and resized there (batched bicubic weights as two matmuls per group
of images on a GPU, per image on a CPU), flipped and normalised; what cannot go that way (a crop that
shrinks too far, a non-JPEG) takes the CPU path per image."""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from ..distributed import host_to_device
from ..models.masking import image_shape
from .samples import PretrainSamples

log = logging.getLogger("fcmae")
from .device_decode import EncodedImages, jpeg_decoder

log = logging.getLogger("fcmae")

MAX_DEVICE_SHRINK = 32  # crops shrinking more than this (per side) are resized by the CPU path
RESIZE_BUDGET_BYTES = 1 << 30  # the padded float images of one batched resize; a batch over it is split


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
        self.dataset, self.device = dataset, device
        self.hw = image_shape(img_size)  # (H, W) of the output
        self.size = max(self.hw)  # the shrink limit's reference
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
            wy = resize_weights(g[:, 0], g[:, 2], padded.shape[-2], self.hw[0])
            wx = resize_weights(g[:, 1], g[:, 3], padded.shape[-1], self.hw[1])
            wx = torch.where(g[:, 4].bool()[:, None, None], wx.flip(1), wx)  # a flip reverses the output columns
            out = wy.unsqueeze(1) @ padded @ wx.transpose(1, 2).unsqueeze(1)
            outs.append(out.round_().clamp_(0, 255))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return (out - self.mean) / self.std

    def _crop_resize(self, img: torch.Tensor, top: int, left: int, h: int, w: int, flip: int) -> torch.Tensor:
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        out = F.interpolate(crop, size=self.hw, mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)[0]
        return out.flip(-1) if flip else out

    def __call__(self, enc: EncodedImages, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = torch.empty(len(enc), 3, *self.hw, device=self.device)
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
