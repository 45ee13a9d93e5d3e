"""``fcmae-export``: write a dense, verified encoder file from a pretraining checkpoint.

    fcmae-export outputs/convnextv2_atto-synthetic --format timm --out atto.safetensors
    fcmae-export --from-official convnextv2_atto_1k_224_fcmae.pt --format timm --out atto_timm.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CHECKPOINT_DIR, LAST
from .convert import (FORMATS, CheckpointError, canonical_to_format, infer_shape, load_state_dict_file,
                      save_state_dict, to_canonical, variant_of, verify_export)

# Where a pretraining run directory keeps its last checkpoint (a bare last.pt is accepted too).
RUN_CHECKPOINTS = (f"{CHECKPOINT_DIR}/{LAST}", LAST)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's last checkpoint."""
    path = Path(path)
    if path.is_dir():
        for rel in RUN_CHECKPOINTS:
            if (path / rel).is_file():
                return path / rel
        raise CheckpointError(
            f"{path} is a directory without a checkpoint ({' or '.join(RUN_CHECKPOINTS)}); "
            "pass a pretraining run directory or a checkpoint file"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return path


OFFICIAL_LAYOUTS = ("official", "minkowski")


def export(checkpoint: str | Path, format: str = "timm", out: str | Path | None = None,
           verify: bool = True, log=print, require_official: bool = False, ema: bool = False) -> Path:
    """Convert ``checkpoint`` (file or run directory) to a dense ``format`` file; returns its path.

    ``require_official``: the file must be an official FCMAE release/checkpoint (dense
    or MinkowskiEngine sparse layout), not one of ours or a timm file.
    ``ema``: export the checkpoint's EMA weights (``model_ema``) instead of ``model``.
    """
    src = resolve_checkpoint(checkpoint)
    obj = load_state_dict_file(src)
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
