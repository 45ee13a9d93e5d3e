"""The shared assembly of a training run (:func:`run_app`): one place, one order, for every app.
An :class:`App` says what differs (its data, model, initial weights, optimizer, task, the keys
that must match on resume, its start and end lines); the rest (validation, DDP, the lock, the
resume decision, seeding, compile, trackers, the loop, the report of a divergence) is here."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf

from ..storage.checkpoint import numbered_checkpoints
from ..storage.checkpoint_store import CheckpointManager
from ..data import shutdown_workers
from ..data.loaders import kill_workers
from ..distributed import DistInfo, cleanup, init_distributed
from ..engine import LoopSettings, LoopState, NonFiniteLoss, Preempted, PreemptionGuard, RunParts, Task, TrainLoop
from ..engine.read_watch import ReadInterrupted, ReadWatch
from ..storage.files import write_atomic
from ..loggers import Loggers, MetricsFile, NullLogger, TensorBoardLogger, WandbLogger
from ..storage.run_lock import RunLock
from .resume import RunSetup, commit_resume, prepare_run, restore_or_seed
from .resume_checks import check_resolved_data
from .seeding import seed_everything
from .settings import loop_settings

log = logging.getLogger("fcmae")


@dataclass
class RunData:
    """What an app's data stage hands on: the training loader and its sampler, the config with every
    value the data resolved (``data.mean=auto`` statistics, the class count: a new object, never the
    caller's mutated), and whatever the app's later stages need (an evaluator, a val loader)."""
    cfg: Any
    loader: Any
    sampler: Any
    extras: dict = field(default_factory=dict)


class App(Protocol):
    """What one training app (``fcmae-pretrain``, ``fcmae-finetune``) adds to the shared run."""

    resume_rules: dict  # what a resume does with each changed key (fcmae.config.resume_rules)

    def validate(self, cfg) -> None: ...

    def evaluate_only(self, cfg, run_dir: Path, info: DistInfo) -> Any: ...  # eval_only=true

    def build_data(self, cfg, info: DistInfo) -> RunData: ...  # first: bad data fails before a model exists

    def build_model(self, cfg, data: RunData, info: DistInfo, precision: str,
                    run_dir: Path | None = None) -> torch.nn.Module: ...  # on device; run_dir: for choices it records

    def load_initial_weights(self, model: torch.nn.Module, cfg, info: DistInfo) -> None: ...  # a fresh start only

    def build_task(self, cfg, model: torch.nn.Module, data: RunData) -> Task: ...

    def build_optimizer(self, cfg, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer: ...

    def describe(self, cfg, run_dir: Path, setup: RunSetup, settings: LoopSettings, info: DistInfo) -> str: ...

    def summary(self, final: LoopState, setup: RunSetup, task: Task, run_dir: Path) -> str: ...

    # Optional: ``memory_plan(cfg, model, info)`` logs the step's memory plan on rank 0 before the
    # run and returns a loop callback that checks it (or None); pretraining has one.


def run_app(app: App, cfg, run_dir: str | Path, callbacks=()):
    """Validate, join the process group, then evaluate (``eval_only``) or train in ``run_dir`` under
    its lock; returns the final loop state (or the evaluation's result)."""
    app.validate(cfg)
    run_dir = Path(run_dir)
    info = init_distributed(cfg.trainer.device)
    try:
        if cfg.eval_only:
            return app.evaluate_only(cfg, run_dir, info)
        lock = RunLock(run_dir)  # taken by rank 0 in prepare_run, held until the run ends
        try:
            return _train(app, cfg, run_dir, info, list(callbacks), lock)
        finally:
            lock.release()
    finally:
        cleanup()


def _train(app: App, cfg, run_dir: Path, info: DistInfo, callbacks, lock: RunLock) -> LoopState:
    setup = prepare_run(cfg, run_dir, info, lock, app.resume_rules)
    data = _build_data(app, cfg, info, setup)
    cfg = data.cfg
    if setup.resume is not None:
        check_resolved_data(setup.resume.path, setup.resume.record, cfg, app.resume_rules,
                            len(data.sampler.dataset), info)
    commit_resume(setup, run_dir, info)  # every check passed: only now does the run directory change
    config = OmegaConf.to_container(cfg, resolve=True)  # saved in every checkpoint, resolved values included
    settings = loop_settings(cfg, len(data.sampler) // cfg.data.batch_size, setup.accum, setup.base_lr,
                             setup.precision, cfg.data.max_bad_fraction, callbacks)
    seed_everything(cfg.trainer.seed)
    model = app.build_model(cfg, data, info, setup.precision, run_dir)
    if setup.resume_path is None:
        app.load_initial_weights(model, cfg, info)
    task = app.build_task(cfg, model, data)
    optimizer = app.build_optimizer(cfg, model, setup.base_lr)
    planner = getattr(app, "memory_plan", None)  # optional: the step's memory, before it runs (pretraining)
    check = planner(cfg, model, info) if planner is not None and info.is_main else None
    if check is not None:
        settings = replace(settings, callbacks=[*settings.callbacks, check])
    state, scaler = restore_or_seed(setup, model, optimizer, info, cfg.trainer.seed, cfg.data.batch_size, task,
                                    _optimizer_as_saved(app, cfg, model, setup))
    train_model = wrap_model(model, cfg.trainer.compile, info)
    tracker = open_tracker(cfg, run_dir, config, info, setup.start_step)
    if info.is_main:
        log.info("%s", app.describe(cfg, run_dir, setup, settings, info))
    parts = RunParts(train_model, model, optimizer, scaler, data.loader, data.sampler, info, setup.ckpt, tracker,
                     config, run_dir)
    final = train(task, parts, settings, state)
    if info.is_main:
        spikes = final.describe_spikes()
        if spikes:  # a run that diverged and came back says so where its user looks last
            log.warning("%s; warning: %s: look at the loss curve (metrics.jsonl) before using these weights",
                        app.summary(final, setup, task, run_dir), spikes)
        else:
            log.info("%s", app.summary(final, setup, task, run_dir))
    return final


def _optimizer_as_saved(app: App, cfg, model, setup: RunSetup):
    """A builder of the optimizer the checkpoint's own config made (its parameter groups), for
    :func:`fcmae.run.resume.load_optimizer_state`; None on a fresh start or for a checkpoint without one."""
    saved = setup.resume.record.setting("optim") if setup.resume is not None else None
    if not saved:
        return None

    def build():
        old = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=True), {"optim": saved})
        return app.build_optimizer(old, model, setup.base_lr)
    return build


def _build_data(app: App, cfg, info: DistInfo, setup: RunSetup) -> RunData:
    """The app's data stage, where a stop signal interrupts a read that blocks (the first images are read
    to check their bands: on a stalled mount that read never returns). One process only: under DDP the
    other ranks would be left in a collective."""
    try:
        with ReadWatch(PreemptionGuard.current(), None, interruptible=not info.enabled).fetch():
            return app.build_data(cfg, info)
    except ReadInterrupted as stop:
        raise Preempted(stop.signum, setup.start_step, None) from None


def resolve_compile(setting, device: torch.device) -> bool:
    """``trainer.compile``: ``auto`` compiles on CUDA (about 2.3x the eager step for base on an
    H100) and stays eager on CPU, where compiling costs more than it saves in a short run."""
    value = str(setting).lower()
    return device.type == "cuda" if value == "auto" else value == "true"


def wrap_model(model: torch.nn.Module, compile, info: DistInfo) -> torch.nn.Module:
    """torch.compile (``trainer.compile``: auto | true | false), then DDP when distributed; the
    raw model keeps the state dict."""
    compile = resolve_compile(compile, info.device)
    if compile and info.is_main:
        log.info("torch.compile: on (trainer.compile=false to turn it off); the first steps compile the model, "
                 "about 1-2 minutes on a GPU, before the step time settles")
    train_model = torch.compile(model) if compile else model
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return train_model


def open_tracker(cfg, run_dir: Path, config: dict, info: DistInfo, start_step: int = 0):
    """Create the run directory, save the resolved config, start wandb and/or TensorBoard (main rank
    only): ``logger.name`` is ``none``, ``wandb``, ``tensorboard`` or ``wandb+tensorboard``."""
    if not info.is_main:
        return NullLogger()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(config), tmp), "config")
    loggers = []
    for name in cfg.logger.name.split("+"):
        if name == "wandb":
            loggers.append(WandbLogger(cfg.logger, cfg.run_name, config, run_dir))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, purge_step=start_step + 1 if start_step else None))
    return Loggers(loggers) if len(loggers) > 1 else (loggers[0] if loggers else NullLogger())


def train(task: Task, parts: RunParts, settings: LoopSettings, state: LoopState) -> LoopState:
    """Run the loop; a non-finite loss is reported with the last good checkpoint."""
    loop = TrainLoop(task, parts, settings, state, MetricsFile(parts.run_dir))
    ckpt, tracker = parts.ckpt, parts.tracker
    try:
        try:
            return loop.run()
        except BaseException:
            kill_workers()  # a stop or an error: no waiting on a worker that may be blocked in a read
            raise
    except NonFiniteLoss as exc:
        raise type(exc)(_diverged(exc, ckpt, parts.dist, settings.precision, parts.run_dir), exc.step,
                        exc.blowup_step) from None
    finally:
        shutdown_workers(parts.loader)  # they ignore SIGTERM: stop them before the interpreter exits
        tracker.finish()


def _diverged(exc: NonFiniteLoss, ckpt: CheckpointManager, info: DistInfo, precision: str, run_dir: Path) -> str:
    """After a blow-up: set aside (rank 0) the checkpoints whose weights fed the blown-up steps, so
    that the same command resumes from the last good one, and say so. A checkpoint of step k holds
    the weights step k + 1 computes its loss with: with the loss out of range from step b on, the
    good ones are those of steps < b - 1. The advice names the run directory: a changed optim.blr
    names another one, and the run it is about must be the one that resumes."""
    first_bad = max((exc.blowup_step or exc.step) - 1, 0)
    moved = ckpt.set_aside_from(first_bad) if info.is_main else []
    good = numbered_checkpoints(ckpt.dir)
    fixes = "lower optim.blr (or optim.lr), set optim.clip_grad"
    if precision != "fp32":
        fixes += ", or use trainer.precision=fp32"
    if (exc.blowup_step or exc.step) <= 1:  # the very first step: the weights were fresh, look at the data first
        fixes = ("check the data first (NaN/Inf or extreme pixel values, or data.mean/std far from the data's: "
                 f"fcmae-stats DATA_ROOT prints them); else {fixes}")
    aside = (f"; the checkpoints taken after the loss left its range were set aside ({', '.join(p.name for p in moved)}, "
             "kept, never resumed from)" if moved else "")
    if good:
        step, path = good[-1]
        return (f"{exc}{aside}. The last good checkpoint is {path} (step {step}): {fixes}, then resume it with the "
                f"same command plus hydra.run.dir={run_dir} (a changed optim.blr alone would name a new run directory "
                "and start at step 0)")
    return (f"{exc}{aside}. No checkpoint was taken before the loss left its range: {fixes}, then start over with "
            "resume=never (or another run_name)")
