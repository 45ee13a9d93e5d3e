"""Run-directory checkpoints: atomic writes, ``last.pt``, keep-last-K, RNG state capture.

Layout: ``RUN_DIR/checkpoints/checkpoint-0000123.pt`` (K newest kept),
``RUN_DIR/checkpoints/last.pt`` (a hard link to the newest), and named extras such as
``best.pt`` that the rotation never removes. A crash while
writing leaves only a ``.tmp`` file behind; the previous checkpoints are intact.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .convert import CheckpointError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
# Where a run directory keeps its last checkpoint (a bare last.pt is accepted too).
RUN_CHECKPOINTS = (f"{CHECKPOINT_DIR}/{LAST}", LAST)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's last checkpoint."""
    path = Path(path)
    if path.is_dir():
        for rel in RUN_CHECKPOINTS:
            if (path / rel).is_file():
                return path / rel
        raise CheckpointError(
            f"{path} is a directory without a checkpoint ({' or '.join(RUN_CHECKPOINTS)}); "
            "pass a pretraining run directory or a checkpoint file"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return path


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links: copy instead
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def exists(self) -> bool:
        return self.last.is_file()

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"checkpoint-{step:07d}.pt"
        _atomic_save(state, path)
        _atomic_link(path, self.last)
        self._prune()
        return path

    def save_as(self, state: dict, name: str) -> Path:
        """An extra checkpoint kept by name (``best.pt``), outside the keep-K rotation."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        _atomic_save(state, path)
        return path

    def _prune(self) -> None:
        numbered = sorted(p for p in self.dir.glob("checkpoint-*.pt") if re.fullmatch(r"checkpoint-\d+\.pt", p.name))
        for old in numbered[: -self.keep]:
            old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our training checkpoints (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}  # plain types: weights_only loads it
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
