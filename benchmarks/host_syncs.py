"""Host-device syncs per training step on CUDA (issue #30).

Runs fcmae-pretrain's own loop on synthetic images with ``torch.cuda.set_sync_debug_mode("warn")``
switched on after the warm-up steps, and prints, per step, how many synchronizing CUDA calls it made
and the source lines that made them. Between log steps the loop should make none of its own: a
step's loss and gradient norm are read a step later behind a CUDA event (fcmae/engine/readback.py).
Log steps (``--log-every``) read the current step on purpose; fp16's GradScaler syncs every step.

    python benchmarks/host_syncs.py --model tiny --batch 64 --steps 24 --log-every 8 --json syncs.json

Without a CUDA device it says so and measures nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--log-every", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps before counting starts")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("host_syncs: needs a CUDA device; nothing measured")
        return

    from hydra import compose, initialize_config_dir

    from fcmae.config import CONFIG_PATH
    from fcmae.pretrain import run

    overrides = [f"model=convnextv2_{args.model}", f"data.img_size={args.img_size}", f"data.batch_size={args.batch}",
                 f"data.synthetic_images={args.batch * (args.steps + 1)}", "data.num_workers=4",
                 f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
                 "trainer.ckpt_every=1000000", "trainer.vis_every=1000000", f"trainer.precision={args.precision}",
                 "trainer.progress=log", "trainer.device=cuda"]
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("pretrain", overrides=overrides)

    per_step: dict[int, list[str]] = collections.defaultdict(list)
    caught: list[warnings.WarningMessage] = []
    seen = 0

    def count(loop) -> None:  # after each step's hooks: the warnings since the last step are this step's
        nonlocal seen
        step = loop.state.step
        if step == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            seen = len(caught)
            return
        if step > args.warmup:
            for w in caught[seen:]:
                per_step[step].append(f"{Path(w.filename).name}:{w.lineno}")
            seen = len(caught)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        caught = record
        try:
            run(cfg, Path(tmp) / "run", callbacks=[count])
        finally:
            torch.cuda.set_sync_debug_mode("default")

    steps = range(args.warmup + 1, args.steps + 1)
    rows = {s: collections.Counter(per_step.get(s, [])) for s in steps}
    print(f"{torch.cuda.get_device_name()}  {args.model} batch {args.batch} {args.precision}, "
          f"log every {args.log_every} steps; synchronizing calls per step (source line x count):")
    for s, where in rows.items():
        kind = "log" if s % args.log_every == 0 or s == args.steps else "   "
        print(f"  step {s:3d} {kind}  {sum(where.values()):2d}  {dict(where) if where else ''}")
    between = [sum(rows[s].values()) for s in steps if s % args.log_every and s != args.steps]
    print(f"between log steps: {sum(between)} synchronizing calls in {len(between)} steps")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args) | {"json": None},
                                         "per_step": {s: dict(w) for s, w in rows.items()},
                                         "between_log_steps": sum(between)}, indent=1))


if __name__ == "__main__":
    main()
