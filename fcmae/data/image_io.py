"""Reading one image faithfully, and the error every data problem raises. The lowest data layer:
the sources (:mod:`fcmae.data.sources`, :mod:`fcmae.data.shards`) build on it."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


class DataError(RuntimeError):
    """The data cannot be used as configured; the message says what to change."""


def class_index(found, classes, where) -> tuple[list[str], dict[str, int]]:
    """``(classes, name -> label)`` for a labelled set whose class names are ``found``: the labels
    index ``classes`` (a training set's, so another set is matched by name) or, without it, the
    sorted names found. A class not among ``classes`` is an error naming it and ``where``."""
    found = sorted(set(found))
    classes = found if classes is None else list(classes)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{where} has classes the training set does not: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''} (training classes: {classes[:10]}"
                        f"{' ...' if len(classes) > 10 else ''}); remove them or train with them")
    return classes, {name: i for i, name in enumerate(classes)}


def open_image(path) -> Image.Image:
    """An image file as 8-bit RGB, read faithfully: EXIF orientation applied (a phone photo is
    upright), high-bit-depth pixels scaled to 8 bits (see :func:`to_rgb8`), alpha dropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return to_rgb8(img)


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode. Pillow's own ``convert("RGB")`` clips 16- and 32-bit
    pixels at 255 (a 16-bit PNG comes out white); here 16-bit modes are scaled by their bit
    depth (65535 -> 255), 32-bit integer images by their bit depth when they fit 8 or 16 bits and
    by their range otherwise, and float images from [0, 1] when they lie there, else by range."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            scale_lo, scale_hi = 0.0, 65535.0
        elif mode == "I" and a.min() >= 0 and a.max() <= 255:
            scale_lo, scale_hi = 0.0, 255.0
        elif mode == "I" and a.min() >= 0 and a.max() <= 65535:
            scale_lo, scale_hi = 0.0, 65535.0
        elif mode == "F" and a.min() >= 0 and a.max() <= 1:
            scale_lo, scale_hi = 0.0, 1.0
        else:
            scale_lo, scale_hi = float(a.min()), float(max(a.max(), a.min() + 1e-12))
        a = np.clip((a - scale_lo) / (scale_hi - scale_lo), 0, 1)
        grey = Image.fromarray(np.round(a * 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
