"""``fcmae-plan``: the memory of one ``fcmae-pretrain`` step, per process, before any run and without a GPU
(:mod:`fcmae.run.memory_plan` traces the step on fake tensors): the plan at the configured batch, and for each
GPU size the largest batch that fits by activation checkpointing.

    fcmae-plan model=convnextv2_base data.batch_size=128             # the same overrides as fcmae-pretrain
    fcmae-plan model=convnextv2_huge --gib 80 141 --checkpointing off block --json plan.json
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .config import CONFIG_PATH, ConfigError
from .models.masking import image_shape
from .pretrain import plan_memory
from .run.memory_plan import CHECKPOINTING, GiB, HEADROOM_BYTES, HEADROOM_FRACTION, largest_batch, usable_bytes
from .run.settings import resolve_precision
from .run.validation import validate


def plan_table(cfg, device: str, gib: list[float], dwconv=None, checkpointing=CHECKPOINTING, processes: int = 1) -> dict:
    """For each GPU size in ``gib``: the largest batch a process that fits with each ``checkpointing`` choice, and
    the least recomputation with which ``cfg``'s batch fits (None: none does)."""
    checkpointing = tuple(c for c in CHECKPOINTING if c in checkpointing)  # the least recomputation first
    peaks: dict = {c: {} for c in checkpointing}  # by checkpointing: batch -> planned peak

    def peak_at(c: str, batch: int) -> int:
        if batch not in peaks[c]:
            peaks[c][batch] = plan_memory(cfg, device, batch, c, dwconv, processes).peak
        return peaks[c][batch]
    rows = []
    for size in sorted(gib):
        budget = usable_bytes(size)
        largest = {c: largest_batch(lambda b, c=c: peak_at(c, b), budget, known=peaks[c]) for c in checkpointing}
        fits = next((c for c in checkpointing if peak_at(c, cfg.data.batch_size) <= budget), None)
        rows.append({"gib": size, "usable_bytes": budget, "largest_batch": largest, "batch_fits_with": fits})
    return {"batch": cfg.data.batch_size, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """``fcmae-plan [overrides] [--device cuda|cpu] [--gib N ...] [--json FILE]``: the memory of one pretraining
    step of ``fcmae-pretrain [overrides]``, per process, before any run (no GPU needed)."""
    import argparse

    from hydra import compose, initialize_config_dir
    parser = argparse.ArgumentParser(prog="fcmae-plan", description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("overrides", nargs="*", help="fcmae-pretrain's config overrides, e.g. model=convnextv2_base")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the run will train (its precision resolves as the run's does); default cuda")
    parser.add_argument("--gib", type=float, nargs="*", default=[24, 40, 80, 141],
                        help="GPU memory sizes for the largest-batch table (GiB); none: skip the table")
    parser.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=list(CHECKPOINTING),
                        help="the trainer.activation_checkpointing choices the table compares; default all")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes the run trains on (DDP keeps a bucket copy of the gradients with several)")
    parser.add_argument("--json", type=Path, help="also write the plan and the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
            cfg = compose("pretrain", overrides=args.overrides)
        validate(cfg)
        if args.processes < 1:
            raise ConfigError(f"--processes {args.processes}: use 1 or more")
        plan = plan_memory(cfg, args.device, processes=args.processes)
    except (ConfigError, ValueError) as exc:
        print(f"fcmae-plan: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a Hydra override error names the key and the fix
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            print(f"fcmae-plan: {exc}", file=sys.stderr)
            return 2
        raise
    h, w = image_shape(cfg.data.img_size)
    precision = resolve_precision(cfg.trainer.precision, torch.device(args.device))
    emulated = args.device == "cuda" and not torch.cuda.is_available()
    dwconv = cfg.encoder.dwconv if cfg.encoder.backend == "sparse" else "n/a"
    print(f"{cfg.model.name}, {h}x{w} images, patch {cfg.model.patch_size}, mask ratio {cfg.model.mask_ratio}, "
          f"{precision} on {args.device}{' (planned without a GPU: CUDA autocast casts emulated)' if emulated else ''}, "
          f"backend {cfg.encoder.backend}, depthwise conv {'canvas (auto: the larger)' if dwconv == 'auto' else dwconv}")
    print(f"per process at data.batch_size={cfg.data.batch_size}: {plan.summary()}")
    out = {"config": {"model": cfg.model.name, "img_size": [h, w], "patch_size": cfg.model.patch_size,
                      "mask_ratio": cfg.model.mask_ratio, "precision": precision, "device": args.device},
           "plan": plan.as_dict()}
    if args.gib:
        table = plan_table(cfg, args.device, args.gib, checkpointing=tuple(args.checkpointing),
                           processes=args.processes)
        out["table"] = table
        print(f"largest batch per process (a GPU of N GiB leaves {1 - HEADROOM_FRACTION:.0%} less "
              f"{HEADROOM_BYTES // GiB} GiB to tensors) by trainer.activation_checkpointing, and what "
              f"data.batch_size={cfg.data.batch_size} needs:")
        print(f"  {'GiB':>6} " + "".join(f"{c:>8}" for c in args.checkpointing) + f"  batch {cfg.data.batch_size}")
        for row in table["rows"]:
            need = row["batch_fits_with"]
            print(f"  {row['gib']:>6g} " + "".join(f"{row['largest_batch'][c]:>8}" for c in args.checkpointing)
                  + f"  {'checkpointing ' + need if need else 'does not fit: lower data.batch_size'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
