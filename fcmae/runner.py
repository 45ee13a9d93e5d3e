"""Run setup shared by ``fcmae-pretrain`` and ``fcmae-finetune``: precision, accumulation,
resume, DDP/compile wrapping, trackers, the Hydra entry point. Each app builds its own
model, data and task, then hands them to :func:`train`."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import (REQUIRED_KEYS, CheckpointManager, CheckpointUnreadable, CheckpointWriteError, check_checkpoint,
                         load_resolved, newest_good_checkpoint, numbered_checkpoints, read_checkpoint, restore_rng,
                         set_aside_checkpoints)
from .config import ConfigError
from .weights_file import CheckpointError
from .data import DataError, shutdown_workers
from .distributed import DistInfo, all_reduce_max, broadcast_object
from .engine import (DataQualityError, LoopSettings, LoopState, NonFiniteLoss, Preempted, PreemptionGuard, RunParts, Task,
                     TrainLoop)
from .files import DiskWriteError, write_atomic
from .loggers import Loggers, MetricsFile, NullLogger, TensorBoardLogger, WandbLogger, trim_jsonl
from .run_lock import RunDirectoryBusy, RunDirectoryUnwritable, RunLock

log = logging.getLogger("fcmae")

USER_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointWriteError, DiskWriteError, NonFiniteLoss,
               DataQualityError)
# How an error raised on rank 0 is raised again on the other ranks (same type, same message).
_AGREED_ERRORS = {cls.__name__: cls for cls in (
    ConfigError, DataError, CheckpointError, CheckpointUnreadable, CheckpointWriteError, DiskWriteError,
    RunDirectoryBusy, RunDirectoryUnwritable)}
# The JSON-lines logs of a run directory, trimmed to the step a run resumes from.
RUN_LOGS = ("metrics.jsonl", "evals.jsonl")


def on_rank_zero(decide: Callable[[], object], info: DistInfo):
    """``decide()`` on rank 0 alone; every rank returns its (picklable) result, or raises its
    error: one decision per run directory, never one per rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except USER_ERRORS as exc:
            if not info.enabled:
                raise
            error = (type(exc).__name__, str(exc))
            raised = exc
    result, error = broadcast_object((result, error), info)
    if error is not None:
        if info.is_main:
            raise raised
        raise _AGREED_ERRORS.get(error[0], CheckpointError)(error[1])
    return result


def on_every_rank(load: Callable[[], object], info: DistInfo, what: str):
    """``load()`` on every rank; if it fails on any, every rank stops with one error (no rank left
    waiting in a collective, no rank going on with something else)."""
    out, error = None, None
    try:
        out = load()
    except (USER_ERRORS + (OSError, MemoryError, RuntimeError)) as exc:
        if not info.enabled:
            raise
        error = exc
    if all_reduce_max(error is not None, info):
        if error is not None:
            raise CheckpointError(f"rank {info.rank} could not load {what}: {error}; every rank stops") from None
        raise CheckpointError(f"another rank could not load {what} (its log says why); every rank stops")
    return out


def read_checkpoint_agreed(path: str | Path, info: DistInfo) -> tuple[Path, dict]:
    """:func:`read_checkpoint` with rank 0 choosing the file (a run directory's newest whole
    checkpoint) and every other rank reading that same file."""
    box = {}

    def resolve() -> str:
        box["read"] = read_checkpoint(path)
        return str(box["read"][0])
    src = on_rank_zero(resolve, info)
    return on_every_rank((lambda: box["read"]) if info.is_main else (lambda: read_checkpoint(src)), info, src)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"trainer.precision={precision} needs a GPU; on CPU use trainer.precision=fp32")
    return precision


def resolve_accumulation(cfg, world_size: int) -> tuple[int, int]:
    """``(accum, effective_batch)``; with optim.effective_batch_size the accumulation is derived."""
    per_step = cfg.data.batch_size * world_size
    target = cfg.optim.effective_batch_size
    if target is None:
        return cfg.trainer.accum_iter, per_step * cfg.trainer.accum_iter
    if target % per_step:
        hint = _dividing_batch(target, world_size, cfg.data.batch_size)
        raise ConfigError(
            f"optim.effective_batch_size={target} is not a multiple of data.batch_size x world size = "
            f"{cfg.data.batch_size} x {world_size} = {per_step}; choose a batch size that divides it "
            f"(e.g. data.batch_size={hint})"
        )
    accum = target // per_step
    if cfg.trainer.accum_iter not in (1, accum):
        log.warning("trainer.accum_iter=%d is ignored: optim.effective_batch_size=%d sets the accumulation to %d "
                    "(%d x %d x %d); drop one of the two", cfg.trainer.accum_iter, target, accum,
                    cfg.data.batch_size, world_size, accum)
    return accum, target


def _dividing_batch(effective: int, world_size: int, at_most: int) -> int:
    """The largest per-process batch <= ``at_most`` that ``effective`` splits into on ``world_size``."""
    return max((b for b in range(1, at_most + 1) if effective % (b * world_size) == 0), default=1)


def checkpoint_world(ck: dict) -> tuple[int, int]:
    """``(world size, effective batch)`` a checkpoint was trained with (read from its config and its
    per-process RNG states for checkpoints from before both were saved)."""
    world = int(ck.get("world_size") or len(ck.get("rng") or [None]))
    if ck.get("effective_batch"):
        return world, int(ck["effective_batch"])
    cfg = ck.get("config") or {}
    batch = (cfg.get("data") or {}).get("batch_size")
    target = (cfg.get("optim") or {}).get("effective_batch_size")
    accum = (cfg.get("trainer") or {}).get("accum_iter") or 1
    return world, int(target or (batch or 0) * world * accum)


def adapt_to_world_size(old_world: int, old_effective: int, batch_size: int, world_size: int) -> int:
    """The accumulation that keeps a resumed run's effective batch (and so its lr and schedule) on
    ``world_size`` processes; :class:`ConfigError` with both ways forward when none does."""
    per_step = batch_size * world_size
    if old_effective % per_step == 0:
        return old_effective // per_step
    hint = _dividing_batch(old_effective, world_size, old_effective // world_size)
    raise ConfigError(
        f"this run was trained with an effective batch of {old_effective} on {old_world} process(es); on "
        f"{world_size} it cannot be kept with data.batch_size={batch_size} ({old_effective} is not a multiple of "
        f"{batch_size} x {world_size}): resume on {old_world} process(es), or set data.batch_size to one that "
        f"divides it (e.g. {hint}) so that the accumulation makes up the rest")


def loop_settings(cfg, micro_per_epoch: int, accum: int, base_lr: float, precision: str,
                  max_bad_fraction: float, callbacks) -> LoopSettings:
    """Steps per epoch, schedule length, stop step and warmup from the config.

    ``trainer.max_steps`` below the schedule's end (epochs x steps per epoch) stops early on the
    same schedule; beyond it, the cosine is stretched to end at ``max_steps``, so "the same
    command with a larger max_steps" makes a run longer (a finished run's lr rises again to the
    stretched curve's value at its step: a warm restart, logged)."""
    t = cfg.trainer
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch has {micro_per_epoch} batches per process, fewer than the accumulation "
                          f"({accum}); use more data or a smaller optim.effective_batch_size")
    epoch_steps = t.epochs * steps_per_epoch
    total_steps = max(epoch_steps, t.max_steps or 0)
    if total_steps > epoch_steps:
        log.info("trainer.max_steps=%d is beyond the %d steps of trainer.epochs=%d: the cosine schedule is "
                 "stretched to end at step %d", t.max_steps, epoch_steps, t.epochs, total_steps)
    warmup = cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None \
        else int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    return LoopSettings(
        total_steps=total_steps, stop_step=t.max_steps or total_steps,
        steps_per_epoch=steps_per_epoch, accum=accum, base_lr=base_lr, min_lr=cfg.optim.min_lr,
        warmup_steps=warmup, batch_size=cfg.data.batch_size, precision=precision, clip_grad=cfg.optim.clip_grad,
        log_every=t.log_every, ckpt_every=t.ckpt_every, max_bad_fraction=max_bad_fraction, progress=t.progress,
        callbacks=list(callbacks), stretched=total_steps > epoch_steps)


def find_resume(resume: str, ckpt: CheckpointManager, run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to continue from, loaded: ``auto`` (the run directory's newest whole
    checkpoint, walking back past damaged ones, which it renames: call it on rank 0 only, holding
    the lock), ``never``, or a file or run directory."""
    if resume == "auto":
        found = newest_good_checkpoint(ckpt.dir, quarantine=True)
        if found is None and set_aside_checkpoints(ckpt.dir):
            kept = ", ".join(p.name for p in set_aside_checkpoints(ckpt.dir))
            raise CheckpointError(f"{ckpt.dir} holds no whole checkpoint, only ones set aside ({kept}); refusing to "
                                  "start this run afresh over them. Start over with resume=never (they stay as they "
                                  "are) or another run_name, or restore a checkpoint into the directory")
        missing = [k for k in REQUIRED_KEYS if found is not None and k not in found[1]]
        if missing:
            raise CheckpointError(f"{found[0]} lacks {', '.join(missing)}: not a training checkpoint to resume")
        if found is not None and found[0].parent == ckpt.dir:
            ckpt.point_last_at(found[0])
        return found
    if resume != "never":
        path = Path(resume)
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"resume={resume}: no such checkpoint file or run directory "
                              "(use resume=auto or resume=never)")
        found, ck = load_resolved(path)
        if ck is None:
            try:
                ck = check_checkpoint(found)
            except CheckpointError as exc:
                raise CheckpointError(f"resume={resume}: {exc}; pass its run directory to fall back to an older "
                                      "checkpoint") from None
        return found, ck
    if ckpt.exists():
        raise ConfigError(f"{run_dir} already holds checkpoints and resume=never would overwrite them; "
                          "use resume=auto to continue, or another run_name")
    return None


def changed_keys(old: dict, new: dict, keys) -> list[str]:
    out = []
    old, new = OmegaConf.create(old), OmegaConf.create(new)
    for key in keys:
        a, b = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if a != b:
            out.append(f"{key}: {OmegaConf.to_container(a) if OmegaConf.is_config(a) else a} -> "
                       f"{OmegaConf.to_container(b) if OmegaConf.is_config(b) else b}")
    return out


def restore(path: Path, ck: dict, config: dict, must_match, model, optimizer, scaler, info: DistInfo, seed: int,
            task: Task | None = None) -> LoopState:
    """Load a training checkpoint ``ck`` (read from ``path``) into model/optimizer/scaler/RNG
    (and the task's own state); refuse a different setup."""
    changed = changed_keys(ck.get("config", {}), config, must_match)
    if changed:
        raise ConfigError(f"{path} was trained with a different setup ({'; '.join(changed)}); "
                          "continue with the original settings, or start another run (run_name=...)")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    if task is not None:
        task.load_state_dict(ck)
    old_world = checkpoint_world(ck)[0]
    old_batch = ((ck.get("config") or {}).get("data") or {}).get("batch_size") or config["data"]["batch_size"]
    # the epoch's samples consumed so far, in this run's micro-batches per process
    batch_in_epoch = ck["batch_in_epoch"] * old_world * old_batch // (info.world_size * config["data"]["batch_size"])
    state = LoopState(ck["step"], ck["epoch"], batch_in_epoch, ck.get("bad_images", 0),
                      ck.get("seen_images", 0), ck.get("finished", True), ck.get("loss_floor"), ck.get("blowup_step"))
    rngs = ck.get("rng") or []
    if len(rngs) == info.world_size:
        restore_rng(rngs[info.rank])
    else:
        log.warning("checkpoint has RNG states for %d processes, this run has %d: the per-process random "
                    "streams (drop path, mixup) restart from seed + step", len(rngs), info.world_size)
        seed_rank(seed + state.step, info.rank)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch, state.batch_in_epoch)
    return state


@dataclass
class RunSetup:
    """What both apps derive from the config before reading any data."""
    precision: str  # fp32 | bf16 | fp16, resolved for the device
    accum: int  # micro-batches per optimizer step
    effective_batch: int
    base_lr: float
    ckpt: CheckpointManager
    resume: tuple[Path, dict] | None  # the checkpoint to continue from (path, loaded), if any
    start_step: int = 0  # the step the run continues from (0: a fresh start)

    @property
    def resume_path(self) -> Path | None:
        return self.resume[0] if self.resume else None


def prepare_run(cfg, run_dir: Path, info: DistInfo, lock: RunLock | None = None) -> RunSetup:
    """Resolve precision, accumulation and lr, and decide where the run continues from: rank 0
    alone takes the run directory's lock, tidies it, picks the checkpoint (renaming damaged ones)
    and trims the logs to it; every other rank loads the file rank 0 chose and checks its step.
    A run resumed on another number of processes keeps its effective batch and schedule."""
    precision = resolve_precision(cfg.trainer.precision, info.device)
    accum, effective_batch = resolve_accumulation(cfg, info.world_size)
    ckpt = CheckpointManager(run_dir, keep=cfg.trainer.keep_checkpoints)
    box = {}

    def decide() -> tuple[str | None, int]:
        if lock is not None:
            lock.acquire()
        ckpt.tidy()
        box["found"] = found = find_resume(cfg.resume, ckpt, run_dir)
        step = int(found[1]["step"]) if found is not None else 0
        for name in RUN_LOGS:
            trim_jsonl(run_dir / name, step)
        return (str(found[0]) if found is not None else None), step

    path, step = on_rank_zero(decide, info)

    def load():  # on the other ranks: the very file rank 0 chose, at the step it read
        if path is None:
            return None
        ck = check_checkpoint(Path(path))
        if ck["step"] != step:
            raise CheckpointError(f"{path} holds step {ck['step']}, rank 0 resumed from step {step}")
        return Path(path), ck
    found = on_every_rank((lambda: box["found"]) if info.is_main else load, info, path or "the run's start")
    if found is not None:
        old_world, old_effective = checkpoint_world(found[1])
        if old_world != info.world_size and old_effective:
            accum = adapt_to_world_size(old_world, old_effective, cfg.data.batch_size, info.world_size)
            if info.is_main:
                log.warning("resuming a run of %d process(es) on %d: accumulation %d keeps its effective batch %d "
                            "(%d x %d x %d), so the lr, the schedule and the samples per step are unchanged; the "
                            "data order within a step and the per-process random streams differ from an "
                            "uninterrupted run", old_world, info.world_size, accum, old_effective,
                            cfg.data.batch_size, accum, info.world_size)
            effective_batch = old_effective
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256
    return RunSetup(precision, accum, effective_batch, base_lr, ckpt, found, step)


def restore_or_seed(setup: RunSetup, config: dict, must_match, model, optimizer, info: DistInfo, seed: int,
                    task: Task | None = None):
    """``(state, scaler)``: the resumed position, or a fresh one with per-rank seeding."""
    scaler = torch.amp.GradScaler("cuda") if setup.precision == "fp16" else None
    if setup.resume is not None:
        path, ck = setup.resume
        setup.resume = (path, None)  # the loop holds the weights from here: free the copy
        return restore(path, ck, config, must_match, model, optimizer, scaler, info, seed, task), scaler
    seed_rank(seed, info.rank)
    return LoopState(), scaler


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank streams for what differs between ranks (drop path; timm's Mixup draws from NumPy
    and Python), as the official code seeds with seed + rank; a resume restores them exactly."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def seed_everything(seed: int) -> None:
    """The same streams on every rank (model initialisation must agree before DDP)."""
    seed_rank(seed, 0)


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
        return loop.run()
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(_diverged(exc, ckpt, parts.dist, settings.precision), exc.step, exc.blowup_step) from None
    finally:
        shutdown_workers(parts.loader)  # they ignore SIGTERM: stop them before the interpreter exits
        tracker.finish()


def _diverged(exc: NonFiniteLoss, ckpt: CheckpointManager, info: DistInfo, precision: str) -> str:
    """After a blow-up: set aside (rank 0) the checkpoints whose weights fed the blown-up steps, so
    that the same command resumes from the last good one, and say so. A checkpoint of step k holds
    the weights step k + 1 computes its loss with: with the loss out of range from step b on, the
    good ones are those of steps < b - 1."""
    first_bad = max((exc.blowup_step or exc.step) - 1, 0)
    moved = ckpt.set_aside_from(first_bad) if info.is_main else []
    good = numbered_checkpoints(ckpt.dir)
    fixes = "lower optim.blr (or optim.lr), set optim.clip_grad"
    if precision != "fp32":
        fixes += ", or use trainer.precision=fp32"
    aside = (f"; the checkpoints taken after the loss left its range were set aside ({', '.join(p.name for p in moved)}, "
             "kept, never resumed from)" if moved else "")
    if good:
        step, path = good[-1]
        return (f"{exc}{aside}. The last good checkpoint is {path} (step {step}): {fixes}, then run the same command "
                "to resume from it")
    return (f"{exc}{aside}. No checkpoint was taken before the loss left its range: {fixes}, then start over with "
            "resume=never (or another run_name)")


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def print_submitit_warnings_once() -> None:
    """submitit's logger has a stdout handler for everything, a stderr one for warnings, and also
    passes its records on to the root logger's console handler (Hydra's): each warning (a failing
    ``sacct`` poll on a cluster without accounting) printed three times. One each, on stderr."""
    try:
        from submitit.core import logger as submitit_logger
    except Exception:  # submitit is the Slurm launcher's; without it there is nothing to fix
        return
    sub = submitit_logger.get_logger()
    sub.propagate = False
    for handler in sub.handlers:
        if getattr(handler, "stream", None) is sys.stdout and not any(isinstance(f, _BelowWarning) for f in handler.filters):
            handler.addFilter(_BelowWarning())


def hydra_entry(config_path: str, config_name: str, run: Callable[[DictConfig, str], object]) -> None:
    """``@hydra.main`` around ``run(cfg, run_dir)``: user errors exit 1 with one clear line;
    preemption exits 128+signal after its checkpoint, for the launcher to requeue."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    print_submitit_warnings_once()

    @hydra.main(config_path=config_path, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            with PreemptionGuard():  # from the start: a signal during setup stops the run after step 1
                run(cfg, HydraConfig.get().runtime.output_dir)
        except Preempted as exc:
            log.warning("%s; run the same command again to resume", exc)
            sys.exit(128 + int(exc.signum))
        except KeyboardInterrupt:
            log.warning("interrupted (a second Ctrl-C): exiting without a checkpoint; the last one stands")
            sys.exit(130)
        except USER_ERRORS as exc:
            log.error("%s", exc)
            sys.exit(1)

    _main()
