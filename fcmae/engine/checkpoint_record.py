"""What a training checkpoint holds, in one typed record: written by the loop
(:meth:`fcmae.engine.checkpointing.Checkpointing.contents`), read back by the resume
(:func:`fcmae.run.resume.restore`). A new field is one edit here (and where its value comes from).

On disk it stays the flat dict older files have (``torch.save`` of :meth:`to_dict`): the weights,
the loop's position (:class:`LoopState`'s fields), the run's world and config, and the task's own
entries (best metrics, EMA weights, class names) at the top level, where exports and other tools
read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..storage.checkpoint import REQUIRED_KEYS as REQUIRED  # what makes a file a training checkpoint (checked on read)
from .state import LoopState


@dataclass
class TrainingCheckpoint:
    model: dict  # the raw model's state dict (no DDP or compile prefixes)
    optimizer: dict
    loop: LoopState  # where the run is: step, epoch, batch in epoch, counts, blow-up tracking
    scaler: dict | None = None  # fp16's GradScaler
    rng: list = field(default_factory=list)  # every rank's RNG states, by rank
    world_size: int = 1
    effective_batch: int | None = None  # images per optimizer step over all ranks
    config: dict = field(default_factory=dict)  # the resolved config the run trained with
    data_images: int | None = None  # how many images the training data held (a resume checks it)
    pixel_type: str | None = None  # its files' pixel type (uint8, uint16, float32): how exports rescale
    task: dict = field(default_factory=dict)  # the task's own state (Task.state_dict), stored flat

    _OWN = ("model", "optimizer", "scaler", "rng", "world_size", "effective_batch", "config", "data_images", "pixel_type")

    def to_dict(self) -> dict:
        out = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, **self.loop.to_dict(),
               "rng": self.rng, "world_size": self.world_size, "effective_batch": self.effective_batch,
               "config": self.config, "data_images": self.data_images, "pixel_type": self.pixel_type}
        clash = set(self.task) & set(out)
        if clash:
            raise ValueError(f"the task's checkpoint entries {sorted(clash)} collide with the checkpoint's own")
        return {**out, **self.task}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingCheckpoint":
        """A loaded checkpoint (``d`` holds :data:`REQUIRED`); what is not the record's own or the loop's
        is the task's."""
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise KeyError(f"not a training checkpoint: no {', '.join(missing)}")
        loop = LoopState.from_dict(d)
        mine = set(cls._OWN) | set(loop.to_dict())
        return cls(model=d["model"], optimizer=d["optimizer"], loop=loop, scaler=d.get("scaler"),
                   rng=list(d.get("rng") or []), world_size=d.get("world_size") or len(d.get("rng") or [None]),
                   effective_batch=d.get("effective_batch"), config=d.get("config") or {},
                   data_images=d.get("data_images"), pixel_type=d.get("pixel_type"),
                   task={k: v for k, v in d.items() if k not in mine})
