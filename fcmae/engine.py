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

from .checkpoint import CheckpointManager, capture_rng, non_finite_tensors
from .files import DiskWriteError
from .distributed import DistInfo, all_gather_objects, all_reduce_max_tensor, all_reduce_mean, all_reduce_sum
from .loggers import Progress, format_metrics
from .optim import cosine_lr, set_lr

log = logging.getLogger("fcmae")

# Signals that end a run cleanly: a checkpoint at the next step boundary, then exit 128 + signal.
# SIGTERM: Slurm's time limit, scancel, preemption, `timeout`, most process managers;
# SIGUSR1/SIGUSR2: Slurm's --signal warning; SIGINT: Ctrl-C (a second one exits at once).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class NonFiniteLoss(RuntimeError):
    """The loss, gradient or weights stopped being finite at ``step``; ``blowup_step`` is the first
    step whose loss had already left its sane range (the weights that fed it were bad)."""

    def __init__(self, message: str, step: int = 0, blowup_step: int | None = None):
        super().__init__(message)
        self.step, self.blowup_step = step, blowup_step


# A step's loss past this many times the lowest loss of the run (and at least this far above it) is
# taken as the start of a blow-up: checkpoints whose weights fed such a step are not "good".
BLOWUP_FACTOR = 10.0


class Preempted(RuntimeError):
    def __init__(self, signum: int, step: int, path: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path


class DataQualityError(RuntimeError):
    pass


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a flag the loop checks after each optimizer
    step, so the checkpoint is written at a clean step boundary. A second SIGINT raises
    KeyboardInterrupt at once (a write in progress removes its temporary file). Handlers that
    were installed before (e.g. submitit's requeue on SIGUSR2) are called after the checkpoint.

    Guards nest: the apps hold one from their start (``runner.hydra_entry``), so a signal that
    arrives while data and model are still being set up (a Slurm warning due early) is not lost:
    the loop's own guard inherits it and stops after the first step, with a checkpoint."""

    _active: "PreemptionGuard | None" = None

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}  # what to restore on exit
        self.launcher: dict[int, object] = {}  # the handlers from before any guard: chained to

    def __enter__(self):
        self._outer = PreemptionGuard._active
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        self.launcher = self._outer.launcher if self._outer is not None else dict(self.previous)
        if self._outer is not None:
            self.signum = self._outer.signum
        PreemptionGuard._active = self
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGINT:
                log.warning("caught SIGINT: stopping after this step's checkpoint (Ctrl-C again to exit at once)")

    def chain(self) -> None:
        """Call the launcher's handler for the signal (from before any guard), if it was a real one."""
        prev = self.launcher.get(self.signum)
        if callable(prev) and prev is not signal.default_int_handler:
            prev(self.signum, None)

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        PreemptionGuard._active = self._outer
        if self._outer is not None and self._outer.signum is None:
            self._outer.signum = self.signum  # seen, whether acted on or not
        return False


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_images: int = 0  # over all ranks
    seen_images: int = 0  # over all ranks
    finished: bool = False  # the final evaluation and checkpoint of stop_step are done
    loss_floor: float | None = None  # the lowest step loss so far (this rank's), for the blow-up bound
    blowup_step: int | None = None  # the first step whose loss passed the bound (None: none yet)

    def watch_loss(self, step: int, loss: float) -> None:
        """Track the lowest loss and the first step whose loss blew past ``BLOWUP_FACTOR`` times it."""
        if self.blowup_step is None and (not math.isfinite(loss) or (
                self.loss_floor is not None and loss > max(BLOWUP_FACTOR * self.loss_floor,
                                                           self.loss_floor + BLOWUP_FACTOR))):
            self.blowup_step = step
        if math.isfinite(loss) and (self.loss_floor is None or loss < self.loss_floor):
            self.loss_floor = loss


@dataclass
class LoopSettings:
    total_steps: int  # schedule length: epochs * steps_per_epoch, or max_steps when larger
    stop_step: int  # max_steps if given, else total_steps
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
    stretched: bool = False  # trainer.max_steps lies beyond trainer.epochs: the cosine ends at max_steps


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
        self._write_failure: DiskWriteError | None = None  # rank 0's, until the next collective
        self._saved_step: int | None = None  # the step of this process's last numbered checkpoint
        self._saved_path: Path | None = None

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
            "finished": self.state.finished,
            "loss_floor": self.state.loss_floor,
            "blowup_step": self.state.blowup_step,
            "rng": all_gather_objects(capture_rng(), self.dist),
            "world_size": self.dist.world_size,
            "effective_batch": self.settings.batch_size * self.settings.accum * self.dist.world_size,
            "config": self.config,
            **self.task.state_dict(),
        }

    def save(self, name: str | None = None) -> Path | None:
        """Checkpoint the run: numbered (and ``last.pt``), or under ``name`` (e.g. ``best.pt``)
        when given. Call on every rank (the RNG states are gathered); rank 0 writes. A failed
        write (this one, or an earlier image or log line) stops every rank at this point, none
        left waiting in a collective; a stop signal caught while writing stops the run right after
        it. Weights or optimizer state that are not finite are never written."""
        state = self.state_dict()
        self._check_finite(state)
        path, failure = None, None
        if self.dist.is_main:
            try:
                path = self.ckpt.save(state, self.state.step) if name is None else self.ckpt.save_as(state, name)
            except DiskWriteError as exc:
                failure = exc
        del state
        failure = failure or self._write_failure
        guard = getattr(self, "_guard", None)
        flags = torch.tensor([float(failure is not None), float(guard is not None and guard.signum is not None)],
                             device=self.dist.device)
        failed, stop = all_reduce_max_tensor(flags, self.dist).tolist()
        if failed:
            self._raise_write_failure(failure)
        if path is not None:
            log.info("saved checkpoint %s (step %d)", path, self.state.step)
        if name is None:
            self._saved_step = self.state.step
            self._saved_path = path
        if stop and getattr(self, "_preempt_signal", 0) is None:
            self._preempt_signal = guard.signum or signal.SIGTERM  # acted on now, not after another step
        return path

    @staticmethod
    def _raise_write_failure(failure: DiskWriteError | None) -> None:
        """Rank 0 raises its own error; the others one that points to it."""
        raise failure or DiskWriteError("rank 0 could not write to the run directory (its log says why); every "
                                        "rank stops here")

    def _check_finite(self, state: dict) -> None:
        """Every rank holds the same weights and optimizer state (DDP), so every rank decides alike."""
        bad = non_finite_tensors(state["model"])
        bad += [f"optimizer.{k}" for k in non_finite_tensors(state["optimizer"].get("state", {}))]
        if bad:
            st = self.state
            blowup = st.blowup_step if st.blowup_step is not None else st.step + 1
            raise NonFiniteLoss(f"the weights or optimizer state after step {st.step} are not finite "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); they were not saved",
                                st.step + 1, min(blowup, st.step + 1))

    def write_output(self, write: Callable[[], object]) -> None:
        """Run one of rank 0's writes (an image, a log line). A refusal by the disk stops the run: at
        once in one process; under DDP at the next collective (a step's sync or a save), so that
        every rank stops together."""
        try:
            write()
        except DiskWriteError as exc:
            if not self.dist.enabled:
                raise
            self._write_failure = self._write_failure or exc

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
        step = self.state.step + 1
        self.state.watch_loss(step, loss / self.settings.accum)
        # Grads are all-reduced, so a NaN on any rank shows in every rank's norm: all ranks
        # stop together. With fp16 the scaler owns non-finite grads (it skips the step).
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            blowup = self.state.blowup_step if self.state.blowup_step is not None else step
            raise NonFiniteLoss(f"non-finite loss ({loss / self.settings.accum}) or gradient norm ({norm}) "
                                f"at step {step}", step, blowup)
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
        self.write_output(lambda: self.metrics_file.write(record))
        self.write_output(lambda: self.tracker.log({k: v for k, v in record.items() if k != "step"}, self.state.step))

    def _evaluate(self, final: bool) -> None:
        metrics = self.task.evaluate(self, final)
        if metrics:
            self.log_metrics(metrics)
            if self.dist.is_main:
                log.info("eval at step %d: %s", self.state.step, format_metrics(metrics))

    def _check_data_quality(self) -> None:
        """Every rank holds the same global counts here, so every rank decides alike."""
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
        if st.step >= s.stop_step and st.finished:
            if s.stop_step < s.total_steps:
                log.info("nothing to do: the run is at step %d, its trainer.max_steps; to train further, raise "
                         "trainer.max_steps (up to %d, the end of its schedule, it continues on the same cosine; "
                         "beyond, the cosine stretches to end there)", st.step, s.total_steps)
            else:
                log.info("nothing to do: the run is at step %d, the end of its schedule; to train further, raise "
                         "trainer.max_steps (the cosine schedule then stretches to end there: a warm restart)", st.step)
            return st
        if st.step >= s.stop_step:  # stopped by a signal in its last step: finish what it skipped
            log.info("the run reached step %d before its final evaluation: running it now", st.step)
            self._evaluate(final=True)
            st.finished = True
            self.save()
            return st
        if st.step > 0:
            lr = cosine_lr(st.step, s.base_lr, s.min_lr, s.warmup_steps, s.total_steps)
            if st.finished and s.stretched:  # a finished run made longer: its lr rises to the stretched curve's
                log.info("continuing the finished run at step %d on a schedule stretched to end at step %d: a warm "
                         "restart, the lr rises again to %.3e", st.step, s.total_steps, lr)
            else:
                log.info("continuing at step %d: lr %.3e on a schedule that ends at step %d", st.step, lr,
                         s.total_steps)
        st.finished = False
        self._micro_per_epoch = s.steps_per_epoch * s.accum
        self._progress = Progress(s.stop_step, st.step, s.progress, enabled=self.dist.is_main)
        self._loss_sum = torch.zeros((), device=self.dist.device)
        self._bad_local = 0  # this rank's unreadable files since the last step's all-reduce
        self._preempt_signal: int | None = None
        self._reset_throughput()
        self.model.train()
        try:
            with PreemptionGuard() as guard:
                self._guard = guard
                while st.step < s.stop_step:
                    self._run_epoch()
                    if self._preempt_signal is None and st.batch_in_epoch >= self._micro_per_epoch:
                        self._end_epoch()
                        self._sync_step()  # evaluation takes a while: a signal during it stops here
                    if self._preempt_signal is not None:
                        self._stop(self._preempt_signal, guard)
                # A signal from here on waits for the final evaluation and checkpoint: the run is done.
                self._evaluate(final=True)
                st.finished = True
                self.save()
                if guard.signum is not None:
                    log.warning("caught %s during the final evaluation; the run is complete",
                                signal.Signals(guard.signum).name)
        finally:
            self._progress.close()
        return st

    def _run_epoch(self) -> None:
        """Micro-batches from the current position to the epoch's end, the stop step, or a
        stop signal (seen by any rank)."""
        s, st = self.settings, self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch * s.batch_size)
        for batch in self.loader:
            if st.batch_in_epoch >= self._micro_per_epoch:
                break
            if not self._train_micro_batch(batch):
                continue
            if self._preempt_signal is not None or st.step >= s.stop_step:
                break

    def _train_micro_batch(self, batch: tuple) -> bool:
        """Forward and backward of one micro-batch and, when it completes an accumulation,
        the optimizer step with its logging and callbacks. Returns whether a step was taken."""
        s, st = self.settings, self.state
        micro = st.batch_in_epoch
        if micro % s.accum == 0:
            self._scheduled_lr = cosine_lr(st.step, s.base_lr, s.min_lr, s.warmup_steps, s.total_steps)
            set_lr(self.optimizer, self._scheduled_lr)
        sync = (micro + 1) % s.accum == 0
        self._loss_sum += self._micro_step(batch, sync)
        n = batch[0].shape[0] * self.dist.world_size
        self._bad_local += int(batch[2].sum())
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

    def _sync_step(self) -> None:
        """After a step, one all-reduce under DDP: the unreadable files of every rank (so the
        count, the limit and the stop are global) and whether any rank caught a stop signal."""
        guard = self._guard
        bad, stop, failed = self._bad_local, guard.signum is not None, self._write_failure is not None
        if self.dist.enabled:
            flags = torch.tensor([float(bad), float(stop), float(failed)], device=self.dist.device)
            bad, stop, failed = all_reduce_sum(flags, self.dist).tolist()
        if failed:
            self._raise_write_failure(self._write_failure)
        self.state.bad_images += int(bad)
        self._bad_local = 0
        if stop and self._preempt_signal is None:
            self._preempt_signal = guard.signum or signal.SIGTERM

    def _stop(self, signum: int, guard: PreemptionGuard) -> None:
        """Every rank stops here, after a checkpoint, with :class:`Preempted`; a signal caught in
        the last step lets the run finish instead (its final evaluation is short)."""
        # A signal caught while this step's periodic checkpoint was written: that one stands.
        path = self._saved_path if self._saved_step == self.state.step else self.save()
        # Logged before the launcher's handler runs: submitit's exits the process.
        log.warning("caught %s: checkpoint of step %d in %s", signal.Signals(signum).name, self.state.step, path)
        guard.signum = signum
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
        self._sync_step()
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
                **self._lr_metrics(),
                "grad_norm": grad_norm,
                "images_per_s": self._imgs_since / elapsed,
                "bad_images": st.bad_images,
            }
            progress.update(st.step, metrics, log_now)
        if log_now and self.dist.is_main:
            self.write_output(lambda: self.metrics_file.write(metrics))
            self.write_output(lambda: self.tracker.log({f"train/{k}": v for k, v in metrics.items() if k != "step"},
                                                       st.step))
        self.task.after_step(self)
        if st.step % s.ckpt_every == 0 and st.step < s.stop_step and self._preempt_signal is None:
            self.save()

    def _lr_metrics(self) -> dict:
        """``lr``: the schedule's value at this step; with layer decay (groups scaled by
        ``lr_scale``) also the smallest and largest group lr, ``lr_min`` / ``lr_max``."""
        groups = self.optimizer.param_groups
        scales = [g.get("lr_scale", 1.0) for g in groups]
        out = {"lr": self._scheduled_lr}
        if any(sc != 1.0 for sc in scales):
            lrs = [g["lr"] for g in groups]
            out.update(lr_min=min(lrs), lr_max=max(lrs))
        return out

