"""Where a run continues from, decided once: rank 0 takes the lock, tidies the run directory,
picks the checkpoint (walking back past damaged ones) and trims the logs to it; every rank loads
that file, refuses a different setup, and restores the loop's position and random streams."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage.checkpoint import (REQUIRED_KEYS, RESUMED_FROM, check_checkpoint, load_resolved,
                                  newest_good_checkpoint, restore_rng, set_aside_checkpoints)
from ..errors import ConfigError
from ..distributed import DistInfo
from ..storage.checkpoint_store import CheckpointManager
from ..engine import LoopState, Task
from ..engine.checkpoint_record import TrainingCheckpoint
from ..loggers import trim_jsonl
from ..storage.run_lock import RunLock
from ..storage.weights_file import CheckpointError
from .ranks import on_every_rank, on_rank_zero
from .seeding import seed_rank
from .resume_checks import announce_changes, changed_keys, check_setup
from .settings import resolve_accumulation, resolve_precision

log = logging.getLogger("fcmae")

# The JSON-lines logs of a run directory, trimmed to the step a run resumes from.
RUN_LOGS = ("metrics.jsonl", "evals.jsonl")


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
        again = _rerun_of_rollback(path, ckpt, run_dir)
        if again is not None:
            return again
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
        _roll_back(resume, path, int(ck["step"]), ckpt)
        return found, ck
    if ckpt.exists():
        raise ConfigError(f"{run_dir} already holds checkpoints and resume=never would overwrite them; "
                          "use resume=auto to continue, or another run_name")
    return None


def _roll_back(resume: str, path: Path, step: int, ckpt: CheckpointManager) -> None:
    """``resume=PATH`` is a decision the run keeps: its newer checkpoints are set aside (the logs are
    trimmed by the caller), and the decision is recorded for a rerun of the same command."""
    moved = ckpt.roll_back_to(step, path)
    if moved:
        log.warning("resume=%s rolls the run back to step %d: its newer checkpoints (%s) are set aside as "
                    "*.abandoned (kept, never resumed from) and its logs trimmed to step %d; resume=auto, last.pt and "
                    "fcmae-export follow this timeline from now on", resume, step, ", ".join(p.name for p in moved),
                    step)


def _rerun_of_rollback(path: Path, ckpt: CheckpointManager, run_dir: Path) -> tuple[Path, dict] | None:
    """The same ``resume=PATH`` again (a requeue, a rerun) after the run trained on from it: it continues
    the run's timeline (``resume=auto``) instead of rolling back a second time."""
    record, newest = ckpt.resumed_from(), ckpt.newest()
    if not record or record.get("path") != str(path.absolute()) or newest is None or newest[0] <= record.get("step", 0):
        return None
    log.warning("resume=%s was decided before (%s): the run has trained on from its step %d to step %d since, and "
                "continues there (to roll back to it again, delete %s)", path, record.get("time", "?"),
                record["step"], newest[0], ckpt.dir / RESUMED_FROM)
    return find_resume("auto", ckpt, run_dir)


def restore(path: Path, ck: dict, config: dict, must_match, model, optimizer, scaler, info: DistInfo, seed: int,
            task: Task | None = None) -> LoopState:
    """Load a training checkpoint ``ck`` (read from ``path``) into model/optimizer/scaler/RNG
    (and the task's own state); refuse a different setup."""
    changed = changed_keys(ck.get("config", {}), config, must_match)
    if changed:
        raise ConfigError(f"{path} was trained with a different setup ({'; '.join(changed)}); "
                          "continue with the original settings, or start another run (run_name=...)")
    record = TrainingCheckpoint.from_dict(ck)
    model.load_state_dict(record.model)
    optimizer.load_state_dict(record.optimizer)
    if scaler is not None and record.scaler:
        scaler.load_state_dict(record.scaler)
    if task is not None:
        task.load_state_dict(record.task)
    old_world = record.world_size
    old_batch = (record.config.get("data") or {}).get("batch_size") or config["data"]["batch_size"]
    state = record.loop
    # the epoch's samples consumed so far, in this run's micro-batches per process
    state.batch_in_epoch = state.batch_in_epoch * old_world * old_batch // (info.world_size * config["data"]["batch_size"])
    rngs = record.rng
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
    What the resume may change is checked (:mod:`fcmae.run.resume_checks`): a run resumed on another
    number of processes keeps its effective batch and schedule."""
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
        accum, effective_batch = check_setup(found[0], found[1], cfg, info, accum, effective_batch)
        announce_changes(found[0], found[1], cfg, info)
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


