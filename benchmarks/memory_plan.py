#!/usr/bin/env python
"""The memory plan (``fcmae-plan``) next to a measured peak, and the GPU memory table of docs/memory.md.

``measure``: one pretraining step on the CPU, the plan for it beside the peak measured the way
:func:`fcmae.run.memory_plan.measured_cpu_peak` documents (the resident set's rise over the step, with
glibc returning every freed tensor at once, plus the bytes alive across steps); each configuration in a
fresh process. ``table``: the largest batch a process fits on GPUs of 24, 40, 80 and 141 GiB for the
sizes atto to huge, by activation checkpointing (bf16, 224 px, mask 0.6; planned without a GPU).

    python benchmarks/memory_plan.py measure                                 # atto and tiny, b32/b16, off/stage/block
    python benchmarks/memory_plan.py measure --models atto --batches 64 --checkpointing off --json out.json
    python benchmarks/memory_plan.py table --json memory_table.json          # a few minutes a size on 2 cores
    python benchmarks/memory_plan.py gpu --json gpu.json                     # on a GPU: plan vs max_memory_allocated
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see measured_cpu_peak: the resident set follows the tensors


def _config(model: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from fcmae.pretrain import CONFIG_PATH
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        return compose("pretrain", overrides=[f"model=convnextv2_{model}", *overrides])


def measure_one(model: str, batch: int, checkpointing: str, img: int, threads: int) -> dict:
    """In this process (started with MALLOC_ENV): the plan, then the real step measured."""
    import torch

    from fcmae.pretrain import plan_memory, training_step_parts
    from fcmae.run.memory_plan import measured_cpu_peak
    torch.set_num_threads(threads)
    cfg = _config(model, [f"data.batch_size={batch}", f"data.img_size={img}",
                          f"trainer.activation_checkpointing={checkpointing}"])
    plan = plan_memory(cfg, "cpu")
    torch.manual_seed(0)
    start = time.perf_counter()
    measured = measured_cpu_peak(*training_step_parts(cfg, torch.device("cpu"), batch, checkpointing))
    return {"model": model, "batch": batch, "img": img, "checkpointing": checkpointing, "plan": plan.as_dict(),
            "measured": measured, "ratio": plan.peak / measured["peak"], "seconds": time.perf_counter() - start}


def measure(models, batches, checkpointing, img: int = 224, threads: int = 2) -> list[dict]:
    """Each configuration in a fresh interpreter with MALLOC_ENV (it must be set before the process starts)."""
    rows = []
    for model, batch in zip(models, batches):
        for ckpt in checkpointing:
            out = subprocess.run([sys.executable, __file__, "_one", model, str(batch), ckpt, str(img), str(threads)],
                                 env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"measuring {model} b{batch} {ckpt} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def measure_gpu(models, batches, checkpointing, img: int = 224, steps: int = 3) -> list[dict]:
    """On a GPU: the plan (with the depthwise conv the run would choose) beside ``torch.cuda.max_memory_allocated``
    over steps 2..``steps`` of the same step, eager, bf16 (the first step makes the optimizer's state)."""
    import torch

    from fcmae.pretrain import plan_memory, training_step_parts
    rows = []
    for model, batch in zip(models, batches):
        for ckpt in checkpointing:
            cfg = _config(model, [f"data.batch_size={batch}", f"data.img_size={img}",
                                  f"trainer.activation_checkpointing={ckpt}"])
            dev = torch.device("cuda")
            net, make_optimizer, make_inputs, loss_of = training_step_parts(cfg, dev, batch, ckpt, dwconv="tiles")
            plan = plan_memory(cfg, "cuda", dwconv="tiles")
            optimizer = make_optimizer(net)
            params = list(net.parameters())
            for step in range(steps):
                if step == 1:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(dev)
                inputs = make_inputs()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_of(net, inputs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del loss, inputs
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated(dev)
            rows.append({"model": model, "batch": batch, "img": img, "checkpointing": ckpt, "plan": plan.as_dict(),
                         "measured": {"peak": measured}, "ratio": plan.peak / measured})
            print(f"{model} b{batch} {ckpt}: plan {plan.peak / 2 ** 30:.2f} GiB, max_memory_allocated "
                  f"{measured / 2 ** 30:.2f} GiB, plan/measured {plan.peak / measured:.3f}", flush=True)
            del net, optimizer, params
            torch.cuda.empty_cache()
    return rows


def print_measured(rows: list[dict]) -> None:
    mib = 2 ** 20
    print(f"{'model':>6} {'batch':>5} {'ckpt':>6} {'plan MiB':>9} {'measured MiB':>13} {'plan/measured':>14}  "
          f"(measured = alive across steps {'+'} the step's RSS rise)")
    for r in rows:
        m = r["measured"]
        print(f"{r['model']:>6} {r['batch']:>5} {r['checkpointing']:>6} {r['plan']['peak'] / mib:>9.0f} "
              f"{m['peak'] / mib:>13.0f} {r['ratio']:>14.3f}  ({m['resident'] / mib:.0f} + {m['step_rise'] / mib:.0f})")


def table(sizes, gib, img: int = 224, mask_ratio: float = 0.6) -> list[dict]:
    """The largest batch a process by size, GPU memory and checkpointing, planned for a GPU in bf16."""
    from fcmae.plan import plan_table
    rows = []
    for size in sizes:
        start = time.perf_counter()
        cfg = _config(size, [f"data.img_size={img}", f"model.mask_ratio={mask_ratio}", "data.batch_size=64"])
        t = plan_table(cfg, "cuda", gib)
        rows.append({"model": size, "rows": t["rows"], "seconds": time.perf_counter() - start})
        print(f"{size}: {[(r['gib'], r['largest_batch']) for r in t['rows']]} ({rows[-1]['seconds']:.0f} s)",
              flush=True)
    return rows


def print_table(rows: list[dict], gib) -> None:
    print("| model | " + " | ".join(f"{g:g} GiB (off / stage / block)" for g in gib) + " |")
    print("|---|" + "---|" * len(gib))
    for r in rows:
        cells = [" / ".join(str(x["largest_batch"][c]) for c in ("off", "stage", "block")) for x in r["rows"]]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        model, batch, ckpt, img, threads = argv[1:]
        print(json.dumps(measure_one(model, int(batch), ckpt, int(img), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--models", nargs="+", default=["atto", "tiny"])
    m.add_argument("--batches", nargs="+", type=int, default=[32, 16])
    m.add_argument("--checkpointing", nargs="+", default=["off", "stage", "block"])
    m.add_argument("--img", type=int, default=224)
    m.add_argument("--json", type=Path)
    g = sub.add_parser("gpu")
    g.add_argument("--models", nargs="+", default=["tiny", "base"])
    g.add_argument("--batches", nargs="+", type=int, default=[64, 32])
    g.add_argument("--checkpointing", nargs="+", default=["off", "block"])
    g.add_argument("--img", type=int, default=224)
    g.add_argument("--json", type=Path)
    t = sub.add_parser("table")
    t.add_argument("--sizes", nargs="+", default=list(SIZES))
    t.add_argument("--gib", nargs="+", type=float, default=[24, 40, 80, 141])
    t.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.what == "measure":
        rows = measure(args.models, args.batches, args.checkpointing, args.img)
        print_measured(rows)
    elif args.what == "gpu":
        rows = measure_gpu(args.models, args.batches, args.checkpointing, args.img)
    else:
        rows = table(args.sizes, args.gib)
        print_table(rows, args.gib)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
