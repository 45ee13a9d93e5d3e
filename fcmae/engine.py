"""The training loop shared by pretraining and fine-tuning: accumulation, mixed
precision, checkpoints, preemption, logging, per-epoch evaluation.

What a batch means is the business of a *task* (``fcmae.pretrain.PretrainTask``,
``fcmae.finetune.ClassifyTask``): it turns a batch into a loss, and may act
after a step (reconstruction images) or at an epoch's end (evaluation).

Position is counted in optimizer steps (``step``) and, inside an epoch, in
micro-batches already consumed (``batch_in_epoch``, always a multiple of the
accumulation at a checkpoint), which is all a resume needs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import CheckpointManager, capture_rng
from .distributed import DistInfo, all_gather_objects, all_reduce_max, all_reduce_mean
from .loggers import Progress
from .optim import cosine_lr, set_lr

log = logging.getLogger("fcmae")

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    def __init__(self, signum: int, step: int, path: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path


class DataQualityError(RuntimeError):
    pass


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag the loop checks after each optimizer step,
    so the checkpoint is written at a clean step boundary. Handlers that were installed
    before (e.g. submitit's requeue on SIGUSR2) are called after the checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self):
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def chain(self) -> None:
        """Call the handler that was installed before ours, if it was a real one."""
        prev = self.previous.get(self.signum)
        if callable(prev):
            prev(self.signum, None)

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        return False


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_images: int = 0
    seen_images: int = 0


@dataclass
class LoopSettings:
    total_steps: int  # schedule length (epochs * steps_per_epoch)
    stop_step: int  # min(total_steps, max_steps)
    steps_per_epoch: int
    accum: int
    base_lr: float
    min_lr: float
    warmup_steps: int
    batch_size: int
    precision: str  # fp32 | bf16 | fp16
    clip_grad: float | None
    log_every: int
    ckpt_every: int
    max_bad_fraction: float
    progress: str = "auto"
    callbacks: list[Callable] = field(default_factory=list)


class Task:
    """What the loop trains. Batches are tuples whose first item is the images
    and whose third is the count of unreadable files skipped to fill it."""

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, loop: "TrainLoop") -> None:
        """Called on every rank after each optimizer step."""

    def evaluate(self, loop: "TrainLoop", final: bool) -> dict | None:
        """Called on every rank at each epoch's end (and at the run's end with
        ``final=True``); returns metrics to log, or None."""
        return None

    def state_dict(self) -> dict:
        """Task state saved at the top level of every checkpoint (e.g. EMA weights, best scores)."""
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a whole checkpoint (the keys :meth:`state_dict` wrote)."""


@dataclass
class RunParts:
    """What an app builds for the loop, in one place (``runner.train`` runs it)."""
    model: nn.Module  # what the loop calls: DDP- and/or compile-wrapped
    raw_model: nn.Module  # the bare module: checkpoints, EMA, evaluation
    optimizer: torch.optim.Optimizer
    scaler: object | None  # GradScaler under fp16
    loader: object
    sampler: object  # a ResumableSampler
    dist: DistInfo
    ckpt: CheckpointManager
    tracker: object  # wandb or a null logger
    config: dict  # the resolved config, saved in every checkpoint
    run_dir: Path


class TrainLoop:
    def __init__(self, task: Task, parts: RunParts, settings: LoopSettings, state: LoopState, metrics_file):
        self.task = task
        self.model, self.raw_model = parts.model, parts.raw_model
        self.optimizer, self.scaler = parts.optimizer, parts.scaler
        self.loader, self.sampler = parts.loader, parts.sampler
        self.settings, self.state, self.dist = settings, state, parts.dist
        self.ckpt, self.metrics_file, self.tracker = parts.ckpt, metrics_file, parts.tracker
        self.config, self.run_dir = parts.config, Path(parts.run_dir)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "bad_images": self.state.bad_images,
            "seen_images": self.state.seen_images,
            "rng": all_gather_objects(capture_rng(), self.dist),
            "config": self.config,
            **self.task.state_dict(),
        }

    def save(self, name: str | None = None) -> Path | None:
        """Checkpoint the run: numbered (and ``last.pt``), or under ``name`` (e.g. ``best.pt``)
        when given. Call on every rank (the RNG states are gathered); rank 0 writes."""
        state = self.state_dict()
        if not self.dist.is_main:
            return None
        path = self.ckpt.save(state, self.state.step) if name is None else self.ckpt.save_as(state, name)
        log.info("saved checkpoint %s (step %d)", path, self.state.step)
        return path

    # ------------------------------------------------------------ one optimizer step
    def _autocast(self):
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.dist.device.type, dtype=dtype)

    def _micro_step(self, batch, sync: bool) -> torch.Tensor:
        ctx = contextlib.nullcontext() if sync or not self.dist.enabled else self.model.no_sync()
        with ctx:
            with self._autocast():
                loss = self.task.loss(self.model, batch, self.dist.device)
            scaled = loss / self.settings.accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _optimizer_step(self, loss_sum: torch.Tensor) -> tuple[float, float]:
        """Clip, check, update. Returns the step's (summed micro-batch loss, grad norm).

        One host-device sync: loss and grad norm come back together, and a non-finite loss
        stops the run before the weights change. (Under DDP the loop's preemption check adds
        a one-element all-reduce per step, so that every rank stops at the same step.)
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.clip_grad if self.settings.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        loss, norm = torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device)]).tolist()
        # Grads are all-reduced, so a NaN on any rank shows in every rank's norm: all ranks
        # stop together. With fp16 the scaler owns non-finite grads (it skips the step).
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"non-finite loss ({loss / self.settings.accum}) or gradient norm ({norm}) "
                                f"at step {self.state.step + 1}")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    # ------------------------------------------------------------ outputs
    def log_metrics(self, metrics: dict) -> None:
        """Write ``metrics`` (main rank) to the metrics file and the tracker at the current step."""
        if not metrics or not self.dist.is_main:
            return
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.metrics_file.write(record)
        self.tracker.log({k: v for k, v in record.items() if k != "step"}, self.state.step)

    def _evaluate(self, final: bool) -> None:
        metrics = self.task.evaluate(self, final)
        if metrics:
            self.log_metrics(metrics)
            if self.dist.is_main:
                log.info("eval at step %d: %s", self.state.step,
                         "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def _check_data_quality(self) -> None:
        st = self.state
        if st.bad_images and st.bad_images > self.settings.max_bad_fraction * max(st.seen_images, 100):
            raise DataQualityError(
                f"{st.bad_images} of {st.seen_images} images were unreadable (more than "
                f"data.max_bad_fraction={self.settings.max_bad_fraction}); fix the data or raise the limit"
            )

    # ------------------------------------------------------------ the loop
    def run(self) -> LoopState:
        """Train from the current state to the stop step: epochs, then a final evaluation and
        checkpoint. A preemption signal ends it with :class:`Preempted` after a checkpoint."""
        s, st = self.settings, self.state
        if st.step >= s.stop_step:
            log.info("nothing to do: the run is at step %d of %d", st.step, s.stop_step)
            return st
        self._micro_per_epoch = s.steps_per_epoch * s.accum
        self._progress = Progress(s.stop_step, st.step, s.progress, enabled=self.dist.is_main)
        self._loss_sum = torch.zeros((), device=self.dist.device)
        self._reset_throughput()
        self.model.train()
        try:
            with PreemptionGuard() as guard:
                while st.step < s.stop_step:
                    self._run_epoch(guard)
                    if st.batch_in_epoch >= self._micro_per_epoch:
                        self._end_epoch()
            self._evaluate(final=True)
            self.save()
        finally:
            self._progress.close()
        return st

    def _run_epoch(self, guard: PreemptionGuard) -> None:
        """Micro-batches from the current position to the epoch's end or the stop step."""
        s, st = self.settings, self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch * s.batch_size)
        for batch in self.loader:
            if st.batch_in_epoch >= self._micro_per_epoch:
                break
            if not self._train_micro_batch(batch):
                continue
            self._stop_if_preempted(guard)
            if st.step >= s.stop_step:
                break

    def _train_micro_batch(self, batch: tuple) -> bool:
        """Forward and backward of one micro-batch and, when it completes an accumulation,
        the optimizer step with its logging and callbacks. Returns whether a step was taken."""
        s, st = self.settings, self.state
        micro = st.batch_in_epoch
        if micro % s.accum == 0:
            set_lr(self.optimizer, cosine_lr(st.step, s.base_lr, s.min_lr, s.warmup_steps, s.total_steps))
        sync = (micro + 1) % s.accum == 0
        self._loss_sum += self._micro_step(batch, sync)
        n = batch[0].shape[0] * self.dist.world_size
        st.bad_images += int(batch[2].sum())
        st.seen_images += n
        self._imgs_since += n
        st.batch_in_epoch = micro + 1
        if not sync:
            return False
        loss, grad_norm = self._optimizer_step(self._loss_sum)
        st.step += 1
        self._after_step(loss, grad_norm)
        if st.step % s.log_every == 0:
            self._reset_throughput()
        self._loss_sum.zero_()
        for cb in s.callbacks:
            cb(self)
        return True

    def _stop_if_preempted(self, guard: PreemptionGuard) -> None:
        """After a step: if any rank caught a signal, every rank stops here, after a checkpoint."""
        if not all_reduce_max(guard.signum is not None, self.dist):
            return
        path = self.save()
        signum = guard.signum or signal.SIGTERM
        # Logged before the launcher's handler runs: submitit's exits the process.
        log.warning("caught %s: checkpoint of step %d in %s", signal.Signals(signum).name, self.state.step, path)
        guard.chain()
        raise Preempted(signum, self.state.step, path)

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.batch_in_epoch = 0
        if st.step < self.settings.stop_step:
            self._evaluate(final=False)
            self.save()
            self._reset_throughput()  # img/s counts training only

    def _reset_throughput(self) -> None:
        self._t_last, self._imgs_since = time.perf_counter(), 0

    def _after_step(self, loss: float, grad_norm: float) -> None:
        """Logging, data-quality check, task hook and periodic checkpoint after a step;
        ``loss`` is this rank's summed micro-batch loss."""
        s, st, progress = self.settings, self.state, self._progress
        self._check_data_quality()
        log_now = st.step % s.log_every == 0 or st.step >= s.stop_step
        # Collectives only on steps every rank agrees on (log steps); the bar between
        # log steps shows this rank's own loss.
        if log_now:
            loss = all_reduce_mean(self._loss_sum, self.dist)
        metrics = None
        if log_now or progress.bar is not None:
            elapsed = max(time.perf_counter() - self._t_last, 1e-9)
            metrics = {
                "step": st.step, "epoch": st.epoch,
                "loss": loss / s.accum,  # at log steps: the global batch's loss
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "images_per_s": self._imgs_since / elapsed,
                "bad_images": st.bad_images,
            }
            progress.update(st.step, metrics, log_now)
        if log_now and self.dist.is_main:
            self.metrics_file.write(metrics)
            self.tracker.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, st.step)
        self.task.after_step(self)
        if st.step % s.ckpt_every == 0 and st.step < s.stop_step:
            self.save()

