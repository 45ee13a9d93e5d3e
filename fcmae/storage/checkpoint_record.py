"""What a training checkpoint holds, in one typed record, and the two ways to read one.

Written by the loop (:meth:`fcmae.engine.checkpointing.Checkpointing.record`), read by the resume
(:func:`read_for_resume`) and by everything that only looks (export, evaluation, ``init_from``:
:func:`read_for_inspection`). Both reads verify a file the same way (its ``.sum``, else the zip's own
CRC-32s: :func:`fcmae.storage.checkpoint.check_checkpoint`). No other module reads a checkpoint's keys
(``tests/storage/test_checkpoint_record.py`` greps for it): they use the accessors below.

A new field is one edit: a field of :class:`TrainingCheckpoint` (with its default for older files); the
file format (:meth:`to_dict`, :meth:`from_dict`) is derived from the fields. On disk the record stays the
flat dict older files have: the record's fields, the loop's position (:class:`LoopState`'s fields) and the
task's own entries (best metrics, EMA weights, class names) side by side at the top level.

It lives in ``storage/`` (the bottom of the run layer) so that the exporter reads it without the loop.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import (REQUIRED_KEYS as REQUIRED, check_checkpoint, newest_good_checkpoint, read_sums,
                         resolve_pointer, run_checkpoint_dir)
from .weights_file import CheckpointError, load_state_dict_file

log = logging.getLogger("fcmae")

# The task entries other tools read (fine-tuning's ClassifyTask writes them): spelled here once.
EMA_WEIGHTS = "model_ema"  # the EMA of the weights (ema.enabled)
CLASS_NAMES = "classes"  # the training set's class names, in output order
BEST_SCORES = "best"  # the best val scores so far
DESCRIBED = ("model", "config")  # a checkpoint of ours trimmed for sharing (no optimizer, no position)


@dataclass
class RunPosition:
    """Where a run is, as a checkpoint records it (flat, beside the weights): the loop's position and its
    record of the loss's range. :class:`fcmae.engine.state.LoopState` adds the rules the loop applies."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_images: int = 0  # over all ranks
    seen_images: int = 0  # over all ranks
    finished: bool = False  # the final evaluation and checkpoint of stop_step are done
    loss_floor: float | None = None  # the lowest step loss so far (this rank's), for the blow-up bound
    blowup_step: int | None = None  # the first step of the spike under way (None: the loss is in range)
    blowup_peak: float | None = None  # the spike's highest loss so far
    calm_steps: int = 0  # steps in a row back in range during a spike (RECOVERY_STEPS end it)
    spikes: list = field(default_factory=list)  # [first step, recovered at step, peak loss] of each spike recovered from

    # what a checkpoint written before a field existed means by its absence
    _OLD_FILE_DEFAULTS = {"finished": True}

    def to_dict(self) -> dict:
        """The fields as a checkpoint stores them (flat, beside the weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The position a checkpoint stores; a field it lacks (an older file) takes its old meaning."""
        def absent(f):
            if f.name in cls._OLD_FILE_DEFAULTS:
                return cls._OLD_FILE_DEFAULTS[f.name]
            return f.default_factory() if f.default is MISSING else f.default
        return cls(**{f.name: d[f.name] if f.name in d else absent(f) for f in fields(cls)})

    def describe_spikes(self) -> str:
        """The spikes recovered from (and one under way), in words; empty when there was none."""
        parts = [f"at step {a} (peak {peak:.3g}) and recovered by step {b}" for a, b, peak in self.spikes or []]
        if self.blowup_step is not None:
            parts.append(f"at step {self.blowup_step} and had not come back by then")
        return ("loss left its range " + "; ".join(parts)) if parts else ""


@dataclass
class TrainingCheckpoint:
    model: dict  # the raw model's state dict (no DDP or compile prefixes)
    optimizer: dict
    loop: RunPosition  # where the run is: step, epoch, batch in epoch, counts, blow-up tracking (stored flat)
    scaler: dict | None = None  # fp16's GradScaler
    rng: list = field(default_factory=list)  # every rank's RNG states, by rank
    world_size: int | None = None  # None in files from before it was saved: the RNG states' count
    effective_batch: int | None = None  # images per optimizer step over all ranks
    config: dict = field(default_factory=dict)  # the resolved config the run trained with
    data_images: int | None = None  # how many images the training data held (a resume checks it)
    pixel_type: str | None = None  # its files' pixel type (uint8, uint16, float32): how exports rescale
    task: dict = field(default_factory=dict)  # the task's own state (Task.state_dict), stored flat

    _NESTED = ("loop", "task")  # stored flat at the top level, not under their own key

    @classmethod
    def _own(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls._NESTED]

    def to_dict(self) -> dict:
        out = {**{name: getattr(self, name) for name in self._own()}, **self.loop.to_dict()}
        clash = set(self.task) & set(out)
        if clash:
            raise ValueError(f"the task's checkpoint entries {sorted(clash)} collide with the checkpoint's own")
        return {**out, **self.task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], required=REQUIRED) -> "TrainingCheckpoint":
        """A loaded checkpoint (``d`` holds ``required``: :data:`REQUIRED` to resume; a read-only look also
        takes one trimmed to its weights and config, :data:`DESCRIBED`); what is not the record's own or the
        loop's is the task's."""
        missing = [k for k in required if k not in d]
        if missing:
            raise KeyError(f"not a training checkpoint: no {', '.join(missing)}")
        d = {"optimizer": {}, **d}
        loop = RunPosition.from_dict(d)
        defaults = {f.name: f for f in fields(cls)}
        own = {}
        for name in cls._own():
            f = defaults[name]
            absent = f.default_factory() if f.default_factory is not MISSING else f.default
            own[name] = d[name] if d.get(name) is not None else absent
        mine = set(own) | set(loop.to_dict())
        return cls(loop=loop, task={k: v for k, v in d.items() if k not in mine}, **own)

    # ---------------------------------------------------------------- accessors

    @property
    def step(self) -> int:
        return int(self.loop.step)

    def setting(self, key: str, default=None):
        """The value of the dotted config ``key`` the run trained with (``default`` where not recorded)."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    def world(self) -> tuple[int, int]:
        """``(world size, effective batch)`` the run trained with (for files from before both were saved:
        the per-process RNG states' count and the config's batch, accumulation or target)."""
        world = int(self.world_size or len(self.rng or [None]))
        if self.effective_batch:
            return world, int(self.effective_batch)
        target = self.setting("optim.effective_batch_size")
        batch, accum = self.setting("data.batch_size", 0), self.setting("trainer.accum_iter", 1)
        return world, int(target or batch * world * accum)

    @property
    def ema_weights(self) -> dict | None:
        ema = self.task.get(EMA_WEIGHTS)
        return ema if isinstance(ema, Mapping) else None

    @property
    def class_names(self) -> list[str] | None:
        return self.task.get(CLASS_NAMES)

    def divergence(self) -> str:
        """What the checkpoint records of its loss leaving its range, in words; empty for a clean run."""
        return self.loop.describe_spikes()


# ---------------------------------------------------------------- the two reads

def read_for_resume(path: str | Path, expect_step: int | None = None) -> TrainingCheckpoint:
    """The training checkpoint at ``path`` (a file), verified and whole, to continue from."""
    return TrainingCheckpoint.from_dict(check_checkpoint(Path(path), expect_step))


def newest_for_resume(directory: Path, quarantine: bool) -> tuple[Path, TrainingCheckpoint] | None:
    """The newest whole numbered checkpoint of a run's ``checkpoints/`` (walking back past damaged ones,
    renamed with ``quarantine``), or None when there is none."""
    found = newest_good_checkpoint(directory, quarantine=quarantine)
    if found is None:
        return None
    try:
        return found[0], TrainingCheckpoint.from_dict(found[1])
    except KeyError as exc:
        raise CheckpointError(f"{found[0]}: {exc.args[0]}; not a training checkpoint to resume") from None


@dataclass
class Inspected:
    """What a read-only command read: the file, and either our training checkpoint (``record``) or the
    weights of any other file (an export, an official release, timm's)."""
    source: Path
    record: TrainingCheckpoint | None
    other: dict | None = None

    @property
    def weights(self) -> Mapping:
        """What the converter reads: the model's state dict, or the other file as it is."""
        return {"model": self.record.model} if self.record is not None else self.other

    @property
    def step(self) -> int | None:
        return self.record.step if self.record is not None else None


def read_for_inspection(path: str | Path) -> Inspected:
    """Read ``path`` without changing anything: a run directory (or its ``last.pt``) gives its newest whole
    checkpoint (damaged ones skipped and said, never renamed); a file of ours is verified as a resume verifies
    it; any other weights file (``.safetensors``, a torch pickle) is read weights-only by its format."""
    path = Path(path)
    ck_dir = run_checkpoint_dir(path)
    if ck_dir is not None:
        found = newest_good_checkpoint(ck_dir, quarantine=False)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint yet ({ck_dir}/checkpoint-*.pt); "
                                  "pass a pretraining run directory or a checkpoint file")
        log.info("using %s (step %d), the newest whole checkpoint of %s", found[0], found[1]["step"], path)
        return _inspected(found[0], found[1])
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without checkpoints (checkpoints/checkpoint-*.pt); "
                              "pass a pretraining run directory or a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    src = resolve_pointer(path)
    if read_sums(src) is not None:  # written by a run of ours: verified before it is read, as a resume does
        return _inspected(src, check_checkpoint(src, required=()))
    obj = load_state_dict_file(src)
    if all(k in obj for k in REQUIRED):  # ours without its .sum: checked against the zip's CRC-32s too
        return _inspected(src, check_checkpoint(src))
    return _inspected(src, obj)


def _inspected(src: Path, obj: Mapping) -> Inspected:
    """Ours (whole, or trimmed to its weights and config: it still describes its model and input), or any
    other weights (an old layout's ``last.pt`` holding weights only, an export, a release)."""
    if all(k in obj for k in REQUIRED) or (all(k in obj for k in DESCRIBED) and isinstance(obj["config"], Mapping)
                                           and isinstance(obj["model"], Mapping)):
        return Inspected(Path(src), TrainingCheckpoint.from_dict(obj, required=DESCRIBED))
    return Inspected(Path(src), None, dict(obj))
