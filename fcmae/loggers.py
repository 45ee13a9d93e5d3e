"""Where metrics go: a JSON-lines file in the run directory, the console, wandb and TensorBoard."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .storage.files import append_line, disk_refusals, write_atomic

log = logging.getLogger("fcmae")


def format_metrics(metrics: dict) -> str:
    """``key value  key value`` for a log line, floats to 4 decimals."""
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class MetricsFile:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``: a whole line or none."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps({**record, "time": round(time.time(), 3)}), "metrics")


def trim_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the whole records of a JSON-lines log with ``step <= last_step`` (what the checkpoint a
    run resumes from had seen), rewritten atomically; a torn last line goes too. Returns how many
    lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step
        except ValueError:
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept)
        write_atomic(path, lambda tmp: tmp.write_text(text), "log")
        log.info("%s: dropped %d line(s) past step %d (or torn), to match the checkpoint resumed from", path,
                 dropped, last_step)
    return dropped


class Progress:
    """A tqdm bar on a terminal (or ``progress=bar``); plain log lines otherwise."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.bar = None
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.enabled, self.total = enabled, total

    def update(self, step: int, metrics: dict, log_line: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 img_s=f"{metrics.get('images_per_s', 0):.1f}", refresh=False)
            self.bar.refresh()
        elif log_line:
            log.info("step %d/%d  loss %.4f  lr %.3e  %.1f img/s", step, self.total, metrics["loss"],
                     metrics["lr"], metrics.get("images_per_s", 0.0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Seconds between the plain log lines of a long phase (no terminal); a terminal gets a bar.
PHASE_LOG_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def track(items, total: int | None, what: str, unit: str = "batch", mode: str = "auto", enabled: bool = True,
          log_fn=None):
    """Iterate ``items`` showing progress of a long phase (an evaluation, feature extraction, packing):
    a tqdm bar on a terminal (or ``mode=bar``); otherwise a log line every ``PHASE_LOG_EVERY_S`` with
    the count, the rate and the time left, and one when it ends. ``mode`` follows ``trainer.progress``."""
    emit = log_fn or log.info
    if not enabled:
        yield from items
        return
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False)
        return
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= PHASE_LOG_EVERY_S:
            last = now
            rate = done / max(now - start, 1e-9)
            left = f", {_duration((total - done) / rate)} left" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            units = unit + ("es" if unit.endswith(("ch", "sh", "s")) else "s")
            emit(f"{what}: {done}{of} {units} ({rate:.2f}/s{left})")
    if time.perf_counter() - start >= PHASE_LOG_EVERY_S:
        emit(f"{what}: done, {done} in {_duration(time.perf_counter() - start)}")


class WandbLogger:
    """wandb run named from the config, holding the full resolved config; resumes its own id.

    ``logger.mode=auto`` (the default) logs online where wandb has an API key and offline otherwise
    (a cluster without internet, a machine never logged in), saying so: an offline run is synced
    later with ``wandb sync RUN_DIR/wandb/offline-run-*``. ``WANDB_MODE`` chooses under ``auto`` too."""

    def __init__(self, logger_cfg, run_name: str, config: dict, run_dir: str | Path, run_id: str | None = None):
        import wandb
        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_id.txt"
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip()
        mode = logger_cfg.mode
        auto = mode == "auto"
        if auto:
            mode = os.environ.get("WANDB_MODE") or "online"
        kwargs = dict(project=logger_cfg.project, entity=logger_cfg.entity, name=logger_cfg.run_name or run_name,
                      config=config, dir=str(run_dir), tags=list(logger_cfg.tags), id=run_id, resume="allow")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # wandb's UsageError / AuthenticationError / CommError
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not (auto and mode == "online"):
                from .errors import ConfigError
                raise ConfigError(f"logger=wandb could not start in logger.mode={mode} ({reason}); log in with "
                                  "`wandb login` (or set WANDB_API_KEY), or use logger.mode=offline to log locally "
                                  "and sync later") from None
            log.warning("wandb cannot log online (%s): logging offline to %s/wandb; sync later with `wandb sync "
                        "%s/wandb/offline-run-*` (logger.mode=online makes this an error)", reason, run_dir, run_dir)
            self.run = wandb.init(mode="offline", **kwargs)
        if self.run is not None and getattr(self.run, "id", None):
            write_atomic(id_file, lambda tmp: tmp.write_text(self.run.id), "wandb id")

    def log(self, metrics: dict, step: int) -> None:
        self.wandb.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        self.wandb.log({key: self.wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.wandb.finish()


class TensorBoardLogger:
    """Scalars and images as TensorBoard event files in ``RUN_DIR/tensorboard`` (``torch.utils.tensorboard``;
    needs ``pip install 'fcmae[tensorboard]'``). A resumed run appends to the same folder: TensorBoard
    shows one curve, continuing at the step the checkpoint had."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("logger=tensorboard needs the tensorboard package: pip install 'fcmae[tensorboard]' "
                              f"({exc})") from None
        self.dir = Path(run_dir) / "tensorboard"
        # purge_step: a resumed run hides the events logged after its checkpoint (TensorBoard's own rule)
        with disk_refusals(self.dir, "TensorBoard events in"):
            self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        with disk_refusals(self.dir, "TensorBoard events in"):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        with disk_refusals(self.dir, "TensorBoard events in"):
            self.writer.add_image(key, pixels, global_step=step, dataformats="HWC")
            self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class Loggers:
    """Several loggers as one (``logger=wandb+tensorboard``)."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_image(self, key: str, path, step: int) -> None:
        for logger in self.loggers:
            logger.log_image(key, path, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_image(self, key: str, path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass
