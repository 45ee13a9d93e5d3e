"""Augmentation: the random resized crop's geometry (shared with the device-decode path), the
CPU pretraining, fine-tuning (timm's ``create_transform``) and evaluation transforms."""
from __future__ import annotations

import torch
from PIL import Image, ImageOps
from torchvision import transforms

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


class RandomCropFlip:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip on a PIL image, geometry from
    :func:`crop_geometry`; the same pixels as torchvision's two transforms in a row."""

    def __init__(self, img_size: int, scale, hflip: bool):
        self.img_size, self.scale, self.hflip = img_size, tuple(scale), hflip

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w, flip = crop_geometry(img.height, img.width, self.scale, self.hflip)
        img = transforms.functional.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                                                 transforms.InterpolationMode.BICUBIC, antialias=True)
        return transforms.functional.hflip(img) if flip else img


def pretrain_transform(img_size: int, crop_scale=(0.2, 1.0), hflip: bool = True,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation, as the paper."""
    return transforms.Compose([RandomCropFlip(img_size, crop_scale, hflip), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def finetune_transform(data_cfg):
    """The official fine-tuning transform, built by timm's ``create_transform``: random resized
    crop, flip, RandAugment (``data.auto_augment``), colour jitter (``data.color_jitter``,
    ignored under RandAugment), normalisation, random erasing (``data.re_prob/re_mode/re_count``)."""
    from timm.data import create_transform
    d = data_cfg
    transform = create_transform(d.img_size, is_training=True, scale=tuple(d.crop_scale),
                                 hflip=0.5 if d.hflip else 0.0, color_jitter=d.color_jitter,
                                 auto_augment=d.auto_augment, interpolation=d.interpolation, re_prob=d.re_prob,
                                 re_mode=d.re_mode, re_count=d.re_count, mean=tuple(d.mean), std=tuple(d.std))
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):  # RandAugment / AutoAugment ops
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
    return transform


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the Pillow < 11 meaning of 0 bits kept: a black image. At the
    official magnitude (m9, std 0.5, clipped at 10) ``PosterizeIncreasing`` asks for 0 bits now
    and then, which Pillow >= 11 rejects ("bits must be between ... 1 and 8"), killing the run."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(img_size: int, crop_pct: float = 0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The official evaluation transform: below 384 px, resize the short side to
    ``int(img_size / crop_pct)`` and centre crop; at 384 px and above, resize to
    ``img_size x img_size`` (no crop). Bicubic, then normalise."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if img_size >= 384:
        resize = [transforms.Resize((img_size, img_size), interpolation=bicubic)]
    else:
        resize = [transforms.Resize(int(img_size / crop_pct), interpolation=bicubic), transforms.CenterCrop(img_size)]
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(mean, std)])

