"""One loader of initial weights for every app (``init_from``, ``model.init_from``): an export file, a
pretraining or fine-tuning checkpoint or a run directory, in any layout the converter reads; rank 0
picks the file and every rank reads that one; RGB weights meet a model of other bands through the
converter's stem adaptation, said in one warning."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import json
import math

from ..distributed import DistInfo
from ..storage.checkpoint_record import read_for_inspection
from ..errors import ConfigError
from ..export.convert import adapt_stem, decoder_state, to_canonical
from ..export.described import input_description
from .ranks import read_agreed

log = logging.getLogger("fcmae")


@dataclass
class InitWeights:
    source: Path  # the file read (a run directory resolves to its newest whole checkpoint)
    canonical: dict  # the encoder's weights in the converter's canonical layout, stem adapted
    layout: str  # the layout they were found in
    decoder: dict  # full FCMAE weights' decoder, projection, mask token and head (empty: encoder only)


def read_init_weights(path: str | Path, key: str, in_chans: int, info: DistInfo | None = None) -> InitWeights:
    """The encoder weights ``key=path`` names, for a model of ``in_chans`` input bands."""
    found = read_agreed(path, info) if info is not None else read_for_inspection(path)
    src, obj = found.source, found.weights
    canonical, layout = to_canonical(obj, source=str(src))
    canonical, adapted = adapt_stem(canonical, in_chans, f"{key}={path}")
    if adapted:
        log.warning("%s=%s holds RGB weights; model.in_chans=%d: the stem starts from %s", key, path, in_chans,
                    adapted)
    return InitWeights(Path(src), canonical, layout, decoder_state(obj) if not adapted else {})


def read_input_normalisation(path: str | Path, in_chans: int, key: str = "model.init_from") -> dict | None:
    """``{"mean", "std", "scaling"}`` an init source records (a run or its checkpoint, an export of ours:
    safetensors metadata, a timm or transformers folder), checked: one finite value per band and every std
    above 0 (:class:`ConfigError` naming the file otherwise). None when the source records none; a source
    that cannot be read is not an error here (the weights are read, and any failure reported, next)."""
    path = Path(path)
    try:
        described, where = _recorded_normalisation(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json, safetensors' header, a missing key
        described, where = None, f"{path} ({type(exc).__name__}: {exc})"
        log.warning("%s=%s: its record of the input could not be read (%s); the normalisation falls back as for "
                    "a source that records none", key, path, where)
        return None
    if not described or described.get("mean") is None:
        return None
    mean, std = described.get("mean"), described.get("std")
    problem = None
    if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
        problem = f"mean {mean!r} and std {std!r} are not one number per band"
    elif len(mean) != in_chans or len(std) != in_chans:
        problem = f"it records {len(mean)} mean and {len(std)} std values, the model takes {in_chans} bands"
    elif not all(isinstance(v, (int, float)) and math.isfinite(v) for v in [*mean, *std]):
        problem = f"mean {list(mean)} / std {list(std)} hold a value that is not a finite number"
    elif not all(v > 0 for v in std):
        problem = f"std {list(std)} holds a value <= 0 (it divides every pixel)"
    if problem:
        raise ConfigError(f"{key}={path}: the normalisation recorded in {where} does not fit: {problem}. Pass "
                          "data.mean=[...] data.std=[...] (fcmae-stats DATA_ROOT prints them) or data.mean=auto")
    return {**described, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _recorded_normalisation(path: Path) -> tuple[dict | None, str]:
    """What ``path`` records of its input, and the file it was read from."""
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        where = path / "preprocessor_config.json"
        pre = json.loads(where.read_text())
        return {"mean": pre["image_mean"], "std": pre["image_std"], "scaling": "as the transformers processor says"}, \
            str(where)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        where = path / "config.json"
        cfg = json.loads(where.read_text())
        pre = cfg.get("pretrained_cfg") or {}
        return {"mean": pre.get("mean"), "std": pre.get("std"),
                "scaling": (cfg.get("fcmae_input") or {}).get("scaling", "not recorded")}, str(where)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("input") or meta.get("fcmae_config") or "null"), f"{path}'s metadata"
    found = read_for_inspection(path)
    return input_description(found.record), str(found.source)
