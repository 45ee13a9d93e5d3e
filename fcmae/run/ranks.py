"""Decisions a run takes once, on rank 0, and loads every rank takes part in: no rank decides
alone, none is left waiting in a collective, none goes on with something else."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..storage.checkpoint_record import Inspected, read_for_inspection
from ..distributed import DistInfo, all_reduce_max, broadcast_object
from ..errors import UserError, user_error
from ..storage.weights_file import CheckpointError


def on_rank_zero(decide: Callable[[], object], info: DistInfo):
    """``decide()`` on rank 0 alone; every rank returns its (picklable) result, or raises its
    user error (same type, same message): one decision per run directory, never one per rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except UserError as exc:
            if not info.enabled:
                raise
            error = (type(exc).__name__, str(exc))
            raised = exc
    result, error = broadcast_object((result, error), info)
    if error is not None:
        if info.is_main:
            raise raised
        raise user_error(*error)
    return result


def on_every_rank(load: Callable[[], object], info: DistInfo, what: str):
    """``load()`` on every rank; if it fails on any, every rank stops with one error."""
    out, error = None, None
    try:
        out = load()
    except (UserError, OSError, MemoryError, RuntimeError) as exc:
        if not info.enabled:
            raise
        error = exc
    if all_reduce_max(error is not None, info):
        if error is not None:
            raise CheckpointError(f"rank {info.rank} could not load {what}: {error}; every rank stops") from None
        raise CheckpointError(f"another rank could not load {what} (its log says why); every rank stops")
    return out


def read_agreed(path: str | Path, info: DistInfo) -> Inspected:
    """:func:`fcmae.storage.checkpoint_record.read_for_inspection` with rank 0 choosing the file (a run
    directory's newest whole checkpoint) and every other rank reading that same file."""
    box = {}

    def resolve() -> str:
        box["read"] = read_for_inspection(path)
        return str(box["read"].source)
    src = on_rank_zero(resolve, info)
    return on_every_rank((lambda: box["read"]) if info.is_main else (lambda: read_for_inspection(src)), info, src)
