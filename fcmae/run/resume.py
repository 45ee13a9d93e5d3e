"""Where a run continues from, decided once and applied only after every check passed.

Rank 0 takes the lock, tidies the run directory and picks the checkpoint (walking back past damaged
ones) without changing anything else; every rank loads that file and checks what the resume may change
(:mod:`fcmae.run.resume_checks`, by the table of :mod:`fcmae.config.resume_rules`); once the data is read
and checked too, :func:`commit_resume` applies the decision on disk (a rollback's newer checkpoints and
``best.pt`` set aside, the record of it, the logs trimmed to the step). A refused command has changed
nothing. :func:`restore` then loads weights, optimizer moments (under this config's hyperparameters),
the loop's position and the random streams."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..distributed import DistInfo
from ..engine import LoopState, Task
from ..storage.checkpoint_record import TrainingCheckpoint, newest_for_resume, read_for_resume
from ..errors import ConfigError
from ..loggers import trim_jsonl
from ..storage.checkpoint import RESUMED_FROM, restore_rng, run_checkpoint_dir, set_aside_checkpoints
from ..storage.checkpoint_store import CheckpointManager
from ..storage.run_lock import RunLock
from ..storage.weights_file import CheckpointError
from .ranks import on_every_rank, on_rank_zero
from .resume_checks import check_resume
from .seeding import seed_rank
from .settings import resolve_accumulation, resolve_precision

log = logging.getLogger("fcmae")

# The JSON-lines logs of a run directory, trimmed to the step a run resumes from.
RUN_LOGS = ("metrics.jsonl", "evals.jsonl")


@dataclass
class ResumeDecision:
    """Where the run continues from, before anything on disk changed: the checkpoint (loaded), and what
    :func:`commit_resume` does once every check passed."""
    path: Path
    record: TrainingCheckpoint | None  # None once the loop holds the weights
    source: str = "auto"  # auto, or the resume=PATH it came from
    roll_back: bool = False  # resume=PATH in this run's checkpoints: set the newer ones aside
    record_source: bool = False  # resume=PATH: recorded, so that a rerun of it follows the run's timeline

    @property
    def step(self) -> int:
        return self.record.step if self.record is not None else self._step

    def __post_init__(self):
        self._step = self.record.step if self.record is not None else 0


def find_resume(resume: str, ckpt: CheckpointManager, run_dir: Path) -> ResumeDecision | None:
    """The checkpoint to continue from, loaded: ``auto`` (the run directory's newest whole checkpoint,
    walking back past damaged ones, which it renames: call it on rank 0 only, holding the lock),
    ``never``, or a file or run directory. Nothing else on disk changes here."""
    if resume == "auto":
        found = newest_for_resume(ckpt.dir, quarantine=True)
        if found is None and set_aside_checkpoints(ckpt.dir):
            kept = ", ".join(p.name for p in set_aside_checkpoints(ckpt.dir))
            raise CheckpointError(f"{ckpt.dir} holds no whole checkpoint, only ones set aside ({kept}); refusing to "
                                  "start this run afresh over them. Start over with resume=never (they stay as they "
                                  "are) or another run_name, or restore a checkpoint into the directory")
        return ResumeDecision(*found) if found is not None else None
    if resume == "never":
        if ckpt.exists():
            raise ConfigError(f"{run_dir} already holds checkpoints and resume=never would overwrite them; "
                              "use resume=auto to continue, or another run_name")
        return None
    path = Path(resume)
    again = _rerun_of_resume_path(path, ckpt, run_dir)
    if again is not None:
        return again
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"resume={resume}: no such checkpoint file or run directory (use resume=auto or "
                          "resume=never)")
    source_dir = run_checkpoint_dir(path)
    if source_dir is not None:  # a run directory: its newest whole checkpoint, read-only
        found = newest_for_resume(source_dir, quarantine=False)
        if found is None:
            raise CheckpointError(f"resume={resume}: {source_dir} holds no checkpoint yet")
        file, record = found
    else:
        file = path
        try:
            record = read_for_resume(file)
        except CheckpointError as exc:
            raise CheckpointError(f"resume={resume}: {exc}; pass its run directory to fall back to an older "
                                  "checkpoint") from None
    ours = file.resolve().parent == ckpt.dir.resolve()
    newest = ckpt.newest()
    if not ours and newest is not None:
        raise ConfigError(
            f"resume={resume} is a checkpoint of another run directory ({file.resolve().parent.parent}), and this "
            f"run ({run_dir}) holds checkpoints of its own (up to step {newest[0]}): continuing from it would abandon "
            f"them. Continue this run with resume=auto; to branch from {file.name}, start another run directory "
            f"(run_name=... or hydra.run.dir=...) with resume={resume}")
    return ResumeDecision(file, record, source=resume, roll_back=ours, record_source=True)


def _rerun_of_resume_path(path: Path, ckpt: CheckpointManager, run_dir: Path) -> ResumeDecision | None:
    """The same ``resume=PATH`` again (a requeue, a rerun) after the run trained on from it: it continues
    the run's timeline (``resume=auto``) instead of going back a second time."""
    record, newest = ckpt.resumed_from(), ckpt.newest()
    if not record or record.get("path") != str(path.absolute()) or newest is None or newest[0] <= record.get("step", 0):
        return None
    log.warning("resume=%s was decided before (%s): the run has trained on from its step %d to step %d since, and "
                "continues there (to go back to it again, delete %s)", path, record.get("time", "?"),
                record["step"], newest[0], ckpt.dir / RESUMED_FROM)
    return find_resume("auto", ckpt, run_dir)


def commit_resume(setup: "RunSetup", run_dir: Path, info: DistInfo) -> None:
    """Apply the resume decision on disk, after every check passed (rank 0, holding the lock): a
    ``resume=PATH`` in this run's checkpoints sets the newer ones (and a ``best.pt`` of a later step) aside
    and records itself; ``last.pt`` names the checkpoint; the logs are trimmed to its step."""
    if not info.is_main:
        return
    decision, ckpt = setup.resume, setup.ckpt
    step = decision.step if decision is not None else 0
    if decision is not None:
        if decision.roll_back:
            moved = ckpt.roll_back_to(step, Path(decision.source))
            if moved:
                log.warning("resume=%s rolls the run back to step %d: its newer checkpoints (%s) are set aside as "
                            "*.abandoned (kept, never resumed from) and its logs trimmed to step %d; resume=auto, "
                            "last.pt and fcmae-export follow this timeline from now on", decision.source, step,
                            ", ".join(p.name for p in moved), step)
        elif decision.record_source:
            ckpt.record_resume(step, Path(decision.source))
        if decision.path.parent.resolve() == ckpt.dir.resolve():
            ckpt.point_last_at(decision.path)
    for name in RUN_LOGS:
        trim_jsonl(run_dir / name, step)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict,
                         as_saved: Callable[[], torch.optim.Optimizer] | None) -> None:
    """The checkpoint's optimizer moments, per parameter, into ``optimizer`` (built from this run's config):
    its per-group values (weight decay, the layer decay's ``lr_scale``, betas, eps) stay this config's,
    even where the groups themselves differ (another ``optim.layer_decay``). ``as_saved`` builds the
    optimizer the checkpoint's config built (its group structure); without it, or where it does not
    match the saved groups, the state loads directly and this config's group values are put back."""
    mine = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    old = None
    if as_saved is not None:
        try:
            old = as_saved()
        except Exception as exc:  # an old config this code cannot build from: the direct path below
            log.info("optimizer groups of the checkpoint's config could not be rebuilt (%s); loading directly", exc)
    if old is not None and [len(g["params"]) for g in old.param_groups] == \
            [len(g["params"]) for g in saved["param_groups"]]:
        old.load_state_dict(saved)
        for group in old.param_groups:
            for p in group["params"]:
                if p in old.state:
                    optimizer.state[p] = old.state[p]
        return
    try:
        optimizer.load_state_dict(saved)
    except ValueError as exc:
        raise ConfigError(f"the checkpoint's optimizer state does not fit this run's parameter groups ({exc}); "
                          "continue with the optimizer settings it was trained with") from None
    for group, values in zip(optimizer.param_groups, mine):
        group.update(values)


def restore(decision: ResumeDecision, model, optimizer, scaler, info: DistInfo, seed: int, batch_size: int,
            task: Task | None = None, as_saved=None) -> LoopState:
    """Load the checkpoint of ``decision`` into model/optimizer/scaler/RNG (and the task's own state)."""
    record, path = decision.record, decision.path
    model.load_state_dict(record.model)
    load_optimizer_state(optimizer, record.optimizer, as_saved)
    if scaler is not None and record.scaler:
        scaler.load_state_dict(record.scaler)
    if task is not None:
        task.load_state_dict(record.task)
    old_world, _ = record.world()
    old_batch = record.setting("data.batch_size") or batch_size
    state = LoopState.from_dict(record.loop.to_dict())
    # the epoch's samples consumed so far, in this run's micro-batches per process
    state.batch_in_epoch = state.batch_in_epoch * old_world * old_batch // (info.world_size * batch_size)
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
    resume: ResumeDecision | None  # the checkpoint to continue from, if any
    start_step: int = 0  # the step the run continues from (0: a fresh start)

    @property
    def resume_path(self) -> Path | None:
        return self.resume.path if self.resume else None


def prepare_run(cfg, run_dir: Path, info: DistInfo, lock: RunLock | None = None, rules: dict | None = None) -> RunSetup:
    """Resolve precision, accumulation and lr, and decide where the run continues from: rank 0 alone takes
    the run directory's lock, tidies it and picks the checkpoint (renaming damaged ones); every other rank
    loads the file rank 0 chose and checks its step. What the resume may change is checked by ``rules``
    (:mod:`fcmae.config.resume_rules`) before anything else on disk changes (:func:`commit_resume` does
    that): a run resumed on another number of processes keeps its effective batch and schedule."""
    precision = resolve_precision(cfg.trainer.precision, info.device)
    accum, effective_batch = resolve_accumulation(cfg, info.world_size)
    ckpt = CheckpointManager(run_dir, keep=cfg.trainer.keep_checkpoints)
    box = {}

    def decide() -> tuple[str | None, int]:
        if lock is not None:
            lock.acquire()
        ckpt.tidy()
        box["found"] = found = find_resume(cfg.resume, ckpt, run_dir)
        return (str(found.path) if found is not None else None), (found.step if found is not None else 0)

    path, step = on_rank_zero(decide, info)

    def load():  # on the other ranks: the very file rank 0 chose, at the step it read
        if path is None:
            return None
        record = read_for_resume(Path(path))
        if record.step != step:
            raise CheckpointError(f"{path} holds step {record.step}, rank 0 resumed from step {step}")
        return ResumeDecision(Path(path), record)
    found = on_every_rank((lambda: box["found"]) if info.is_main else load, info, path or "the run's start")
    if found is not None and rules is not None:
        accum, effective_batch = check_resume(found.path, found.record, cfg, rules, info, accum, effective_batch)
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256
    return RunSetup(precision, accum, effective_batch, base_lr, ckpt, found, step)


def restore_or_seed(setup: RunSetup, model, optimizer, info: DistInfo, seed: int, batch_size: int,
                    task: Task | None = None, as_saved=None):
    """``(state, scaler)``: the resumed position, or a fresh one with per-rank seeding."""
    scaler = torch.amp.GradScaler("cuda") if setup.precision == "fp16" else None
    if setup.resume is not None:
        state = restore(setup.resume, model, optimizer, scaler, info, seed, batch_size, task, as_saved)
        setup.resume.record = None  # the loop holds the weights from here: free the copy
        return state, scaler
    seed_rank(seed, info.rank)
    return LoopState(), scaler
