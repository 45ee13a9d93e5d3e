"""Which depthwise conv the ``sparse`` backend runs (``encoder.dwconv``), decided once at start-up:
the Triton tile kernel only where it has just been shown to agree with the canvas reference."""
from __future__ import annotations

import torch

from .compact import _triton_installed, depthwise_rows
from .layout import SparseLayout


def resolve_dwconv(choice: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   on_accelerator: bool | None = None, check=None) -> tuple[str, str]:
    """``(tiles | canvas, why)`` for ``encoder.dwconv``. ``auto`` tries the tile kernel where it runs
    (CUDA with Triton): a start-up self-test against the canvas in the run's dtype, falling back to
    the canvas with the reason when it fails; ``tiles`` makes that failure an error (RuntimeError)."""
    if choice == "canvas":
        return "canvas", "encoder.dwconv=canvas"
    on_accelerator = device.type == "cuda" if on_accelerator is None else on_accelerator
    if choice == "auto" and not (on_accelerator and _triton_installed()):
        return "canvas", "the tile kernel runs on CUDA with Triton"
    if not _triton_installed():
        raise RuntimeError("encoder.dwconv=tiles needs Triton (it ships with torch's Linux wheels); use "
                           "encoder.dwconv=canvas or auto")
    if check is None:
        check = tiles_self_test_error
    error = check(device, dtype)
    if error is None:
        return "tiles", f"its self-test against the canvas passed on {device} in {str(dtype).removeprefix('torch.')}"
    if choice == "tiles":
        raise RuntimeError(f"encoder.dwconv=tiles: {error}; use encoder.dwconv=canvas (or auto, which falls "
                           "back to it)")
    return "canvas", f"the tile kernel failed its start-up self-test ({error})"


def tiles_self_test_error(device: torch.device, dtype: torch.dtype = torch.float32, stages=(0, 3),
                          channels: int = 24, seed: int = 0) -> str | None:
    """Why the tile kernel cannot be trusted on ``device`` in ``dtype``, or None when it can: forward
    and backward on a small random sparse input at ``stages``, compared with the canvas path (the
    reference). Any exception counts as a failure, with its text."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        g = torch.Generator().manual_seed(seed)
        mask = (torch.rand(2, 4, generator=g) < 0.5).long()
        mask[:, 0] = 0
        layout = SparseLayout.from_mask(mask.to(device), (2, 2), 4, None)
        conv = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(device)
        with torch.no_grad():
            conv.weight.normal_(generator=None)
        for stage in stages:
            rows = layout.stages[stage].num_rows
            x = torch.randn(rows, channels, generator=g).to(device=device, dtype=dtype)
            grad = torch.randn(rows, channels, generator=g).to(device=device, dtype=dtype)
            got = {}
            for path in ("tiles", "canvas"):
                xi = x.clone().requires_grad_()
                conv.zero_grad()
                y = depthwise_rows(conv, xi, layout, stage, path)
                gx, gw = torch.autograd.grad(y, [xi, conv.weight], grad)
                got[path] = [t.detach().float() for t in (y, gx, gw)]
            for name, a, b in zip(("output", "input grad", "weight grad"), got["tiles"], got["canvas"]):
                err = float((a - b).norm() / b.norm().clamp(min=1e-12))
                if not err < tol:
                    return (f"the tile kernel's {name} at stage {stage} differs from the canvas reference "
                            f"(relative error {err:.1e} >= {tol:.0e}, {dtype})")
    except Exception as exc:  # any failure here means: do not use the tile kernel
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else 'no detail'}"
    return None
