"""What a resume may change, checked against the checkpoint's own config and data, by the rules of
:mod:`fcmae.config.resume_rules` (one table for every key of both apps). Every check here runs before
anything in the run directory changes (:func:`fcmae.run.resume.prepare_run` sets checkpoints aside and
trims the logs only once they all passed): a refused command leaves the run as it was.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..config.resume_rules import APPLY, BATCH, DATA, INPUT, REFUSE, rule_of
from ..distributed import DistInfo
from ..storage.checkpoint_record import TrainingCheckpoint
from ..errors import ConfigError
from .settings import adapt_to_world_size

log = logging.getLogger("fcmae")

ANOTHER_RUN = "start another run (run_name=..., or resume=never in a new directory)"
# values the run resolves when it reads the data (data.mean=auto, model.num_classes=null, fine-tuning's
# data.mean=null): checked once resolved (check_resolved_data)
RESOLVED_LATER = (None, "auto")
WHY_REFUSED = {
    REFUSE: "they give the checkpoint's weights their meaning (the model, its data, the seed that orders the data "
            "and draws the masks of the epoch under way)",
    INPUT: "they change every input the weights see (the normalisation, the bands, how a file becomes the input)",
}


def leaves(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (lists are values)."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def changes(old: dict, new: dict, table: dict) -> dict[str, list[tuple[str, Any, Any]]]:
    """``{rule: [(key, old, new), ...]}`` over the keys both configs record whose values differ (a key the
    checkpoint does not record, from before it existed, is not a change)."""
    a, b = leaves(old), leaves(new)
    out: dict[str, list] = {}
    for key in sorted(set(a) & set(b)):
        if _plain(a[key]) != _plain(b[key]):
            out.setdefault(rule_of(table, key) or "unclassified", []).append((key, a[key], b[key]))
    return out


def said(items) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, a, b in items)


def check_resume(path, record: TrainingCheckpoint, cfg, table: dict, info: DistInfo, accum: int,
                 effective: int) -> tuple[int, int]:
    """Every check that needs no data, against checkpoint ``record`` (read from ``path``): refused keys and
    input description, the effective batch; the training settings that change are said. Returns the
    ``(accum, effective batch)`` the resumed run trains with. Raises :class:`ConfigError` naming the keys."""
    old, new = record.config, OmegaConf.to_container(cfg, resolve=True)
    diff = changes(old, new, table) if old else {}
    _refuse(path, [c for c in diff.get(REFUSE, []) + diff.get(INPUT, []) if c[2] not in RESOLVED_LATER], table)
    accum, effective = _check_batch(path, record, diff.get(BATCH, []), cfg, info, accum, effective)
    applied = diff.get(APPLY, [])
    if applied and info.is_main:
        log.warning("resuming %s with %s: in effect from step %d on", path, said(applied), record.step)
    return accum, effective


def _refuse(path, refused, table: dict) -> None:
    if refused:
        why = "; ".join(WHY_REFUSED[r] for r in (REFUSE, INPUT) if any(rule_of(table, k) == r for k, _, _ in refused))
        raise ConfigError(f"{path} was trained with another {said(refused)}: {why}; continue with the original "
                          "value, or " + ANOTHER_RUN)


def _check_batch(path, record: TrainingCheckpoint, changed, cfg, info: DistInfo, accum: int,
                 effective: int) -> tuple[int, int]:
    old_world, old_effective = record.world()
    if not old_effective or old_effective == effective:
        return accum, effective
    explicit = [c for c in changed if c[0] != "data.batch_size"]
    if explicit:
        raise ConfigError(f"{path} was trained with an effective batch of {old_effective}; {said(explicit)} "
                          f"would make it {effective}, changing the lr, the steps per epoch and the data order of the "
                          "epoch under way: continue with the original values, or " + ANOTHER_RUN)
    accum = adapt_to_world_size(old_world, old_effective, cfg.data.batch_size, info.world_size,
                                run_dir=Path(path).parent.parent)
    what = [said([c]) for c in changed if c[0] == "data.batch_size"]
    if old_world != info.world_size:
        what.append(f"processes: {old_world} -> {info.world_size}")
    if info.is_main:
        log.warning("resuming with %s: accumulation %d keeps its effective batch %d (%d x %d x %d), so the lr, the "
                    "schedule and the samples per step are unchanged; the data order within a step and the "
                    "per-process random streams differ from an uninterrupted run", "; ".join(what) or "another setup",
                    accum, old_effective, cfg.data.batch_size, accum, info.world_size)
    return accum, old_effective


def check_resolved_data(path, record: TrainingCheckpoint, cfg, table: dict, images: int, info: DistInfo) -> None:
    """The checks that need the data read: a resumed run must train on the data it started on (another
    root that holds another number of images is another dataset: refused; a changed count or a moved root
    alone is said), and a normalisation the run resolved itself (``data.mean=auto``, or fine-tuning's from
    ``model.init_from``) is compared with the checkpoint's (a difference is said)."""
    old, new = record.config, OmegaConf.to_container(cfg, resolve=True)
    diff = changes(old, new, table) if old else {}
    _refuse(path, diff.get(REFUSE, []), table)  # values resolved from the data (model.num_classes=null)
    moved = diff.get(DATA, [])
    counted = record.data_images is not None and int(record.data_images) != images
    if moved and counted:
        key, old_root, new_root = moved[0]
        raise ConfigError(f"{path} was trained on {key}={old_root} ({record.data_images} images); {new_root} holds "
                          f"{images}: another dataset does not continue this run. Go back to {key}={old_root}, or "
                          + ANOTHER_RUN)
    if info.is_main and moved:
        key, old_root, new_root = moved[0]
        log.warning("%s: %s: %s -> %s holds the same number of images (%d): taken as the same data, moved", path,
                    key, old_root, new_root, images)
    elif info.is_main and counted:
        log.warning("the data changed since %s: %d images then, %d now; the steps per epoch and the schedule's "
                    "length follow the new count", path, record.data_images, images)
    resolved = diff.get(INPUT, [])
    if resolved and info.is_main:
        log.warning("resuming %s: the normalisation this run resolved differs from the checkpoint's (%s): every input "
                    "is normalised the new way from step %d on; pass the checkpoint's values to keep them",
                    path, said(resolved), record.step)
