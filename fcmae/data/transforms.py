"""Augmentation: the random resized crop's geometry (shared with the device-decode path), the
CPU pretraining, fine-tuning (timm's ``create_transform``) and evaluation transforms."""
from __future__ import annotations

import logging

import torch
from PIL import Image, ImageOps
from torchvision import transforms

from ..models.masking import image_shape

log = logging.getLogger("fcmae.data")

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range


def crop_geometry(height: int, width: int, scale, hflip: bool) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)`` of one sample's random resized crop and flip, drawn from the
    global torch RNG exactly as ``RandomResizedCrop`` + ``RandomHorizontalFlip`` draw them (the
    caller seeds it per sample). The CPU pipeline and the GPU-decode pipeline both take their
    geometry from here, so a sample's crop depends on (seed, epoch, index) only, not the path."""
    shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the size, nothing else
    top, left, h, w = transforms.RandomResizedCrop.get_params(shape_only, list(scale), list(CROP_RATIO))
    flip = bool(torch.rand(1) < 0.5) if hflip else False
    return top, left, h, w, flip


def image_size(img) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or a ``[C, H, W]`` tensor."""
    return (img.height, img.width) if isinstance(img, Image.Image) else tuple(img.shape[-2:])


class RandomCropFlip:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip on a PIL image or a ``[C, H, W]``
    tensor (greyscale, 16-bit, multi-band data), geometry from :func:`crop_geometry`: the same crop and
    flip for a sample whatever its bands, and the same pixels as torchvision's two transforms in a row."""

    def __init__(self, img_size, scale, hflip: bool):
        self.img_size, self.scale, self.hflip = list(image_shape(img_size)), tuple(scale), hflip  # [H, W]

    def __call__(self, img):
        top, left, h, w, flip = crop_geometry(*image_size(img), self.scale, self.hflip)
        img = transforms.functional.resized_crop(img, top, left, h, w, self.img_size,
                                                 transforms.InterpolationMode.BICUBIC, antialias=True)
        return transforms.functional.hflip(img) if flip else img


class AsTensor:
    """``ToTensor`` for PIL images; a tensor (already float, in its own units) passes as it is."""

    def __call__(self, img) -> torch.Tensor:
        return transforms.functional.to_tensor(img) if isinstance(img, Image.Image) else img


def pretrain_transform(img_size: int, crop_scale=(0.2, 1.0), hflip: bool = True,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """RandomResizedCrop (bicubic) + horizontal flip + normalisation (one mean/std per band), as the paper."""
    return transforms.Compose([RandomCropFlip(img_size, crop_scale, hflip), AsTensor(),
                               transforms.Normalize(list(mean), list(std))])


def finetune_transform(data_cfg):
    """The official fine-tuning transform, built by timm's ``create_transform``: random resized
    crop, flip, RandAugment (``data.auto_augment``), colour jitter (``data.color_jitter``,
    ignored under RandAugment), normalisation, random erasing (``data.re_prob/re_mode/re_count``).
    Data that is not 8-bit RGB (``data.channels`` grey or all) gets the same crop and flip on its
    tensors, normalisation and random erasing; RandAugment and colour jitter, whose colour ops mean
    nothing for such bands, are left out (said once, at start)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    d = data_cfg
    if getattr(d, "channels", "rgb") != "rgb" or getattr(d, "bands", None) is not None:
        return band_finetune_transform(d)
    # data.mean/std null (not yet resolved from model.init_from, as the app does first): ImageNet's, their meaning
    # without an init
    mean = tuple(d.mean) if d.mean is not None else IMAGENET_DEFAULT_MEAN
    std = tuple(d.std) if d.std is not None else IMAGENET_DEFAULT_STD
    h, w = image_shape(d.img_size)
    transform = create_transform(h if h == w else (h, w), is_training=True, scale=tuple(d.crop_scale),
                                 hflip=0.5 if d.hflip else 0.0, color_jitter=d.color_jitter,
                                 auto_augment=d.auto_augment, interpolation=d.interpolation, re_prob=d.re_prob,
                                 re_mode=d.re_mode, re_count=d.re_count, mean=mean, std=std)
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):  # RandAugment / AutoAugment ops
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
    return transform


def band_finetune_transform(d):
    from timm.data.random_erasing import RandomErasing
    if d.auto_augment or d.color_jitter:
        log.warning("data.channels=%s: RandAugment / colour jitter are for RGB images and are left out; the "
                    "crop, flip, normalisation and random erasing apply to every band", d.channels)
    steps = [RandomCropFlip(d.img_size, d.crop_scale, d.hflip), AsTensor(), transforms.Normalize(list(d.mean), list(d.std))]
    if d.re_prob > 0:
        steps.append(RandomErasing(d.re_prob, mode=d.re_mode, max_count=d.re_count, device="cpu"))
    return transforms.Compose(steps)


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the Pillow < 11 meaning of 0 bits kept: a black image. At the
    official magnitude (m9, std 0.5, clipped at 10) ``PosterizeIncreasing`` asks for 0 bits now
    and then, which Pillow >= 11 rejects ("bits must be between ... 1 and 8"), killing the run."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(img_size, crop_pct: float = 0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The official evaluation transform: below 384 px, resize the short side to
    ``int(img_size / crop_pct)`` and centre crop; at 384 px and above, resize to
    ``img_size x img_size`` (no crop). Bicubic, then normalise. ``[H, W]`` (not square): resize to
    ``(H, W) / crop_pct`` and centre crop ``(H, W)``, as timm does for a rectangle."""
    bicubic = transforms.InterpolationMode.BICUBIC
    h, w = image_shape(img_size)
    if min(h, w) >= 384:
        resize = [transforms.Resize((h, w), interpolation=bicubic)]
    elif h == w:
        resize = [transforms.Resize(int(h / crop_pct), interpolation=bicubic), transforms.CenterCrop(h)]
    else:
        resize = [transforms.Resize((int(h / crop_pct), int(w / crop_pct)), interpolation=bicubic),
                  transforms.CenterCrop((h, w))]
    return transforms.Compose([*resize, AsTensor(), transforms.Normalize(list(mean), list(std))])


def check_finetune_transform(d, errors: list[str]) -> None:
    """timm's transform factory judges the augmentation keys (e.g. a bad RandAugment string): one line
    in ``errors`` when the training transform cannot be built from ``data.*``."""
    try:
        finetune_transform(d)
    except Exception as exc:
        errors.append(f"the training transform cannot be built from data.* ({type(exc).__name__}: {exc}); "
                      "check data.auto_augment (e.g. rand-m9-mstd0.5-inc1, or null), data.re_mode, "
                      "data.interpolation")
