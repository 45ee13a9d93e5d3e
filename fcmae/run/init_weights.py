"""One loader of initial weights for every app (``init_from``, ``model.init_from``): an export file, a
pretraining or fine-tuning checkpoint or a run directory, in any layout the converter reads; rank 0
picks the file and every rank reads that one; RGB weights meet a model of other bands through the
converter's stem adaptation, said in one warning."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..storage.checkpoint import read_checkpoint
from ..distributed import DistInfo
from ..export.convert import adapt_stem, decoder_state, to_canonical
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
