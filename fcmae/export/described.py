"""Exports that describe themselves: what input a model expects (bands, their order, the scaling of
the pixels, the normalisation), read from the run that trained it and written with its weights:

- :func:`input_description`: the facts, from a training checkpoint's config (None for weights from
  elsewhere: a timm file, an official release);
- :func:`write_timm_folder`: timm's model-folder convention (``config.json`` + ``model.safetensors``),
  which ``timm.create_model("local-dir:PATH", pretrained=True)`` builds (``features_only=True``
  included) and whose ``pretrained_cfg`` gives ``timm.data.resolve_data_config`` our mean and std.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..models.masking import image_shape
from ..storage.files import write_atomic
from ..storage.weights_file import save_state_dict
from .hf import IMAGENET_MEAN, IMAGENET_STD


# How a file's pixels became the numbers the mean/std apply to (fcmae.data.image_io).
SCALING = {
    "rgb": "8-bit RGB, uint8 / 255 (16-bit files are reduced to 8 bits first)",
    "grey": "one band: integers / their type's largest value (uint8 255, uint16 65535, int16 32767), floats as "
            "they are; RGB files as ITU-R 601-2 luma",
    "all": "every band: integers / their type's largest value (uint8 255, uint16 65535, int16 32767), floats as "
           "they are (not / 10000: divide Sentinel-2 style reflectances by 65535 to match)",
}


def rescale_factor(pixel_type: str | None, channels: str = "rgb") -> float | None:
    """What raw pixels are multiplied by to reach the run's units: 1 / the integer type's largest value
    (as the run's reader divides), None for floats (taken as they are) and for an unknown type, except
    8-bit RGB, which every ``rgb`` run reads."""
    if not pixel_type:
        return 1 / 255 if channels == "rgb" else None
    kind = np.dtype(pixel_type)
    if kind == np.bool_:
        return 1.0
    return 1 / float(np.iinfo(kind).max) if kind.kind in "iu" else None


def input_description(record) -> dict | None:
    """The input a training checkpoint's model expects (``record``: a
    :class:`fcmae.storage.checkpoint_record.TrainingCheckpoint`, None for weights from elsewhere):
    ``in_chans``, ``img_size``, ``channels``, ``bands`` (indices into the files' bands, from 0),
    ``scaling``, ``mean``, ``std`` (after the scaling)."""
    if record is None:
        return None
    mean, std = record.setting("data.mean"), record.setting("data.std")
    if mean in (None, "auto") or std in (None, "auto"):
        return None
    channels = record.setting("data.channels", "rgb")
    pixel_type = record.pixel_type
    factor = rescale_factor(pixel_type, channels)
    scaling = SCALING.get(channels, SCALING["all"])
    if pixel_type:
        scaling = f"{pixel_type} files: " + (f"x {factor:.10g} (1 / {round(1 / factor)})" if factor else "as they are")
    return {"in_chans": record.setting("model.in_chans", 3), "img_size": record.setting("data.img_size"),
            "channels": channels, "bands": record.setting("data.bands"), "pixel_type": pixel_type,
            "rescale_factor": factor, "scaling": scaling, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std]}


def write_timm_folder(sd: Mapping[str, torch.Tensor], out: Path, architecture: str, described: dict | None,
                      in_chans: int, metadata: dict) -> Path:
    """``out/model.safetensors`` and ``out/config.json`` (timm's model folder); without a description of
    the input (weights from elsewhere) ImageNet's mean and std are written, as timm's own weights carry."""
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, out / "model.safetensors", metadata=metadata)
    stem = int(sd["stem.0.weight"].shape[-1]) if "stem.0.weight" in sd else 4
    h, w = image_shape((described or {}).get("img_size") or 224)
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(sd["head.norm.weight"].shape[0]),
        # a stem of another stride than 4 (16- or 8-pixel patches) is timm's patch_size
        "model_args": {"in_chans": in_chans, **({"patch_size": stem} if stem != 4 else {})},
        "pretrained_cfg": {
            "input_size": [in_chans, h, w], "interpolation": "bicubic", "crop_pct": 1.0,
            "mean": (described or {}).get("mean") or IMAGENET_MEAN[:in_chans],
            "std": (described or {}).get("std") or IMAGENET_STD[:in_chans],
            "num_classes": 0, "first_conv": "stem.0", "classifier": "head.fc",
        },
        # ours, beside timm's fields (timm reads only its own): how the pixels were made
        "fcmae_input": described or {"note": "the source recorded no input description; ImageNet's mean/std"},
    }
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"), "export")
    return out
