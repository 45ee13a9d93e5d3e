"""The training loop shared by pretraining and fine-tuning. One optimizer step reads top to bottom
in :meth:`TrainLoop._train_micro_batch`: fetch a micro-batch, forward and backward (accumulating
under ``no_sync``), the optimizer step, then the step's hooks (the ranks' agreement, logging, the
task's hook, the periodic checkpoint). The collaborators own the rest: :class:`StepSync` (signals,
unreadable files, write failures), :class:`Checkpointing`, :class:`StepLog`, :class:`StepReadback`.

The host does not wait for a step it has just queued: the step's loss, gradient norm and (DDP) the
ranks' flags are read one step later, and at once only where a value is needed (a log step, a
checkpoint, the end of the run). So a non-finite loss is caught one step late between log steps;
no checkpoint is written before the steps it holds have been checked.

What a batch means is the business of a *task* (``fcmae.pretrain.PretrainTask``,
``fcmae.finetune.ClassifyTask``): it turns a batch into a loss, and may act after a step
(reconstruction images) or at an epoch's end (evaluation).
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
from pathlib import Path
from typing import Callable

import torch

from ..loggers import format_metrics
from ..optim import cosine_lr, set_lr
from .checkpointing import Checkpointing
from .read_watch import HungRead, ReadInterrupted, ReadTimedOut, ReadWatch
from .readback import StepReadback
from .signals import Preempted, PreemptionGuard
from .state import LoopSettings, LoopState, LossDiverged, NonFiniteLoss
from .step_log import StepLog
from .step_sync import StepSync
from .task import RunParts, Task, TaskContext

log = logging.getLogger("fcmae")


class TrainLoop:
    def __init__(self, task: Task, parts: RunParts, settings: LoopSettings, state: LoopState, metrics_file):
        self.task = task
        self.model, self.raw_model = parts.model, parts.raw_model
        self.optimizer, self.scaler = parts.optimizer, parts.scaler
        self.loader, self.sampler = parts.loader, parts.sampler
        self.settings, self.state, self.dist = settings, state, parts.dist
        self.ckpt, self.metrics_file, self.tracker = parts.ckpt, metrics_file, parts.tracker
        self.config, self.run_dir = parts.config, Path(parts.run_dir)
        self.sync = StepSync(parts.dist, settings.max_bad_fraction)
        self.checkpoints = Checkpointing(task, parts, settings, state, self.sync)
        self.step_log = StepLog(settings, state, parts.dist, parts.optimizer, metrics_file, parts.tracker, self.sync)
        self.readback = StepReadback(parts.dist.device)
        self.context = TaskContext(state, settings, parts.dist, parts.raw_model, parts.optimizer, self.run_dir,
                                   parts.tracker, self.save, self.write_output)  # what tasks and callbacks see
        self._last_read: tuple[float, float] | None = None  # the newest (loss, grad norm) read

    # ------------------------------------------------------------ what tasks call
    def state_dict(self) -> dict:
        return self.checkpoints.record().to_dict()

    def save(self, name: str | None = None) -> Path | None:
        self.readback.drain()  # the steps a checkpoint holds are checked before it is written
        return self.checkpoints.save(name)

    def write_output(self, write: Callable[[], object]) -> None:
        self.sync.write_output(write)

    def log_metrics(self, metrics: dict) -> None:
        self.step_log.metrics(metrics)

    # ------------------------------------------------------------ the run
    def run(self) -> LoopState:
        """Train from the current state to the stop step: epochs, then a final evaluation and
        checkpoint. A preemption signal ends it with :class:`Preempted` after a checkpoint."""
        s, st = self.settings, self.state
        if st.step >= s.stop_step and st.finished:
            self._say_nothing_to_do()
            return st
        if st.step >= s.stop_step:  # stopped by a signal in its last step: finish what it skipped
            log.info("the run reached step %d before its final evaluation: running it now", st.step)
            self._evaluate(final=True)
            st.finished = True
            self.save()
            return st
        self._say_where_it_continues()
        st.finished = False
        self._micro_per_epoch = s.steps_per_epoch * s.accum
        self._loss_sum = torch.zeros((), device=self.dist.device)
        self.step_log.open()
        self.model.train()
        try:
            with PreemptionGuard() as guard:
                self.sync.start(guard)
                self.read_watch = ReadWatch(guard, self.settings.read_timeout, interruptible=not self.dist.enabled)
                self._train_to_stop_step(guard)
                # A signal from here on waits for the final evaluation and checkpoint: the run is done.
                self._evaluate(final=True)
                st.finished = True
                self.save()
                if guard.signum is not None:
                    log.warning("caught %s during the final evaluation; the run is complete",
                                signal.Signals(guard.signum).name)
        finally:
            self.readback.clear()
            self.step_log.close()
        return st

    def _train_to_stop_step(self, guard: PreemptionGuard) -> None:
        st = self.state
        while st.step < self.settings.stop_step:
            self._run_epoch()
            self.readback.drain()  # an epoch's end, a stop or the stop step: every step checked
            if self.sync.stop_signal is None and st.batch_in_epoch >= self._micro_per_epoch:
                self._end_epoch()
                self.sync.after_step(st)  # evaluation takes a while: a signal during it stops here
            if self.sync.stop_signal is not None:
                self._stop(self.sync.stop_signal, guard)

    def _say_nothing_to_do(self) -> None:
        s, st = self.settings, self.state
        if s.stop_step < s.total_steps:
            log.info("nothing to do: the run is at step %d, its trainer.max_steps; to train further, raise "
                     "trainer.max_steps (up to %d, the end of its schedule, it continues on the same cosine; "
                     "beyond, the cosine stretches to end there)", st.step, s.total_steps)
        else:
            log.info("nothing to do: the run is at step %d, the end of its schedule; to train further, raise "
                     "trainer.max_steps (the cosine schedule then stretches to end there: a warm restart)", st.step)

    def _say_where_it_continues(self) -> None:
        s, st = self.settings, self.state
        if st.step == 0:
            return
        lr = cosine_lr(st.step, s.base_lr, s.min_lr, s.warmup_steps, s.total_steps)
        if st.finished and s.stretched:  # a finished run made longer: its lr rises to the stretched curve's
            log.info("continuing the finished run at step %d on a schedule stretched to end at step %d: a warm "
                     "restart, the lr rises again to %.3e", st.step, s.total_steps, lr)
        else:
            log.info("continuing at step %d: lr %.3e on a schedule that ends at step %d", st.step, lr, s.total_steps)

    def _run_epoch(self) -> None:
        """Micro-batches from the current position to the epoch's end, the stop step, or a
        stop signal (seen by any rank)."""
        s, st = self.settings, self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch * s.batch_size)
        self._epoch_start = st.batch_in_epoch
        batches = iter(self.loader)
        while st.batch_in_epoch < self._micro_per_epoch:
            batch = self._fetch(batches)
            if batch is None:
                break
            if not self._train_micro_batch(batch):
                continue
            if self.sync.stop_signal is not None or st.step >= s.stop_step:
                break

    def _fetch(self, batches):
        """The next micro-batch (None at the loader's end, or when a stop signal interrupted the wait),
        under the read watch (:mod:`fcmae.engine.read_watch`): a hung read is a :class:`HungRead`."""
        try:
            with self.read_watch.fetch():
                return next(batches)
        except StopIteration:
            return None
        except ReadInterrupted as stop:
            self._drop_partial_step()
            self.sync.agree_to_stop(True)
            log.warning("caught %s while waiting for a batch: stopping now", signal.Signals(stop.signum).name)
            return None
        except ReadTimedOut:
            self._drop_partial_step()
            self._hung_read()

    def _drop_partial_step(self) -> None:
        """Back to the last whole step: the micro-batches of a step not taken are read again on resume."""
        st = self.state
        st.batch_in_epoch -= st.batch_in_epoch % self.settings.accum
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum.zero_()

    def _hung_read(self) -> None:
        """No batch within ``data.read_timeout``: checkpoint the last whole step (one process: no rank is
        left in a collective) and say what was read (the run's assembly then kills the workers: one may be
        blocked for good)."""
        s, st = self.settings, self.state
        path = None
        if not self.dist.enabled:
            self.readback.drain()
            path = self.checkpoints.saved_now()
        consumed = st.batch_in_epoch - self._epoch_start
        files = self._describe_batch(consumed * s.batch_size, s.batch_size)
        raise HungRead(f"no batch arrived in {s.read_timeout:g} s (data.read_timeout): a read hangs (a stalled network "
                       f"mount, a FIFO or device file among the images, a file that never ends); the batch being read "
                       f"holds {files}. "
                       + (f"Checkpoint of step {st.step}: {path}. " if path else "")
                       + "Fix or remove the file (or raise data.read_timeout for slow storage), then run the same "
                         "command to resume") from None

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.batch_in_epoch = 0
        if st.step < self.settings.stop_step:
            self._evaluate(final=False)
            self.save()
            self.step_log.reset_throughput()  # img/s counts training only

    def _evaluate(self, final: bool) -> None:
        metrics = self.task.evaluate(self.context, final)
        if metrics:
            self.log_metrics(metrics)
            if self.dist.is_main:
                log.info("eval at step %d: %s", self.state.step, format_metrics(metrics))

    def _stop(self, signum: int, guard: PreemptionGuard) -> None:
        """Every rank stops here, after a checkpoint, with :class:`Preempted`; a signal caught in
        the last step lets the run finish instead (its final evaluation is short). Every step has
        been read by now (:meth:`_train_to_stop_step` drains before it stops)."""
        path = self.checkpoints.saved_now()
        # Logged before the launcher's handler runs: submitit's exits the process. Rank 0 wrote it.
        if self.dist.is_main:
            log.warning("caught %s: checkpoint of step %d in %s", signal.Signals(signum).name, self.state.step, path)
        guard.signum = signum
        guard.chain()
        raise Preempted(signum, self.state.step, path)

    # ------------------------------------------------------------ one optimizer step
    def _train_micro_batch(self, batch: tuple) -> bool:
        """Forward and backward of one micro-batch and, when it completes an accumulation,
        the optimizer step and its hooks. Returns whether a step was taken."""
        s, st = self.settings, self.state
        micro = st.batch_in_epoch
        if micro % s.accum == 0:
            self._scheduled_lr = cosine_lr(st.step, s.base_lr, s.min_lr, s.warmup_steps, s.total_steps)
            set_lr(self.optimizer, self._scheduled_lr)
        completes_step = (micro + 1) % s.accum == 0
        self._loss_sum += self._forward_backward(batch, completes_step)
        self._count(batch)
        st.batch_in_epoch = micro + 1
        if not completes_step:
            return False
        grad_norm = self._optimizer_step()
        st.step += 1
        self._after_step(grad_norm)
        self._loss_sum.zero_()
        for cb in s.callbacks:
            cb(self.context)
        return True

    def _count(self, batch: tuple) -> None:
        """Images seen (all ranks) and this rank's unreadable files (agreed on after the step)."""
        n = batch.images.shape[0] * self.dist.world_size
        self.sync.bad_local += int(batch.bad.sum())
        self.state.seen_images += n
        self.step_log.count_images(n)

    def _autocast(self):
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.dist.device.type, dtype=dtype)

    def _forward_backward(self, batch, sync_grads: bool) -> torch.Tensor:
        """The micro-batch's loss, its gradient accumulated (all-reduced only on the step's last one)."""
        ctx = contextlib.nullcontext() if sync_grads or not self.dist.enabled else self.model.no_sync()
        with ctx:
            with self._autocast():
                loss = self.task.loss(self.model, batch, self.dist.device)
            scaled = loss / self.settings.accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, update. Returns the gradient norm, on the device: it is read a step later
        with the loss (:meth:`_check_step`), so the host does not wait here. (With fp16 the
        GradScaler reads its overflow flag every step: that wait is its own.)"""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.clip_grad if self.settings.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _after_step(self, grad_norm: torch.Tensor) -> None:
        """The step's hooks, in order: its values queued for the host (read now where the step is
        logged or checkpointed, else a step later), the ranks' agreement, the step's report, the
        task's hook, the periodic checkpoint."""
        st, s = self.state, self.settings
        values = torch.stack([self._loss_sum.float(), grad_norm.float().to(self._loss_sum.device)])
        flags = self.sync.reduced_flags()  # DDP: read with the values
        if flags is not None:
            values = torch.cat([values, flags])
        self.readback.put(st.step, values, self._check_step)
        if flags is None:  # one process: the flags are host values already
            self.sync.after_step(st)
            self.sync.check_data_quality(st)
        log_now = st.step % s.log_every == 0 or st.step >= s.stop_step
        save_now = self.checkpoints.due()
        if log_now or save_now:
            self.readback.drain()
        else:
            self.readback.ready()  # the previous step's values: the device has run (or is running) it
        loss, norm = self._last_read if self._last_read is not None else (None, None)
        self.step_log.step(self._loss_sum, loss, norm, self._scheduled_lr)
        self.task.after_step(self.context)
        if save_now:
            self.save()
        if st.step % s.log_every == 0:
            self.step_log.reset_throughput()

    def _check_step(self, step: int, values: list[float]) -> None:
        """A step's values, read on the host: its loss (summed over micro-batches) and gradient
        norm, then (DDP) the ranks' flags. A non-finite loss stops the run; with fp16 the scaler
        owns non-finite gradients (it skips the step)."""
        loss, norm = values[0], values[1]
        self._watch_loss(step, loss / self.settings.accum)
        # Grads are all-reduced, so a NaN on any rank shows in every rank's norm: all ranks stop together.
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(norm)):
            blowup = self.state.blowup_step if self.state.blowup_step is not None else step
            raise NonFiniteLoss(f"non-finite loss ({loss / self.settings.accum}) or gradient norm ({norm}) "
                                f"at step {step}", step, blowup)
        self._last_read = (loss, norm)
        if len(values) > 2:
            self.sync.apply(self.state, *values[2:])
            self.sync.check_data_quality(self.state)

    def _describe_batch(self, start: int, size: int) -> str:
        """The files of the ``size`` samples from position ``start`` of this epoch's order, in words."""
        keys = list(self.sampler)[start:start + size]
        describe = getattr(getattr(self.sampler, "dataset", None), "describe_key", None)
        if not keys or describe is None:
            return f"samples {keys[:8]}"
        return ", ".join(describe(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    def _watch_loss(self, step: int, loss: float) -> None:
        """The divergence rules (:meth:`LoopState.watch_loss`): a warning when the loss leaves its range
        and when it comes back; past ``trainer.divergence_stop`` times its lowest, a stop (at once in one
        process; under DDP with the ranks' next agreement, so that every rank stops together)."""
        st, bound = self.state, self.settings.divergence_stop
        event = st.watch_loss(step, loss)
        if not math.isfinite(loss):
            return
        if event == "left" and self.dist.is_main:
            log.warning("step %d: loss %.4g is %.3gx the run's lowest (%.4g): it left its range (a blow-up or a bad "
                        "batch); checkpoints from here on are not called good until it comes back%s", step, loss,
                        loss / max(st.loss_floor, 1e-12), st.loss_floor,
                        f"; the run stops past {bound:g}x (trainer.divergence_stop)" if bound else "")
        elif event == "recovered" and self.dist.is_main:
            first, _, peak = st.spikes[-1]
            log.warning("step %d: the loss is back in its range after the spike from step %d (peak %.4g); "
                        "checkpoints from here on are good again", step, first, peak)
        floor = st.loss_floor or 0.0
        if bound is not None and st.past(loss, bound):
            self.sync.diverged(LossDiverged(
                f"the loss diverged: {loss:.4g} at step {step} is {loss / max(floor, 1e-12):.3g}x the run's lowest "
                f"({floor:.4g}), past trainer.divergence_stop={bound:g}", step,
                st.blowup_step if st.blowup_step is not None else step))
