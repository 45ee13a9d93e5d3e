"""One loader of initial weights for every app (``init_from``, ``model.init_from``): an export file, a
pretraining or fine-tuning checkpoint or a run directory, in any layout the converter reads; rank 0
picks the file and every rank reads that one; RGB weights meet a model of other bands through the
converter's stem adaptation, said in one warning."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import json

from ..storage.checkpoint import read_checkpoint
from ..distributed import DistInfo
from ..export.convert import adapt_stem, decoder_state, to_canonical
from ..export.described import input_description
from .ranks import read_checkpoint_agreed

log = logging.getLogger("fcmae")


@dataclass
class InitWeights:
    source: Path  # the file read (a run directory resolves to its newest whole checkpoint)
    canonical: dict  # the encoder's weights in the converter's canonical layout, stem adapted
    layout: str  # the layout they were found in
    decoder: dict  # full FCMAE weights' decoder, projection, mask token and head (empty: encoder only)


def read_init_weights(path: str | Path, key: str, in_chans: int, info: DistInfo | None = None) -> InitWeights:
    """The encoder weights ``key=path`` names, for a model of ``in_chans`` input bands."""
    src, obj = read_checkpoint_agreed(path, info) if info is not None else read_checkpoint(path)
    canonical, layout = to_canonical(obj, source=str(src))
    canonical, adapted = adapt_stem(canonical, in_chans, f"{key}={path}")
    if adapted:
        log.warning("%s=%s holds RGB weights; model.in_chans=%d: the stem starts from %s", key, path, in_chans,
                    adapted)
    return InitWeights(Path(src), canonical, layout, decoder_state(obj) if not adapted else {})


def read_input_normalisation(path: str | Path) -> dict | None:
    """``{"mean", "std", "scaling"}`` an init source records (a run or its checkpoint, an export of ours:
    safetensors metadata, a timm or transformers folder); None when it records none."""
    path = Path(path)
    try:
        if path.is_dir() and (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
            return {"mean": pre["image_mean"], "std": pre["image_std"], "scaling": "as the transformers processor says"}
        if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
            cfg = json.loads((path / "config.json").read_text())
            pre = cfg.get("pretrained_cfg") or {}
            return {"mean": pre["mean"], "std": pre["std"],
                    "scaling": (cfg.get("fcmae_input") or {}).get("scaling", "not recorded")}
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            described = json.loads(meta.get("input") or meta.get("fcmae_config") or "null")
            return described if described and described.get("mean") else None
        _, obj = read_checkpoint(path)
        return input_description(obj)
    except Exception:  # unreadable as a record: the init itself is read (and reported) later
        return None
