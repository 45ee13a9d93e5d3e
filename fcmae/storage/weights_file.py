"""Weight files read and written safely: ``.safetensors`` or a torch pickle loaded without running
code (:func:`load_state_dict_file`), written whole or not at all (:func:`save_state_dict`), and
:class:`CheckpointError`, which every unusable checkpoint raises. The checkpoints of a run
(:mod:`fcmae.storage.checkpoint`) and the converter (:mod:`fcmae.export.convert`) both build on it."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .files import fsync_dir, write_atomic
from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the key and the fix."""


# ---------------------------------------------------------------- loading and detection

def _allow_official_pickles() -> None:
    # The official training script stores its argparse Namespace next to the weights.
    torch.serialization.add_safe_globals([argparse.Namespace])


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read ``.safetensors`` or a torch pickle (``.pt``/``.pth``) without running arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    _allow_official_pickles()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a loadable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return dict(obj)


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
                    advice: str = "write it elsewhere (fcmae-export --out PATH)") -> Path:
    """Write ``.safetensors`` or ``.pth`` atomically (temporary file, then rename); a disk that
    refuses the write raises :class:`fcmae.storage.files.DiskWriteError` and leaves nothing behind."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: output must end in .safetensors, .pth or .pt")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}

    def write(tmp: Path) -> None:
        if path.suffix != ".safetensors":
            torch.save(tensors, tmp)
            return
        from safetensors.torch import save_file
        try:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        except Exception as exc:  # safetensors' Rust error carries the OS error only in its text
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from exc
    write_atomic(path, write, "export", advice)
    fsync_dir(path.parent)
    return path
