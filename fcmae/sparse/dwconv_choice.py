"""Which depthwise conv the ``sparse`` backend runs (``encoder.dwconv``), decided once at start-up:
the Triton tile kernel only where it has just been shown to agree with the canvas reference, and with
``auto`` only at the stages where it is faster on this GPU (:func:`choose_by_speed`), a choice the run
directory records and a resume on the same GPU reuses."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..models.masking import image_shape, num_visible
from .compact import _triton_installed, depthwise_rows
from .layout import SparseLayout

ATTO_DIMS = (40, 80, 160, 320)  # a default; the app passes its model's stage widths
CHOICE_FILE = "dwconv_choice.json"  # in the run directory: auto's per-stage choice and the timings behind it

log = logging.getLogger("fcmae")


def resolve_dwconv(choice: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   on_accelerator: bool | None = None, check=None, dims: tuple[int, ...] = ATTO_DIMS) -> tuple[str, str]:
    """``(tiles | canvas, why)`` for ``encoder.dwconv``. ``auto`` tries the tile kernel where it runs
    (CUDA with Triton): a start-up self-test against the canvas in the run's dtype at the model's stage
    widths ``dims``, falling back to the canvas with the reason when it fails; ``tiles`` makes that
    failure an error (RuntimeError)."""
    if choice == "canvas":
        return "canvas", "encoder.dwconv=canvas"
    on_accelerator = device.type == "cuda" if on_accelerator is None else on_accelerator
    if choice == "auto" and not (on_accelerator and _triton_installed()):
        return "canvas", "the tile kernel runs on CUDA with Triton"
    if not _triton_installed():
        raise RuntimeError("encoder.dwconv=tiles needs Triton (it ships with torch's Linux wheels); use "
                           "encoder.dwconv=canvas or auto")
    error = check(device, dtype) if check is not None else tiles_self_test_error(device, dtype, dims)
    if error is None:
        return "tiles", f"its self-test against the canvas passed on {device} in {str(dtype).removeprefix('torch.')}"
    if choice == "tiles":
        raise RuntimeError(f"encoder.dwconv=tiles: {error}; use encoder.dwconv=canvas (or auto, which falls "
                           "back to it)")
    return "canvas", f"the tile kernel failed its start-up self-test ({error})"


# Element-wise tolerances against the canvas path by the run's dtype: (rtol, atol as a share of the
# reference's largest magnitude). Both paths accumulate in fp32 and round once to the dtype, so they
# differ by about one rounding of the output (bf16: 2^-8 relative) plus summation order.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}
# The weight grad reaches the fp32 parameter unrounded whatever the run's dtype (products of two values of
# that dtype are exact in fp32; only the order of the fp32 sums differs): checked at fp32's tolerance
# against the fp32 reference, so a weight grad 1% off fails in bf16 too (at bf16's tolerance it passed).
WGRAD_TOLERANCE = (1e-4, 1e-5)


def self_test_images(grid: tuple[int, int], mask_ratio: float, dims: tuple[int, ...] = ATTO_DIMS,
                     device: torch.device = torch.device("cpu")) -> int:
    """Images enough that the weight grad's every loop runs at every stage on ``device``: more than one
    chunk, and every chunk summing at least two of its units (tile rows; tiles at 2x2 tiles: one tile per
    visible patch)."""
    from .triton_dwconv import wgrad_plan
    visible = num_visible(grid[0] * grid[1], mask_ratio)
    for images in range(1, 100_000):
        plans = [wgrad_plan(images * visible, c, 8 >> stage, device) for stage, c in enumerate(dims)]
        if all(p.chunks >= 2 and p.rows >= 2 * p.chunks for p in plans):
            return images
    raise ValueError(f"no batch runs every loop of the weight grad at widths {dims}")


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off for the reference (the app leaves it on; a TF32 reference can fail a right kernel)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _reference(conv: torch.nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, layout: SparseLayout, stage: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Output, input grad and weight grad of the canvas path in fp32 (TF32 off) on ``x``, ``grad`` and the
    conv's parameters rounded to ``dtype``; the output and input grad rounded to ``dtype`` once (what a conv
    in ``dtype`` with fp32 accumulation gives, cuDNN's), the weight grad left in fp32 (what training's is). Not the canvas under autocast: some CPU backends
    accumulate a bf16 conv's input grad in bf16 (0.38 off at 26 on an AMD EPYC, four roundings' worth)."""
    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).float()
    ref = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                          groups=conv.groups, bias=conv.bias is not None).to(x.device)
    with torch.no_grad():
        ref.weight.copy_(rounded(conv.weight))
        if conv.bias is not None:
            ref.bias.copy_(rounded(conv.bias))
    xi = rounded(x).requires_grad_()
    with _exact_fp32():
        y = depthwise_rows(ref, xi, layout, stage, "canvas")
        gx, gw = torch.autograd.grad(y, [xi, ref.weight], rounded(grad))
    return rounded(y), rounded(gx), gw.detach()  # the weight grad stays fp32, as training's


def tiles_self_test_error(device: torch.device, dtype: torch.dtype = torch.float32, dims: tuple[int, ...] = ATTO_DIMS,
                          grid: tuple[int, int] = (7, 7), mask_ratio: float = 0.6, images: int | None = None,
                          seed: int = 0) -> str | None:
    """Why the tile kernel cannot be trusted on ``device`` in ``dtype``, or None when it can.

    As training runs it: fp32 inputs and parameters under autocast to ``dtype`` (none for fp32), at
    every stage with its real width ``dims[k]`` (the width is a compile-time constant of the kernels, so
    these are the very binaries training runs: each tile size, channel block and dtype), on a 224-px grid
    with enough images that every loop of both kernels runs. Output, input grad and weight grad are
    compared element-wise with the canvas path computed exactly in fp32 from the same rounded inputs
    (:func:`_reference`, TF32 off). Any exception counts as a failure, with its text."""
    rtol, atol_share = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    images = images or self_test_images(grid, mask_ratio, dims, device)
    try:
        g = torch.Generator().manual_seed(seed)
        keep = num_visible(grid[0] * grid[1], mask_ratio)  # as the app masks
        mask = torch.ones(images, grid[0] * grid[1], dtype=torch.long)
        mask.scatter_(1, torch.rand(images, grid[0] * grid[1], generator=g).argsort(1)[:, :keep], 0)
        layout = SparseLayout.from_mask(mask.to(device), grid, len(dims), None)
        for stage, channels in enumerate(dims):
            conv = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(device)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
            rows = layout.stages[stage].num_rows
            x = torch.randn(rows, channels, generator=g).to(device)
            grad = torch.randn(rows, channels, generator=g).to(device)
            got = {}
            for path in ("tiles", "canvas"):
                if path == "tiles":  # as training runs it: fp32 in, autocast to the run's dtype
                    xi = x.clone().requires_grad_()
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        y = depthwise_rows(conv, xi, layout, stage, path)
                        gx, gw = torch.autograd.grad(y, [xi, conv.weight], grad.to(y.dtype))
                else:  # the reference: exact fp32 sums of the same rounded inputs, rounded once
                    y, gx, gw = _reference(conv, x, grad, layout, stage, dtype)
                got[path] = [t.detach().float() for t in (y, gx, gw)]
            for name, a, b in zip(("output", "input grad", "weight grad"), got["tiles"], got["canvas"]):
                r, share = WGRAD_TOLERANCE if name == "weight grad" else (rtol, atol_share)
                try:
                    torch.testing.assert_close(a, b, rtol=r, atol=share * float(b.abs().max()))
                except AssertionError as exc:
                    detail = " ".join(line.strip() for line in str(exc).splitlines()[1:4])
                    return (f"the tile kernel's {name} at stage {stage} ({channels} channels) differs from the "
                            f"canvas reference in {str(dtype).removeprefix('torch.')}: {detail}")
    except Exception as exc:  # any failure here means: do not use the tile kernel
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else 'no detail'}"
    return None


# ---------------------------------------------------------------- auto: the faster path, stage by stage

def stage_rows(batch: int, img_size, mask_ratio: float, stages: int = 4, patch_size: int = 32) -> list[int]:
    """Active rows at each stage for a batch (visible patches x the sites a patch has there); ``img_size``:
    one side or ``[H, W]``."""
    h, w = image_shape(img_size)
    visible = num_visible((h // patch_size) * (w // patch_size), mask_ratio)
    return [batch * visible * 4 ** (stages - 1 - k) for k in range(stages)]


def cuda_timer(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...], batch: int, img_size: int,
               mask_ratio: float, warmup: int = 2, repeats: int = 5, patch_size: int = 32) -> Callable[[str, int], float]:
    """``measure(path, stage) -> ms``: forward and backward of one block's depthwise conv at the batch's real
    shapes, the median of ``repeats`` after ``warmup``, timed with CUDA events."""
    h, w = image_shape(img_size)
    grid = (h // patch_size, w // patch_size)
    g = torch.Generator().manual_seed(0)
    keep = num_visible(grid[0] * grid[1], mask_ratio)
    mask = torch.ones(batch, grid[0] * grid[1], dtype=torch.long)
    mask.scatter_(1, torch.rand(batch, grid[0] * grid[1], generator=g).argsort(1)[:, :keep], 0)
    layout = SparseLayout.from_mask(mask.to(device), grid, len(dims), keep)

    def measure(path: str, stage: int) -> float:
        c = dims[stage]
        conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).to(device)
        x = torch.randn(layout.stages[stage].num_rows, c, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)

        def once():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                y = depthwise_rows(conv, x, layout, stage, path)
            torch.autograd.grad(y, [x, conv.weight], grad.to(y.dtype))
        for _ in range(warmup):
            once()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    return measure


def choose_by_speed(measure: Callable[[str, int], float], stages: int) -> tuple[list[str], list[dict]]:
    """The faster path at each stage, and the timings (ms) behind each choice."""
    choice, timings = [], []
    for stage in range(stages):
        ms = {path: float(measure(path, stage)) for path in ("tiles", "canvas")}
        choice.append(min(ms, key=ms.get))
        timings.append(ms)
    return choice, timings


def auto_by_speed(run_dir: Path | None, key: dict, measure: Callable[[str, int], float], stages: int,
                  is_main: bool = True) -> tuple[list[str], str]:
    """``encoder.dwconv=auto`` once the tile kernel passed its self-test: the per-stage choice recorded in
    ``run_dir`` for the same ``key`` (GPU name, dtype, widths, batch shapes: a resume keeps its numerics), else
    measured now (``measure``) and recorded. Returns the choice and how it was made, in words."""
    path = Path(run_dir) / CHOICE_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            record = None
        if record and record.get("key") == key and len(record.get("choice", [])) == stages:
            return list(record["choice"]), (f"the choice recorded in {path} on {key['device']} (tiles / canvas ms a "
                                            f"block: {_said(record['timings'])})")
    choice, timings = choose_by_speed(measure, stages)
    if path is not None and is_main:
        from ..storage.files import write_atomic
        record = {"key": key, "choice": choice, "timings": timings, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"), "dwconv choice")
    return choice, f"measured on {key['device']}, tiles / canvas ms a block, forward + backward: {_said(timings)}"


def _said(timings: list[dict]) -> str:
    return "; ".join(f"stage {k} {t['tiles']:.3f} / {t['canvas']:.3f}" for k, t in enumerate(timings))
