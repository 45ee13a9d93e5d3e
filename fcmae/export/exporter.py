"""``fcmae-export``: write a dense, verified encoder file from a pretraining checkpoint.

    fcmae-export outputs/convnextv2_atto-synthetic --format timm --out atto.safetensors
    fcmae-export --from-official convnextv2_atto_1k_224_fcmae.pt --format timm --out atto_timm.safetensors
    fcmae-export outputs/convnextv2_atto-synthetic --format hf --out atto-hf     # transformers folder
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping

import torch

from ..storage.checkpoint_record import read_for_inspection
from ..storage.files import DiskWriteError
from ..models.convnextv2 import ConvNeXtV2
from ..models.masking import image_shape
from ..models.timm_convnextv2 import TIMM_STEM_2, timm_convnextv2
from ..models.variants import find_variant
from ..storage.run_lock import RunDirectoryUnwritable, check_writable
from ..storage.weights_file import CheckpointError, load_state_dict_file, save_state_dict
from .convert import (STEM, decoder_state, FORMATS, canonical_to_format, in_chans_of, infer_shape, stem_of, to_canonical,
                      unwrap_state_dict, variant_of)
from .described import input_description, rescale_factor, write_timm_folder
from .hf import IMAGENET_MEAN, IMAGENET_STD


# ---------------------------------------------------------------- verification

def build_dense_model(format: str, depths, dims, in_chans: int = 3, stem_stride: int = 4):
    """The dense model an export of ``format`` is meant to load into (no classifier); a stem of another
    stride than 4 (16- or 8-pixel patches) is timm's ``patch_size`` (:func:`timm_convnextv2`)."""
    if format == "timm":
        variant = find_variant(depths, dims)
        return timm_convnextv2(f"convnextv2_{variant.name}", stem_stride, num_classes=0, in_chans=in_chans)
    return ConvNeXtV2(depths, dims, in_chans=in_chans, num_classes=0, stem_stride=stem_stride)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _check_images(in_chans: int = 3, img_size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))


def _sparse_unmasked(state_dict: Mapping[str, torch.Tensor], depths, dims, imgs: torch.Tensor) -> torch.Tensor:
    """The sparse encoder (``strict`` load of ``state_dict``) on ``imgs`` with nothing masked."""
    from ..models.sparse_encoder import SparseConvNeXtV2Encoder  # loads the sparse ops only when verifying
    patch = 8 * stem_of(state_dict)
    model = SparseConvNeXtV2Encoder(depths, dims, imgs.shape[1], backend="sparse", patch_size=patch).eval()
    model.load_state_dict(state_dict, strict=True)
    return model(imgs, torch.zeros(imgs.shape[0], (imgs.shape[-2] // patch) * (imgs.shape[-1] // patch)))


@torch.no_grad()
def native_features(source: Mapping, layout: str, depths, dims, imgs: torch.Tensor) -> torch.Tensor | None:
    """Features of the *source* checkpoint computed by a model that reads its keys as they are,
    without the converter (so a reading error of the converter shows as a mismatch):
    official dense keys (ours, ``encoder.``-prefixed, or a release) strictly into the sparse
    encoder, run with nothing masked; timm keys into timm's ``convnextv2_<size>``. None where
    no such reader exists here (MinkowskiEngine kernels: their reading is not re-checked)."""
    sd = unwrap_state_dict(source)
    if layout == "official":
        enc = {}
        for k, v in sd.items():
            k = k.removeprefix("module.").removeprefix("encoder.")
            if k.startswith(("stages.", "downsample_layers.")):
                enc[k] = v
        try:
            return _sparse_unmasked(enc, depths, dims, imgs)
        except RuntimeError:
            return None  # stored in another shape (e.g. a GRN of another rank): only the converter reads it
    if layout == "timm":
        body = {k.removeprefix("module."): v for k, v in sd.items() if not k.removeprefix("module.").startswith("head.")}
        model = build_dense_model("timm", depths, dims, imgs.shape[1], stem_of(body)).eval()
        missing, unexpected = model.load_state_dict(body, strict=False)
        if missing or unexpected:
            return None
        return model.forward_features(imgs)
    return None


@torch.no_grad()
def reference_features(source: Mapping | None, layout: str | None, canonical: Mapping[str, torch.Tensor], depths,
                       dims, imgs: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """What an export is checked against: the source read without the converter
    (:func:`native_features`) where a reader exists, else the sparse encoder on the converter's
    reading. Returns ``(features, whether the source was read independently)``."""
    ref = native_features(source, layout, depths, dims, imgs) if source is not None else None
    if ref is not None:
        return ref, True
    return _sparse_unmasked(canonical, depths, dims, imgs), False


@torch.no_grad()
def verify_export(path: str | os.PathLike, format: str, canonical: Mapping[str, torch.Tensor],
                  source: Mapping | None = None, layout: str | None = None, tol: float = 1e-5) -> tuple[float, str]:
    """Load the written file into the model its format is for (timm's, or the official dense
    code's) and compare its features with the source's, computed by a model that reads the
    source without the converter (:func:`native_features`). Where none can, the reference is the
    sparse encoder on the converter's reading (a check of the writing side only), and the
    returned description says so. Returns ``(relative error, what was compared)``; raises
    :class:`CheckpointError` if the error is not below ``tol``."""
    depths, dims = infer_shape(canonical)
    dense = build_dense_model(format, depths, dims, in_chans_of(canonical), stem_of(canonical)).eval()
    written = load_state_dict_file(path)
    if format == "timm":
        dense.load_state_dict(written, strict=True)
    else:
        missing, unexpected = dense.load_state_dict(written, strict=False)
        if unexpected or any(not k.startswith("norm.") for k in missing):
            raise CheckpointError(f"{path}: does not load into ConvNeXtV2 (missing {missing[:5]}, unexpected {unexpected[:5]})")
    imgs = _check_images(in_chans_of(canonical))
    ref, independent = reference_features(source, layout, canonical, depths, dims, imgs)
    if independent:
        what = (f"the written file in {'timm' if format == 'timm' else 'the official dense ConvNeXtV2'} equals the "
                f"source checkpoint read without the converter ({layout} keys)")
    else:
        what = (f"the written file equals the converter's reading of the source; the reading itself ({layout} "
                "keys) is NOT independently verified here")
    err = relative_error(dense.forward_features(imgs), ref)
    if not err < tol:
        raise CheckpointError(f"{path}: verification FAILED, written file vs source relative error {err:.2e} >= "
                              f"{tol:.0e} ({what.split(';')[0]})")
    return err, what


# ---------------------------------------------------------------- the command

OFFICIAL_LAYOUTS = ("official", "minkowski")


def export(checkpoint: str | Path, format: str = "timm", out: str | Path | None = None,
           verify: bool = True, log=print, require_official: bool = False, ema: bool = False) -> Path:
    """Convert ``checkpoint`` (file or run directory) to a dense ``format`` file; returns its path.

    ``require_official``: the file must be an official FCMAE release/checkpoint (dense
    or MinkowskiEngine sparse layout), not one of ours or a timm file.
    ``ema``: export the checkpoint's EMA weights (``model_ema``) instead of ``model``.
    """
    found = read_for_inspection(checkpoint)
    src, record, obj = found.source, found.record, found.weights
    divergence = record.divergence() if record is not None else ""
    if divergence:
        log(f"warning: {src} comes from a run whose {divergence}: its weights may be worse than its loss "
            "curve's best; look at metrics.jsonl before using them")
    if ema:
        if record is None or record.ema_weights is None:
            raise CheckpointError(f"{src} holds no EMA weights; they exist in fcmae-finetune checkpoints trained "
                                  "with ema.enabled=true")
        obj = record.ema_weights
    canonical, layout = to_canonical(obj, source=f"{src} (EMA weights)" if ema else str(src))
    if require_official and layout not in OFFICIAL_LAYOUTS:
        raise CheckpointError(f"{src} has the {layout} layout, not an official FCMAE one (dense or "
                              "MinkowskiEngine sparse keys); pass it without --from-official")
    folder = format in ("hf", "timm-dir")
    default_out = src.with_name(f"{src.stem}_{format.replace('-dir', '')}" if folder else
                                f"{src.stem}_{format}.safetensors")
    if not folder and out is not None:
        out = Path(out)
        if out.is_dir():  # a folder: the default file name, inside it
            out = out / default_out.name
        elif out.suffix not in (".safetensors", ".pth", ".pt"):
            raise CheckpointError(f"--out {out}: a weights file ends in .safetensors, .pth or .pt; or name an "
                                  f"existing folder to write {default_out.name} into")
    _check_writable((Path(out) if out else default_out).parent, out is None)
    depths, dims = infer_shape(canonical)
    variant = variant_of(canonical)
    name = f"convnextv2_{variant.name}" if variant else f"custom depths={list(depths)} dims={list(dims)}"
    if format == "hf":
        return _export_hf(src, obj, record, canonical, layout, name, out, verify, log)
    if format == "fcmae":
        return _export_full(src, record, name, Path(out) if out else default_out, verify, log)
    described = input_description(record)
    metadata = {"format": format, "model": name, "source_layout": layout,
                **({"input": json.dumps(described)} if described else {})}
    if format == "timm-dir":
        return _export_timm_folder(src, canonical, layout, name, variant, Path(out) if out else default_out,
                                   described, metadata, verify, log, obj)
    sd = canonical_to_format(canonical, format)
    out = Path(out) if out else src.with_name(f"{src.stem}_{format}.safetensors")
    save_state_dict(sd, out, metadata=metadata)
    params = sum(v.numel() for k, v in sd.items() if not k.startswith("head."))
    described = {"official": "official dense keys (ours or a release)",
                 "minkowski": "official sparse MinkowskiEngine keys", "timm": "timm keys"}.get(layout, layout)
    log(f"read {src} ({described}, {name})")
    log(f"wrote {out} ({format} format, {params / 1e6:.2f}M encoder parameters, "
        f"{out.stat().st_size / 2**20:.1f} MiB)")
    stem = stem_of(canonical)
    if stem != 4:
        how = ((TIMM_STEM_2.format(name=name) if stem == 2 else f"timm.create_model('{name}', patch_size={stem})")
               if format == "timm" else
               f"the official ConvNeXtV2 with downsample_layers[0][0] = nn.Conv2d({in_chans_of(canonical)}, "
               f"{int(canonical[STEM].shape[0])}, kernel_size={stem}, stride={stem}) before load_state_dict")
        log(f"the stem has stride {stem} ({8 * stem}-pixel patches), not ConvNeXt V2's 4: load it into {how}")
    if verify:
        err, what = verify_export(out, format, canonical, obj, layout)
        log(f"verified: {what} (relative error {err:.1e})")
    return out


def full_model_config(record) -> dict:
    """What builds the FCMAE model a pretraining checkpoint holds, and how its input is made: the
    model keys of its config, the patch size, and the data's normalisation and bands."""
    keys = ("name", "depths", "dims", "in_chans", "decoder_depth", "decoder_embed_dim", "mask_ratio", "norm_pix_loss")
    return {**{k: record.setting(f"model.{k}") for k in keys}, "patch_size": record.setting("model.patch_size", 32),
            **{k: record.setting(f"data.{k}") for k in ("img_size", "mean", "std", "channels", "bands")}}


def _export_full(src: Path, record, name: str, out: Path, verify: bool, log) -> Path:
    """``--format fcmae``: the whole FCMAE model of a pretraining checkpoint (encoder, decoder, mask token,
    prediction head) in our own keys, with the model's config in the metadata: what ``init_from`` needs to
    continue pretraining where the source stopped."""
    if record is None or not decoder_state({"model": record.model}) or not record.config:
        raise CheckpointError(f"{src} holds no full FCMAE model (a decoder and the run's config): --format fcmae "
                              "exports a pretraining run or checkpoint of ours; use --format timm for encoder weights")
    sd = {k: v for k, v in record.model.items() if isinstance(v, torch.Tensor)}
    config, described = full_model_config(record), input_description(record)
    save_state_dict(sd, out, metadata={"format": "fcmae", "model": name, "fcmae_config": json.dumps(config),
                                       "step": record.step, **({"input": json.dumps(described)} if described else {})})
    log(f"read {src} (a pretraining checkpoint, {name}, step {record.step})")
    log(f"wrote {out} (fcmae format: encoder, decoder and mask token, {len(sd)} tensors, "
        f"{out.stat().st_size / 2**20:.1f} MiB); continue pretraining from it with init_from={out}")
    if verify:
        back = load_state_dict_file(out)
        same = set(back) == set(sd) and all(torch.equal(back[k], sd[k].cpu()) for k in sd)
        if not same:
            raise CheckpointError(f"{out}: verification FAILED, the written tensors differ from the checkpoint's")
        log(f"verified: the file holds the checkpoint's {len(sd)} tensors bit for bit")
    return out


def _export_timm_folder(src: Path, canonical, layout: str, name: str, variant, out: Path, described, metadata: dict,
                        verify: bool, log, obj) -> Path:
    """``--format timm-dir``: timm's model folder (:mod:`fcmae.export.described`)."""
    if variant is None:
        raise CheckpointError(f"{src} is a {name}: timm has no architecture of that shape; use --format timm "
                              "and build the model yourself")
    if stem_of(canonical) == 2:
        raise CheckpointError(f"{src} was pretrained on 16-pixel patches (a stem of stride 2): timm builds such a "
                              "stem with a stride-2 downsample after it, which this model does not have, so a timm "
                              "folder would not load. Use --format timm and build the model as "
                              + TIMM_STEM_2.format(name=name) + ", or --format hf")
    in_chans = in_chans_of(canonical)
    write_timm_folder(canonical_to_format(canonical, "timm"), out, name, described, in_chans,
                      {**metadata, "format": "timm"})
    log(f"read {src} ({layout} layout, {name})")
    log(f"wrote {out}/ (config.json and model.safetensors: timm.create_model('local-dir:{out}', pretrained=True); "
        f"{'mean/std of the run' if described else 'no input description in the source: ImageNet mean/std'})")
    if verify:
        err, what = verify_export(out / "model.safetensors", "timm", canonical, obj, layout)
        log(f"verified: {what} (relative error {err:.1e})")
    return out


def _check_writable(folder: Path, default: bool) -> None:
    """Refuse an output folder that cannot be written before any work is done."""
    try:
        check_writable(folder)
    except RunDirectoryUnwritable as exc:
        cause = str(exc).split("(", 1)[1].split(")", 1)[0] if "(" in str(exc) else "not writable"
        hint = "; the default output goes beside the checkpoint: write it elsewhere with --out PATH" if default \
            else "; choose another --out"
        raise DiskWriteError(f"cannot write the export in {folder} ({cause}){hint}") from None


def _export_hf(src: Path, obj: Mapping, record, canonical, layout: str, name: str, out, verify: bool, log) -> Path:
    """``--format hf``: a transformers folder, checked in place before it is moved to ``out``."""
    from .hf import hf_features, require_transformers, write_hf
    depths, dims = infer_shape(canonical)
    def data(key, default=None):  # the pretraining run's image size and normalisation
        return record.setting(f"data.{key}", default) if record is not None else default
    out = Path(out) if out else src.with_name(f"{src.stem}_hf")
    result = {}

    @torch.no_grad()
    def check(folder: Path) -> None:
        require_transformers()
        imgs = _check_images(in_chans_of(canonical))
        ref, independent = reference_features(obj, layout, canonical, depths, dims, imgs)
        what = (f"the source checkpoint read without the converter ({layout} keys)" if independent else
                f"the converter's reading of the source (the reading of {layout} keys is NOT independently verified)")
        err = relative_error(hf_features(folder, imgs), ref)
        if not err < 1e-5:
            raise CheckpointError(f"{out}: verification FAILED, transformers ConvNextV2Model vs source relative "
                                  f"error {err:.2e} >= 1e-05; nothing was written")
        result.update(err=err, what=what)

    log(f"read {src} ({layout} keys, {name})")
    pixel_type = record.pixel_type if record is not None else None
    rescale = rescale_factor(pixel_type, data("channels", "rgb"))
    if rescale is None and not pixel_type:
        log("warning: the source does not record its files' pixel type: the processor does not rescale; feed it "
            "pixels as the run read them (integers divided by their type's largest value)")
    described = input_description(record)
    h, w = image_shape(data("img_size", 224))
    if h != w:
        log(f"note: the run trained on {h}x{w} images; transformers' ConvNextImageProcessor takes one size, so the "
            f"folder's processor resizes the short side to {min(h, w)} and crops square (the model itself takes "
            "any size that is a multiple of the patch)")
    write_hf(canonical, depths, dims, out, min(h, w), data("mean", IMAGENET_MEAN),
             data("std", IMAGENET_STD), check=check if verify else None, rescale=rescale,
             metadata={"format": "hf", "model": name, "source_layout": layout,
                       **({"input": json.dumps(described)} if described else {})})
    params = sum(v.numel() for v in canonical.values())
    log(f"wrote {out}/ (transformers ConvNextV2Model: config.json, model.safetensors, preprocessor_config.json; "
        f"{params / 1e6:.2f}M encoder parameters)")
    if verify:
        log(f"verified: transformers' last hidden state equals {result['what']} (relative error {result['err']:.1e})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint file (ours, official sparse or dense, timm) or a pretraining run directory")
    p.add_argument("--from-official", metavar="FILE",
                   help="an official FCMAE checkpoint (released *_fcmae.pt, or a sparse MinkowskiEngine one)")
    p.add_argument("--format", choices=FORMATS + ("timm-dir", "hf", "fcmae"), default="timm",
                   help="official: keys of the official convnextv2.py; timm: timm convnextv2_<size> (default); "
                        "timm-dir: a timm model folder (config.json with the run's mean/std, model.safetensors) for "
                        "timm.create_model('local-dir:DIR'); hf: a Hugging Face transformers folder (ConvNextV2Model); fcmae: the whole FCMAE model "
                        "(encoder, decoder, mask token) with its config, to continue pretraining (init_from=)")
    p.add_argument("--out", help="output .safetensors or .pth (an existing folder: the default name inside it), "
                   "a folder for --format hf (default: next to the checkpoint)")
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
    except (CheckpointError, DiskWriteError) as exc:
        print(f"fcmae-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
