#!/usr/bin/env python
"""Side-by-side step times of the FCMAE encoder backends.

For every configuration (model, batch, image size, mask ratio, dtype, device) it
builds one model per variant with identical weights and times, interleaved
(every repeat runs each variant once, in rotating order, so drifts in clock or
load hit all of them alike):

- ``encoder``: encoder forward + backward (a fixed random gradient on the output);
- ``step``: the full training step: encoder + decoder + masked loss, backward,
  AdamW step.

Variants: ``sparse`` and ``dense`` (masked-dense) backends, ``unmasked`` (the
plain dense encoder on the whole image; its step still uses the same decoder
and loss), ``minkowski`` when MinkowskiEngine imports, and ``<variant>+compile``
with ``--compile``. Reports medians, images/s, CUDA peak memory and the ratio
of each variant to masked-dense, as a table and as JSON (``--json FILE``).

    python benchmarks/step_time.py                      # CPU, atto, batch 8, 224, mask 0.6, fp32
    python benchmarks/step_time.py --device cuda --models tiny base --batch-sizes 128 \\
        --dtypes bf16 --compile --json gpu.json
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # mae_reference

from fcmae.models import create_fcmae  # noqa: E402
from fcmae.models.masking import num_visible, random_mask  # noqa: E402
from fcmae.models.variants import get_variant  # noqa: E402

BASE_VARIANTS = ("sparse", "dense", "unmasked", "minkowski")
# on request: the sparse backend with its canvas depthwise conv forced (on CUDA `sparse` uses the Triton
# tile kernel), and MAE ViT-B/16 (mae_reference.py), the speed FCMAE-B is held to (issue #19)
EXTRA_VARIANTS = ("sparse-canvas", "mae")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    model: str
    batch: int
    img_size: int
    mask_ratio: float
    dtype: str
    device: str
    variant: str
    encoder_ms: float | None = None
    step_ms: float | None = None
    encoder_img_s: float | None = None
    step_img_s: float | None = None
    encoder_peak_mib: float | None = None
    step_peak_mib: float | None = None
    encoder_ratio: float | None = None
    step_ratio: float | None = None
    encoder_peak_ratio: float | None = None
    step_peak_ratio: float | None = None
    fwd_gflop_per_img: float | None = None  # the training step's forward, torch.utils.flop_counter
    mfu: float | None = None  # 3 x forward FLOPs / step time / --peak-tflops
    dwconv: str | None = None  # the sparse backend's depthwise conv that ran: tiles | canvas
    samples: dict = field(default_factory=dict)
    profile: dict | None = None  # --profile: kernels (CUDA) or ops (CPU) per step, by op class and the top ones


@functools.lru_cache(maxsize=None)
def dwconv_choice(device: torch.device, dtype: str, model: str) -> str:
    """``encoder.dwconv=auto`` resolved as the app resolves it (fcmae.pretrain.choose_dwconv): the tile
    kernel where it runs and passes its self-test at this model's widths in this dtype, else the canvas."""
    from fcmae.sparse.dwconv_choice import resolve_dwconv
    start = time.perf_counter()
    kernel, why = resolve_dwconv("auto", device, DTYPES[dtype], dims=tuple(get_variant(f"convnextv2_{model}").dims))
    print(f"  depthwise conv for {model} {dtype}: {kernel} ({why}; decided in {time.perf_counter() - start:.1f} s)",
          flush=True)
    return kernel


def minkowski_available() -> bool:
    from fcmae.sparse.me_compat import minkowski_error
    return minkowski_error() is None


class Timer:
    """Wall time on CPU; CUDA events around the work (after a sync) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


class Case:
    """One variant's model, optimizer and the two timed closures."""

    def __init__(self, variant: str, reference, cfg):
        self.variant = variant
        base, _, compiled = variant.partition("+")
        backend = {"unmasked": "dense", "sparse-canvas": "sparse"}.get(base, base)
        self.model = copy.deepcopy(reference)
        self.model.encoder.set_backend(backend)
        self.dwconv = None
        if backend == "sparse":  # the kernel the app would pick (its start-up self-test included), or the canvas
            self.dwconv = "canvas" if base == "sparse-canvas" else dwconv_choice(cfg["device"], cfg["dtype"], cfg["model"])
            self.model.encoder.dwconv = self.dwconv
        self.model.to(cfg["device"]).train()
        self.unmasked = base == "unmasked"
        self.autocast = torch.autocast(cfg["device"].type, dtype=DTYPES[cfg["dtype"]],
                                       enabled=cfg["dtype"] != "fp32")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05,
                                     fused=cfg["device"].type == "cuda")
        self.visible = cfg["visible"]
        encoder_fn = self._encoder_out
        step_fn = self._loss
        if compiled:
            encoder_fn = torch.compile(encoder_fn, dynamic=False, backend=cfg["compile_backend"])
            step_fn = torch.compile(step_fn, dynamic=False, backend=cfg["compile_backend"])
        self.encoder_fn, self.step_fn = encoder_fn, step_fn

    def _encoder_out(self, imgs, mask):
        enc = self.model.encoder
        if self.unmasked:
            return enc.forward_unmasked(imgs)
        return enc(imgs, mask, self.visible)

    def _loss(self, imgs, mask):
        m = self.model
        latent = self._encoder_out(imgs, mask)
        pred = m.forward_decoder(latent, mask)
        return m.forward_loss(imgs, pred, mask)

    def forward_flops(self, imgs, mask) -> int:
        """FLOPs of one training-step forward (eager; the backward is counted as 2x this by the caller)."""
        with FlopCounterMode(display=False) as counter, self.autocast, torch.no_grad():
            self._loss(imgs, mask)
        return counter.get_total_flops()

    def encoder(self, imgs, mask, grad):
        with self.autocast:
            out = self.encoder_fn(imgs, mask)
        out.backward(grad.to(out.dtype))
        self.model.zero_grad(set_to_none=True)

    def step(self, imgs, mask, _grad):
        with self.autocast:
            loss = self.step_fn(imgs, mask)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class MaeCase(Case):
    """MAE ViT-B/16 (mask 0.75, its own random masks each call) with the interface of :class:`Case`."""

    def __init__(self, variant: str, cfg):
        from mae_reference import MaeVitB16
        self.variant = variant
        self.model = MaeVitB16(cfg["img_size"]).to(cfg["device"]).train()
        self.autocast = torch.autocast(cfg["device"].type, dtype=DTYPES[cfg["dtype"]],
                                       enabled=cfg["dtype"] != "fp32")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05,
                                     fused=cfg["device"].type == "cuda")
        encoder_fn, step_fn = self.model.encoder, self.model.loss
        if variant.partition("+")[2]:
            encoder_fn = torch.compile(encoder_fn, dynamic=False, backend=cfg["compile_backend"])
            step_fn = torch.compile(step_fn, dynamic=False, backend=cfg["compile_backend"])
        self.encoder_fn, self.step_fn = encoder_fn, step_fn
        self._grad = None

    def encoder(self, imgs, _mask, _grad):
        ids_keep, _ = self.model.random_masking(imgs.shape[0], imgs.device)
        with self.autocast:
            out = self.encoder_fn(imgs, ids_keep)
        if self._grad is None:
            self._grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
        out.backward(self._grad.to(out.dtype))
        self.model.zero_grad(set_to_none=True)

    def step(self, imgs, _mask, _grad):
        ids_keep, mask = self.model.random_masking(imgs.shape[0], imgs.device)
        with self.autocast:
            loss = self.step_fn(imgs, ids_keep, mask)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward_flops(self, imgs, _mask) -> int:
        ids_keep, mask = self.model.random_masking(imgs.shape[0], imgs.device)
        with FlopCounterMode(display=False) as counter, self.autocast, torch.no_grad():
            self.model.loss(imgs, ids_keep, mask)
        return counter.get_total_flops()


def state_bytes(case: Case) -> int:
    """Parameters + optimizer state of one case: the memory its step holds before it starts."""
    total = sum(p.numel() * p.element_size() for p in case.model.parameters())
    for st in case.opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def profile_steps(case: Case, imgs, mask, grad, steps: int, top: int = 15) -> tuple[str, dict]:
    """``torch.profiler`` over ``steps`` full training steps of ``case`` (after its warm-up): the kernels
    (CUDA) or ops (CPU) by self time, as a table, and a summary per step grouped by the op classes of
    ``step_roofline.py`` (with launch counts) and the top 30 by name, for the device check's summary."""
    from torch.profiler import ProfilerActivity, profile
    from step_roofline import kernel_class
    cuda = imgs.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            case.step(imgs, mask, grad)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    rows = []
    for e in averages:
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us <= 0:
            continue
        rows.append({"name": e.key[:160], "ms": us / 1e3 / steps, "count": e.count / steps,
                     "class": kernel_class(e.key)})
    rows.sort(key=lambda r: -r["ms"])
    by_class: dict = {}
    for r in rows:
        c = by_class.setdefault(r["class"], {"ms": 0.0, "launches": 0.0})
        c["ms"] += r["ms"]
        c["launches"] += r["count"]
    summary = {"per_step": True, "steps": steps, "what": "CUDA kernels" if cuda else "CPU ops (self time)",
               "total_ms": sum(r["ms"] for r in rows), "launches": sum(r["count"] for r in rows),
               "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1]["ms"])), "top": rows[:30]}
    return averages.table(sort_by=key, row_limit=top), summary


def run_config(cfg: dict, variants: list[str], warmup: int, repeats: int, log,
               peak_tflops: float | None = None, profile: int = 0) -> list[Result]:
    device = cfg["device"]
    if device.type == "cuda" and "minkowski" in variants:
        from fcmae.sparse.me_compat import import_minkowski
        if not import_minkowski().is_cuda_available():
            log("  minkowski: this MinkowskiEngine build is CPU-only; skipped on cuda")
            variants = [v for v in variants if v != "minkowski"]
    torch.manual_seed(0)
    reference = create_fcmae(f"convnextv2_{cfg['model']}", mask_ratio=cfg["mask_ratio"])
    cases = [MaeCase(v, cfg) if v.partition("+")[0] == "mae" else Case(v, reference, cfg) for v in variants]
    n, size = cfg["batch"], cfg["img_size"]
    grid = size // 32
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(n, 3, size, size, generator=g).to(device)
    masks = [random_mask(n, grid * grid, cfg["mask_ratio"], generator=g).to(device) for _ in range(4)]
    dims = get_variant(f"convnextv2_{cfg['model']}").dims
    grad = torch.randn(n, dims[-1], grid, grid, generator=g).to(device)
    timer = Timer(device)
    samples = {(c.variant, kind): [] for c in cases for kind in ("encoder", "step")}
    peaks = {}
    for kind in ("encoder", "step"):
        for c in cases:  # warm-up (and compilation) outside the timed loop
            for i in range(warmup):
                getattr(c, kind)(imgs, masks[i % len(masks)], grad)
        for r in range(repeats):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for c in order:
                mask = masks[r % len(masks)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                samples[(c.variant, kind)].append(timer(lambda: getattr(c, kind)(imgs, mask, grad)))
                if device.type == "cuda":
                    delta = torch.cuda.max_memory_allocated() - base
                    peaks[(c.variant, kind)] = max(peaks.get((c.variant, kind), 0), delta + state_bytes(c))
        log(f"  {kind}: done")
    profiles = {}
    if profile:
        for c in cases:
            text, profiles[c.variant] = profile_steps(c, imgs, masks[0], grad, profile)
            log(f"  profile of {profile} steps, {c.variant}:\n{text}")
    results = []
    for c in cases:
        r = Result(cfg["model"], n, size, cfg["mask_ratio"], cfg["dtype"], device.type, c.variant)
        r.dwconv = getattr(c, "dwconv", None)
        r.profile = profiles.get(c.variant)
        if not c.variant.startswith("minkowski"):  # MinkowskiEngine's ops are invisible to the counter
            r.fwd_gflop_per_img = c.forward_flops(imgs, masks[0]) / n / 1e9
        for kind in ("encoder", "step"):
            ms = statistics.median(samples[(c.variant, kind)])
            setattr(r, f"{kind}_ms", ms)
            setattr(r, f"{kind}_img_s", n / ms * 1e3)
            if (c.variant, kind) in peaks:
                setattr(r, f"{kind}_peak_mib", peaks[(c.variant, kind)] / 2**20)
            r.samples[kind] = samples[(c.variant, kind)]
        if peak_tflops and r.fwd_gflop_per_img:
            r.mfu = 3 * r.fwd_gflop_per_img * 1e9 * r.step_img_s / (peak_tflops * 1e12)
        results.append(r)
    ref = {r.variant.partition("+")[2]: r for r in results if r.variant.partition("+")[0] == "dense"}
    for r in results:
        d = ref.get(r.variant.partition("+")[2], ref.get(""))
        if d is None:
            continue
        for kind in ("encoder", "step"):
            setattr(r, f"{kind}_ratio", getattr(r, f"{kind}_ms") / getattr(d, f"{kind}_ms"))
            if getattr(r, f"{kind}_peak_mib") is not None:
                setattr(r, f"{kind}_peak_ratio", getattr(r, f"{kind}_peak_mib") / getattr(d, f"{kind}_peak_mib"))
    return results


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    head = ("model", "batch", "size", "mask", "dtype", "dev", "variant", "enc ms", "enc/dense",
            "step ms", "step/dense", "step img/s", "step MiB", "mem/dense", "GFLOP/img", "MFU")
    rows = [head]
    for r in results:
        variant = r.variant + (f" [{r.dwconv}]" if r.dwconv else "")  # the depthwise conv that ran
        rows.append((r.model, str(r.batch), str(r.img_size), f"{r.mask_ratio:g}", r.dtype, r.device, variant,
                     fmt(r.encoder_ms, ".1f"), fmt(r.encoder_ratio, ".2f"), fmt(r.step_ms, ".1f"),
                     fmt(r.step_ratio, ".2f"), fmt(r.step_img_s, ".1f"), fmt(r.step_peak_mib, ".0f"),
                     fmt(r.step_peak_ratio, ".2f"), fmt(r.fwd_gflop_per_img, ".2f"), fmt(r.mfu, ".1%")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["atto"], help="sizes: atto femto pico nano tiny base large huge")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--img-sizes", nargs="+", type=int, default=[224])
    p.add_argument("--mask-ratios", nargs="+", type=float, default=[0.6])
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--devices", "--device", nargs="+", default=["cpu"], help="cpu and/or cuda")
    p.add_argument("--variants", nargs="+", default=list(BASE_VARIANTS), choices=BASE_VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for the dtype (e.g. 989 for H100 SXM bf16 dense): adds MFU = 3 x forward "
                        "FLOPs / step time / peak")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd copies of every variant")
    p.add_argument("--only-compiled", action="store_true", help="with --compile: drop the eager variants")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (aot_eager: traced as for inductor, no code generated; for dry runs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, torch.profiler over STEPS steps of every variant: top kernels by self time")
    p.add_argument("--json", type=Path, default=None, help="write all results (with raw samples) here")
    return p.parse_args(argv)


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants if v != "minkowski" or minkowski_available()]
    if "minkowski" in args.variants and "minkowski" not in variants:
        print("minkowski: MinkowskiEngine is not importable; skipped (launch/install_minkowski.sh)")
    if args.compile:
        compiled = [f"{v}+compile" for v in variants if v != "minkowski"]
        variants = compiled if args.only_compiled else variants + compiled
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    if "cuda" in args.devices:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
        env["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    print(f"# {json.dumps(env)}")
    results = []
    for model, batch, size, ratio, dtype, dev in itertools.product(
            args.models, args.batch_sizes, args.img_sizes, args.mask_ratios, args.dtypes, args.devices):
        if size % 32:
            raise SystemExit(f"--img-sizes {size}: must be a multiple of 32")
        cfg = {"model": model, "batch": batch, "img_size": size, "mask_ratio": ratio, "dtype": dtype,
               "device": torch.device(dev), "visible": num_visible((size // 32) ** 2, ratio),
               "compile_backend": args.compile_backend}
        print(f"{model} batch={batch} {size}px mask={ratio:g} {dtype} {dev}: {', '.join(variants)}", flush=True)
        results += run_config(cfg, variants, args.warmup, args.repeats, lambda s: print(s, flush=True),
                              args.peak_tflops, args.profile)
        if args.json:  # after every configuration: a run cut off by a time limit keeps what it measured
            args.json.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": [asdict(r) for r in results]}, indent=1))
    print(table(results))
    if args.peak_tflops:
        print(f"MFU: 3 x forward FLOPs (torch.utils.flop_counter) / step time / {args.peak_tflops:g} TFLOP/s "
              "(--peak-tflops)")
    if args.json:
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
