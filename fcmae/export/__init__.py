"""Dense export: the sparse encoder's weights as plain dense layers, in files other tools load.

- ``convert``: checkpoint layouts (official dense, MinkowskiEngine, timm) <-> the canonical dense
  encoder, checked key by key (:func:`to_dense`, :func:`to_canonical`)
- ``exporter``: ``fcmae-export``, which writes an export and verifies it against the sparse encoder
- ``hf``: the Hugging Face ``transformers`` folder (``--format hf``)

The app (``exporter``) loads only when asked for (``fcmae.export.export`` / ``main``), so the
converter stays importable without the checkpoint and run-directory machinery.
"""
from ..storage.weights_file import CheckpointError, load_state_dict_file, save_state_dict
from .convert import FORMATS, canonical_to_format, detect_layout, infer_shape, to_canonical, to_dense, variant_of

__all__ = ["FORMATS", "CheckpointError", "canonical_to_format", "detect_layout", "export", "infer_shape",
           "load_state_dict_file", "main", "save_state_dict", "to_canonical", "to_dense", "variant_of"]


def __getattr__(name: str):
    if name in ("export", "main"):
        from . import exporter
        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
