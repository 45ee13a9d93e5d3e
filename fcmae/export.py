"""``fcmae-export``: write a dense, verified encoder file from a pretraining checkpoint.

    fcmae-export outputs/convnextv2_atto-synthetic --format timm --out atto.safetensors
    fcmae-export --from-official convnextv2_atto_1k_224_fcmae.pt --format timm --out atto_timm.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import read_checkpoint
from .convert import (FORMATS, CheckpointError, canonical_to_format, infer_shape, load_state_dict_file,
                      save_state_dict, to_canonical, variant_of)
from .models.convnextv2 import ConvNeXtV2
from .models.variants import find_variant


# ---------------------------------------------------------------- verification

def build_dense_model(format: str, depths, dims):
    """The dense model an export of ``format`` is meant to load into (no classifier)."""
    if format == "timm":
        import timm
        variant = find_variant(depths, dims)
        return timm.create_model(f"convnextv2_{variant.name}", pretrained=False, num_classes=0)
    return ConvNeXtV2(depths, dims, num_classes=0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@torch.no_grad()
def verify_export(path: str | os.PathLike, format: str, canonical: Mapping[str, torch.Tensor],
                  img_size: int = 64, batch: int = 2, tol: float = 1e-5) -> float:
    """Load the written file into the dense model and compare its features with the
    sparse encoder's forward (nothing masked) on a random batch. Returns the relative
    error; raises :class:`CheckpointError` if it is not below ``tol``."""
    from .models.sparse_encoder import SparseConvNeXtV2Encoder  # loads the sparse ops only when verifying

    depths, dims = infer_shape(canonical)
    dense = build_dense_model(format, depths, dims).eval()
    written = load_state_dict_file(path)
    if format == "timm":
        dense.load_state_dict(written, strict=True)
    else:
        missing, unexpected = dense.load_state_dict(written, strict=False)
        if unexpected or any(not k.startswith("norm.") for k in missing):
            raise CheckpointError(f"{path}: does not load into ConvNeXtV2 (missing {missing[:5]}, unexpected {unexpected[:5]})")
    sparse = SparseConvNeXtV2Encoder(depths, dims, backend="sparse").eval()
    sparse.load_state_dict(canonical, strict=True)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, img_size, img_size, generator=gen)
    grid = (img_size // 32) ** 2
    ref = sparse(imgs, torch.zeros(batch, grid))
    err = relative_error(dense.forward_features(imgs), ref)
    if not err < tol:
        raise CheckpointError(f"{path}: verification FAILED, dense vs sparse relative error {err:.2e} >= {tol:.0e}")
    return err


# ---------------------------------------------------------------- the command

OFFICIAL_LAYOUTS = ("official", "minkowski")


def export(checkpoint: str | Path, format: str = "timm", out: str | Path | None = None,
           verify: bool = True, log=print, require_official: bool = False, ema: bool = False) -> Path:
    """Convert ``checkpoint`` (file or run directory) to a dense ``format`` file; returns its path.

    ``require_official``: the file must be an official FCMAE release/checkpoint (dense
    or MinkowskiEngine sparse layout), not one of ours or a timm file.
    ``ema``: export the checkpoint's EMA weights (``model_ema``) instead of ``model``.
    """
    src, obj = read_checkpoint(checkpoint)
    if ema:
        if not isinstance(obj.get("model_ema"), dict):
            raise CheckpointError(f"{src} holds no EMA weights ('model_ema'); they exist in fcmae-finetune "
                                  "checkpoints trained with ema.enabled=true")
        obj = obj["model_ema"]
    canonical, layout = to_canonical(obj, source=f"{src} (EMA weights)" if ema else str(src))
    if require_official and layout not in OFFICIAL_LAYOUTS:
        raise CheckpointError(f"{src} has the {layout} layout, not an official FCMAE one (dense or "
                              "MinkowskiEngine sparse keys); pass it without --from-official")
    depths, dims = infer_shape(canonical)
    variant = variant_of(canonical)
    name = f"convnextv2_{variant.name}" if variant else f"custom depths={list(depths)} dims={list(dims)}"
    sd = canonical_to_format(canonical, format)
    out = Path(out) if out else src.with_name(f"{src.stem}_{format}.safetensors")
    save_state_dict(sd, out, metadata={"format": format, "model": name, "source_layout": layout})
    params = sum(v.numel() for k, v in sd.items() if not k.startswith("head."))
    described = {"official": "official dense keys (ours or a release)",
                 "minkowski": "official sparse MinkowskiEngine keys", "timm": "timm keys"}.get(layout, layout)
    log(f"read {src} ({described}, {name})")
    log(f"wrote {out} ({format} format, {params / 1e6:.2f}M encoder parameters, "
        f"{out.stat().st_size / 2**20:.1f} MiB)")
    if verify:
        err = verify_export(out, format, canonical)
        log(f"verified: dense forward equals the sparse encoder with nothing masked (relative error {err:.1e})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint file (ours, official sparse or dense, timm) or a pretraining run directory")
    p.add_argument("--from-official", metavar="FILE",
                   help="an official FCMAE checkpoint (released *_fcmae.pt, or a sparse MinkowskiEngine one)")
    p.add_argument("--format", choices=FORMATS, default="timm",
                   help="official: keys of the official convnextv2.py; timm: timm convnextv2_<size> (default)")
    p.add_argument("--out", help="output .safetensors or .pth (default: next to the checkpoint)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a fcmae-finetune checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip the dense-vs-sparse self-check")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.from_official is None):
        parser.error("give either a checkpoint/run directory or --from-official FILE")
    try:
        export(args.checkpoint or args.from_official, args.format, args.out, verify=not args.no_verify,
               require_official=args.from_official is not None, ema=args.ema)
    except CheckpointError as exc:
        print(f"fcmae-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
