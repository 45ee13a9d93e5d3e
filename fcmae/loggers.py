"""Where metrics go: a JSON-lines file in the run directory, the console, wandb and TensorBoard."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("fcmae")


def format_metrics(metrics: dict) -> str:
    """``key value  key value`` for a log line, floats to 4 decimals."""
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class MetricsFile:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


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


class WandbLogger:
    """wandb run named from the config, holding the full resolved config; resumes its own id."""

    def __init__(self, logger_cfg, run_name: str, config: dict, run_dir: str | Path, run_id: str | None = None):
        import wandb
        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_id.txt"
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip()
        self.run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.entity, name=logger_cfg.run_name or run_name,
            config=config, dir=str(run_dir), mode=logger_cfg.mode, tags=list(logger_cfg.tags),
            id=run_id, resume="allow",
        )
        if self.run is not None and getattr(self.run, "id", None):
            id_file.write_text(self.run.id)

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

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("logger=tensorboard needs the tensorboard package: pip install 'fcmae[tensorboard]' "
                              f"({exc})") from None
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(path) as img:
            self.writer.add_image(key, np.asarray(img.convert("RGB")), global_step=step, dataformats="HWC")
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
