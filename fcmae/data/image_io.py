"""Reading one image faithfully, and the error every data problem raises. The lowest data layer:
the sources (:mod:`fcmae.data.sources`, :mod:`fcmae.data.shards`) build on it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from ..errors import UserError


class DataError(UserError, RuntimeError):
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


# ---------------------------------------------------------------- channels: greyscale, 16-bit, multi-band

CHANNEL_MODES = ("rgb", "grey", "all")
NPY_LAYOUTS = ("hwc", "chw")
TIFF_SUFFIXES = (".tif", ".tiff")
# integers become floats in [0, 1] (by their type's largest value: an 8-bit and a 16-bit scan of the same
# scene land in the same range), floats are kept as they are
INT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.int16): 32767.0,
             np.dtype(np.int32): 2147483647.0, np.dtype(np.bool_): 1.0}
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


class BandCountError(DataError):
    """A file's bands do not fit the run's ``data.channels`` / ``data.bands`` / ``model.in_chans``;
    ``fix`` says which key to change (the start-of-run check prints it)."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def pixel_type(file, channels: "Channels") -> str:
    """The type of a file's pixels as the run reads them (``uint8``, ``uint16``, ``float32``, ...): with
    :data:`INT_SCALE` it says how raw pixels became the numbers ``data.mean/std`` apply to, which an
    export records (a Hugging Face processor rescales by it)."""
    suffix = Path(str(file)).suffix.lower()
    if suffix == ".npy":
        return str(np.load(file, mmap_mode="r", allow_pickle=False).dtype)
    if channels.plain_rgb:
        return "uint8"  # every file is reduced to 8-bit RGB
    if suffix in TIFF_SUFFIXES:
        return str(read_tiff(file).dtype)
    with Image.open(file) as img:
        return str(pil_bands(img).dtype)


def pil_bands(img: Image.Image) -> np.ndarray:
    """``[H, W, C]`` in the image's own dtype (uint8, uint16, int32, float32), EXIF orientation applied;
    palette and CMYK/YCbCr images as RGB(A)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.uint16)
    return a[..., None] if a.ndim == 2 else a


def read_npy(file, layout: str = "hwc") -> np.ndarray:
    """A NumPy ``.npy`` array (no pickles) as ``[H, W, C]``: ``(H, W)``, or ``(H, W, C)`` / ``(C, H, W)``
    as ``layout`` (``data.npy_layout``) declares."""
    a = np.load(file, allow_pickle=False)
    if a.ndim == 2:
        return a[..., None]
    if a.ndim != 3:
        raise DataError(f"an array of shape {a.shape}; images are (H, W), (H, W, C) or (C, H, W)")
    return a if layout == "hwc" else np.moveaxis(a, 0, -1)


def read_tiff(file) -> np.ndarray:
    """Every band of a TIFF (multi-page, multi-sample, GeoTIFF pixel data) as ``[H, W, C]``, through
    ``tifffile`` (``pip install 'fcmae[tiff]'``); the pages or samples become the bands, in order."""
    try:
        import tifffile
    except ImportError:
        raise DataError("reading every band of a TIFF needs tifffile: pip install 'fcmae[tiff]'") from None
    with tifffile.TiffFile(file) as tif:
        series = tif.series[0]
        a, axes = series.asarray(), series.axes
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"a TIFF with axes {axes!r}, no Y and X")
    a = np.moveaxis(a, [axes.index("Y"), axes.index("X")], [0, 1])
    return a.reshape(a.shape[0], a.shape[1], -1)


def float_bands(a: np.ndarray):
    """``[H, W, C]`` array -> ``[C, H, W]`` float32 tensor (integers scaled by :data:`INT_SCALE`)."""
    import torch
    if a.dtype in INT_SCALE:
        out = a.astype(np.float32) / INT_SCALE[a.dtype]
    elif a.dtype.kind == "f":
        out = a.astype(np.float32)
        bad = int(out.size - np.isfinite(out).sum())
        if bad:  # a bad image, not a blow-up: skipped and counted like an unreadable file
            raise DataError(f"{bad} of its {out.size} pixel values are NaN or Inf (float pixels must be finite); "
                            "fix or remove the file")
    else:
        raise DataError(f"pixels of type {a.dtype}; use uint8, uint16, int16 or float32")
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Channels:
    """How a file becomes the model's input (``data.channels``, ``data.bands``, ``model.in_chans``):

    - ``rgb``: 8-bit RGB, a PIL image, read exactly as ever (:func:`open_image`); a NumPy array with
      1 or 3 bands becomes a float tensor of 3;
    - ``grey``: one band (RGB by ITU-R 601-2 luma), a float tensor ``[1, H, W]``;
    - ``all``: every band the file has, in order (TIFF pages or samples, array channels), a float tensor.

    ``bands`` then keeps those bands, in that order (e.g. the 12 of 13 Sentinel-2 bands a run uses).
    A file that does not give ``expect`` bands (None: any count) raises :class:`DataError`: the sample is skipped,
    named and counted like an unreadable file.
    """
    mode: str = "rgb"
    bands: tuple | None = None
    expect: int | None = 3
    npy_layout: str = "hwc"

    @property
    def plain_rgb(self) -> bool:
        return self.mode == "rgb" and self.bands is None

    def read(self, file, name: str | None = None):
        """A file (a path, or a file object with ``name`` giving its suffix) -> PIL RGB image or tensor."""
        suffix = Path(name if name is not None else str(file)).suffix.lower()
        if suffix == ".npy":
            a = read_npy(file, self.npy_layout)
            try:
                return self.convert(a)
            except BandCountError as exc:
                if self.npy_layout == "hwc" and a.shape[0] < min(a.shape[1], a.shape[2]):  # looks like (C, H, W)
                    raise BandCountError(f"{exc} (an array of shape {a.shape})",
                                         f"if the arrays are (bands, height, width), set data.npy_layout=chw; "
                                         f"else {exc.fix}") from None
                raise
        if self.plain_rgb:
            return open_image(file)
        if suffix in TIFF_SUFFIXES:
            return self.convert(read_tiff(file))
        with Image.open(file) as img:
            return self.convert(pil_bands(img))

    def convert(self, item):
        """A PIL image (any mode) or an ``[H, W, C]`` array -> what the run takes (see the class)."""
        if isinstance(item, Image.Image):
            if self.plain_rgb:
                return to_rgb8(item)
            item = pil_bands(item)
        c = item.shape[2]
        if self.mode == "rgb":
            if c not in (1, 3, 4):
                raise BandCountError(f"{c} bands; data.channels=rgb takes 1, 3 or 4 (use data.channels=all)",
                                     f"set data.channels=all model.in_chans={c}")
            item = np.repeat(item, 3, axis=2) if c == 1 else item[..., :3]
        elif self.mode == "grey" and c != 1:
            if c not in (3, 4):
                raise BandCountError(f"{c} bands; data.channels=grey takes 1, 3 or 4 (use data.channels=all)",
                                     f"set data.channels=all model.in_chans={c}")
            scale = INT_SCALE.get(item.dtype, 1.0)
            luma = (item[..., :3].astype(np.float32) / scale) @ np.asarray(GREY_WEIGHTS, dtype=np.float32)
            item = luma[..., None]
        if self.bands is not None:
            if max(self.bands) >= item.shape[2]:
                raise BandCountError(f"{item.shape[2]} bands, but data.bands asks for band {max(self.bands)}",
                                     f"pick bands below {item.shape[2]} in data.bands")
            item = item[..., list(self.bands)]
        if self.expect is not None and item.shape[2] != self.expect:
            fix = (f"set model.in_chans={item.shape[2]} to match the data" if self.bands is None else
                   f"keep {self.expect} bands in data.bands, or set model.in_chans={item.shape[2]}")
            raise BandCountError(f"{item.shape[2]} bands; the run takes {self.expect} (model.in_chans)", fix)
        return float_bands(item)


RGB = Channels()


def channels_of(data_cfg, in_chans: int = 3) -> Channels:
    """The :class:`Channels` of a data config (``channels``, ``bands``, ``npy_layout``; defaults when absent)."""
    bands = getattr(data_cfg, "bands", None)
    return Channels(getattr(data_cfg, "channels", "rgb"), tuple(bands) if bands is not None else None, in_chans,
                    getattr(data_cfg, "npy_layout", "hwc"))


def band_count(item) -> int:
    """Bands of what a source returns: a PIL image (its mode's) or a ``[C, H, W]`` tensor."""
    if isinstance(item, Image.Image):
        return len(item.getbands())
    return int(item.shape[0])


def auto_band_stats(data_cfg) -> bool:
    """``data.mean=auto`` (or ``data.std=auto``): both are computed at start."""
    return "auto" in (data_cfg.mean, data_cfg.std)


def check_channels(d, in_chans: int, check, auto_stats: bool = False, from_source: bool = False) -> None:
    """data.channels / data.bands / data.mean / data.std against model.in_chans: one line per problem
    (``check(ok, message)`` collects them; :mod:`fcmae.run.validation` runs it with the config's own)."""
    check(d.channels in CHANNEL_MODES, f"data.channels={d.channels!r}; use rgb, grey or all")
    check(d.npy_layout in NPY_LAYOUTS, f"data.npy_layout={d.npy_layout!r}; use hwc or chw")
    check(in_chans >= 1, f"model.in_chans={in_chans} must be >= 1")
    if d.bands is not None:
        check(d.channels == "all", f"data.bands={list(d.bands)} picks bands of data.channels=all (not {d.channels})")
        check(len(d.bands) == in_chans and min(d.bands, default=0) >= 0,
              f"data.bands={list(d.bands)} keeps {len(d.bands)} bands; model.in_chans={in_chans} must match")
    elif d.channels == "rgb":
        check(in_chans == 3, f"model.in_chans={in_chans} with data.channels=rgb (3 bands); for one band use "
                             "data.channels=grey, for every band of the files data.channels=all")
    elif d.channels == "grey":
        check(in_chans == 1, f"model.in_chans={in_chans} with data.channels=grey (1 band): set model.in_chans=1")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if auto_stats and auto_band_stats(d):
            continue
        if from_source and value is None:  # resolved at start (the init's record, or ImageNet's)
            continue
        ok = isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
        ok = ok and all(isinstance(v, (int, float)) for v in value)
        fix = "; or data.mean=auto to compute them at start" if auto_stats else ""
        check(ok and len(value) == in_chans,
              f"data.{key}={value if not ok else list(value)} needs {in_chans} numbers, one per band (model.in_chans); "
              f"`fcmae-stats SOURCE` prints them{fix}")
        if ok and key == "std":
            check(all(v > 0 for v in value), f"data.std={list(value)} must be > 0")
