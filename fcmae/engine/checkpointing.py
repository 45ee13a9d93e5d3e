"""What the loop saves and when: a checkpoint's contents, the refusal to save weights that are not
finite, the save's collective (a write failure or a stop signal on any rank is seen by all), and
the periodic cadence (``trainer.ckpt_every``)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..storage.checkpoint import capture_rng, non_finite_tensors
from ..distributed import all_gather_objects, all_reduce_max_tensor
from ..storage.files import DiskWriteError
from ..storage.checkpoint_record import TrainingCheckpoint
from .state import LoopSettings, LoopState, NonFiniteLoss
from .step_sync import StepSync
from .task import RunParts, Task

log = logging.getLogger("fcmae")


class Checkpointing:
    def __init__(self, task: Task, parts: RunParts, settings: LoopSettings, state: LoopState, sync: StepSync):
        self.task, self.parts, self.settings, self.state, self.sync = task, parts, settings, state, sync
        self.saved_step: int | None = None  # the step of this process's last numbered checkpoint
        self.saved_path: Path | None = None

    def record(self) -> TrainingCheckpoint:
        """What a checkpoint of this moment holds (every rank takes part: the RNG states are gathered)."""
        p = self.parts
        return TrainingCheckpoint(
            model=p.raw_model.state_dict(), optimizer=p.optimizer.state_dict(),
            scaler=p.scaler.state_dict() if p.scaler is not None else None, loop=self.state,
            rng=all_gather_objects(capture_rng(), p.dist), world_size=p.dist.world_size,
            effective_batch=self.settings.batch_size * self.settings.accum * p.dist.world_size, config=p.config,
            data_images=len(p.sampler.dataset) if hasattr(p.sampler, "dataset") else None,
            pixel_type=getattr(getattr(p.sampler, "dataset", None), "pixel_type", None),
            task=self.task.state_dict())

    def due(self) -> bool:
        """A periodic checkpoint after this step (not the last one: the run's end saves its own)."""
        st, s = self.state, self.settings
        return st.step % s.ckpt_every == 0 and st.step < s.stop_step and self.sync.stop_signal is None

    def save(self, name: str | None = None) -> Path | None:
        """Checkpoint the run: numbered (and ``last.pt``), or under ``name`` (e.g. ``best.pt``)
        when given. Call on every rank (the RNG states are gathered); rank 0 writes. A failed
        write (this one, or an earlier image or log line) stops every rank at this point, none
        left waiting in a collective; a stop signal caught while writing stops the run right after
        it. Weights or optimizer state that are not finite are never written."""
        record = self.record()
        self.check_finite(record)
        state = record.to_dict()
        del record
        path, failure, dist = None, None, self.parts.dist
        if dist.is_main:
            try:
                ckpt = self.parts.ckpt
                path = ckpt.save(state, self.state.step) if name is None else ckpt.save_as(state, name)
            except DiskWriteError as exc:
                failure = exc
        del state
        failure = failure or self.sync.write_failure
        flags = torch.tensor([float(failure is not None), float(self.sync.signalled)], device=dist.device)
        failed, stop = all_reduce_max_tensor(flags, dist).tolist()
        if failed:
            self.sync.raise_write_failure(failure)
        if path is not None:
            log.info("saved checkpoint %s (step %d)", path, self.state.step)
        if name is None:
            self.saved_step, self.saved_path = self.state.step, path
        self.sync.agree_to_stop(bool(stop))  # acted on now, not after another step
        return path

    def check_finite(self, record: TrainingCheckpoint) -> None:
        """Every rank holds the same weights and optimizer state (DDP), so every rank decides alike."""
        bad = non_finite_tensors(record.model)
        bad += [f"optimizer.{k}" for k in non_finite_tensors(record.optimizer.get("state", {}))]
        if bad:
            st = self.state
            blowup = st.blowup_step if st.blowup_step is not None else st.step + 1
            raise NonFiniteLoss(f"the weights or optimizer state after step {st.step} are not finite "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); they were not saved",
                                st.step + 1, min(blowup, st.step + 1))

    def saved_now(self) -> Path | None:
        """The checkpoint of the current step: the one already written (a signal caught while the
        periodic save ran), else a new one."""
        return self.saved_path if self.saved_step == self.state.step else self.save()
