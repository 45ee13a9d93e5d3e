"""What a step reports: the loss (the global batch's at log steps), the lr (with its spread under
layer decay), the gradient norm, throughput since the last log step and the unreadable files, to
the progress bar, the metrics file and the tracker (rank 0)."""
from __future__ import annotations

import logging
import time

import torch

from ..distributed import DistInfo, all_reduce_mean
from ..loggers import Progress
from .state import LoopSettings, LoopState
from .step_sync import StepSync

log = logging.getLogger("fcmae")


class StepLog:
    def __init__(self, settings: LoopSettings, state: LoopState, dist: DistInfo, optimizer, metrics_file, tracker,
                 sync: StepSync):
        self.settings, self.state, self.dist, self.optimizer = settings, state, dist, optimizer
        self.metrics_file, self.tracker, self.sync = metrics_file, tracker, sync
        self.progress: Progress | None = None
        self.first_step_said = False
        self.reset_throughput()
        self.t_open = self.t_last

    def open(self) -> None:
        self.progress = Progress(self.settings.stop_step, self.state.step, self.settings.progress,
                                 enabled=self.dist.is_main)
        self.reset_throughput()
        self.t_open = self.t_last

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def reset_throughput(self) -> None:
        self.t_last, self.images_since = time.perf_counter(), 0

    def count_images(self, n: int) -> None:
        self.images_since += n

    def step(self, loss_sum: torch.Tensor, loss: float | None, grad_norm: float | None, lr: float) -> None:
        """Report a step. ``loss`` and ``grad_norm`` are the newest this rank has read (this step's at
        log steps, else the previous step's: the loop reads a step late; None before the first);
        ``loss`` is the summed micro-batch loss. At log steps (which every rank agrees on, so a
        collective is safe) the global batch's mean replaces it."""
        s, st = self.settings, self.state
        log_now = st.step % s.log_every == 0 or st.step >= s.stop_step
        if not self.first_step_said:
            self.first_step_said = True
            if self.dist.is_main and not log_now:  # a sign of life before the first log step
                following = (st.step // s.log_every + 1) * s.log_every
                log.info("step %d done in %.1f s (the first includes start-up: the loader's first batches, any "
                         "compile); the loss is logged every %d steps (trainer.log_every), next at step %d", st.step,
                         time.perf_counter() - self.t_open, s.log_every, min(following, s.stop_step))
        if log_now:
            loss = all_reduce_mean(loss_sum, self.dist)
        if not (log_now or self.progress.bar is not None) or loss is None:
            return
        elapsed = max(time.perf_counter() - self.t_last, 1e-9)
        metrics = {
            "step": st.step, "epoch": st.epoch,
            "loss": loss / s.accum,
            **self.lr_metrics(lr),
            "grad_norm": grad_norm,
            "images_per_s": self.images_since / elapsed,
            "bad_images": st.bad_images,
        }
        self.progress.update(st.step, metrics, log_now)
        if log_now and self.dist.is_main:
            self.sync.write_output(lambda: self.metrics_file.write(metrics))
            self.sync.write_output(lambda: self.tracker.log(
                {f"train/{k}": v for k, v in metrics.items() if k != "step"}, st.step))

    def lr_metrics(self, lr: float) -> dict:
        """``lr``: the schedule's value at this step; with layer decay (groups scaled by
        ``lr_scale``) also the smallest and largest group lr, ``lr_min`` / ``lr_max``."""
        groups = self.optimizer.param_groups
        out = {"lr": lr}
        if any(g.get("lr_scale", 1.0) != 1.0 for g in groups):
            lrs = [g["lr"] for g in groups]
            out.update(lr_min=min(lrs), lr_max=max(lrs))
        return out

    def metrics(self, metrics: dict) -> None:
        """Write ``metrics`` (an evaluation's; main rank) to the metrics file and the tracker."""
        if not metrics or not self.dist.is_main:
            return
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.sync.write_output(lambda: self.metrics_file.write(record))
        self.sync.write_output(lambda: self.tracker.log({k: v for k, v in record.items() if k != "step"},
                                                        self.state.step))
