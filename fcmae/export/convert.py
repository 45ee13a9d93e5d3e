"""Sparse-to-dense weight conversion: any FCMAE/ConvNeXt V2 checkpoint -> plain dense layers.

Input layouts (detected, ``{"model": ...}`` / ``{"state_dict": ...}`` nesting and
``module.`` / ``encoder.`` prefixes accepted):

- ``official``: dense official naming (our FCMAE checkpoints, the released
  ``*_fcmae.pt`` files): ``downsample_layers.*``, ``stages.i.j.{dwconv,norm,pwconv1,grn,pwconv2}``.
- ``minkowski``: the official sparse FCMAE on MinkowskiEngine: ``dwconv.kernel (49, C)``,
  ``dwconv.bias (1, C)``, ``downsample_layers.i.1.kernel (4, C_in, C_out)``, ``norm.ln.*``,
  ``pwconv1.linear.*``, ``grn.gamma (1, 4C)``.
- ``timm``: ``stem.*``, ``stages.N.downsample.*``, ``stages.N.blocks.M.{conv_dw,norm,mlp.*}``.

Everything is first brought to the *canonical* layout, the official dense encoder
without ``norm``/``head`` (GRN ``(1, 1, 1, 4C)``), checked key by key against the
shapes the inferred model needs, then written as ``official`` or ``timm``.
Decoder, ``proj``, ``mask_token`` and ``pred`` are dropped.

MinkowskiEngine enumerates kernel offsets with the FIRST spatial axis fastest, so a
``(K*K, ...)`` kernel maps to dense by a reshape and then a swap of the two spatial axes.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

import torch

# Reading and writing weight files belongs to fcmae.weights_file; re-exported: they are the converter's API too.
from ..storage.weights_file import CheckpointError, load_state_dict_file, save_state_dict  # noqa: F401
from ..models.convnextv2 import make_trunk
from ..models.variants import Variant, find_variant
# The kernel-order maps are part of the converter's API; they live with the sparse ops.
from ..sparse.me_kernels import dense_conv_to_me, dense_depthwise_to_me, me_conv_to_dense, me_depthwise_to_dense  # noqa: F401

FORMATS = ("official", "timm")
# timm builds the MLP of these sizes as 1x1 convs (conv_mlp=True): fc weights are (4C, C, 1, 1).
TIMM_CONV_MLP = frozenset({"atto", "femto", "pico", "nano"})
_DROPPED_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.", "norm.", "head.")
DECODER_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.")  # an FCMAE model's parts beyond its encoder


def decoder_state(obj: Mapping) -> dict[str, torch.Tensor]:
    """The decoder, its input projection, the mask token and the prediction head of full FCMAE weights
    (a pretraining checkpoint, or ``fcmae-export --format fcmae``); empty for an encoder-only source."""
    sd = _strip_prefixes(unwrap_state_dict(obj))
    return {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Find the tensors: accepts ``{"model": sd}``, ``{"state_dict": sd}`` or ``sd``."""
    for key in ("model", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], Mapping):
            return unwrap_state_dict(obj[key])
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"no tensors found (top-level keys: {sorted(obj)[:8]}); expected a state dict or "
            "a checkpoint with a 'model' entry"
        )
    return tensors


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "encoder."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``official``, ``minkowski`` or ``timm`` (after prefixes are stripped)."""
    keys = list(_strip_prefixes(sd))
    if any(k.endswith(".kernel") for k in keys):
        return "minkowski"
    if any(k.startswith("stem.") or ".blocks." in k for k in keys):
        return "timm"
    if any(k.startswith("stages.") for k in keys) and any(k.startswith("downsample_layers.") for k in keys):
        return "official"
    raise CheckpointError(
        "unknown checkpoint layout: expected ConvNeXt V2 keys such as "
        "'encoder.stages.0.0.dwconv.weight' (official), '...dwconv.kernel' (MinkowskiEngine) or "
        f"'stem.0.weight' (timm); first keys found: {keys[:5]}"
    )


# ---------------------------------------------------------------- layouts -> canonical

def _minkowski_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        parts = [p for p in k.split(".") if p not in ("ln", "linear")]
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            if v.dim() == 2:
                v = me_depthwise_to_dense(v)
            elif v.dim() == 3:
                v = me_conv_to_dense(v)
            else:
                raise CheckpointError(f"{k}: kernel of shape {tuple(v.shape)}, expected (K*K, C) or (K*K, C_in, C_out)")
        elif parts[-1] == "bias" and v.dim() == 2:
            v = v.reshape(-1)
        out[".".join(parts)] = v
    return out


_TIMM_RULES = [
    (r"stem\.(\d)\.(.+)", r"downsample_layers.0.\1.\2"),
    (r"stages\.(\d)\.downsample\.(\d)\.(.+)", r"downsample_layers.\1.\2.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(.+)", r"stages.\1.\2.dwconv.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.norm\.(.+)", r"stages.\1.\2.norm.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(.+)", r"stages.\1.\2.pwconv1.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(.+)", r"stages.\1.\2.pwconv2.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.weight", r"stages.\1.\2.grn.gamma"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.bias", r"stages.\1.\2.grn.beta"),
]


def _timm_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TIMM_RULES:
            if re.fullmatch(pattern, k):
                k = re.sub(pattern, repl, k)
                if re.search(r"pwconv[12]\.weight$", k) and v.dim() == 4:
                    v = v.flatten(1)  # conv_mlp 1x1 conv -> Linear
                break
        out[k] = v
    return out


def _normalize_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if re.search(r"\.grn\.(gamma|beta)$", k):
            v = v.reshape(1, 1, 1, -1)
        out[k] = v
    return out


def infer_shape(sd: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(depths, dims)`` of a canonical state dict."""
    depths: dict[int, int] = {}
    for k in sd:
        m = re.match(r"stages\.(\d+)\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    if sorted(depths) != [0, 1, 2, 3]:
        raise CheckpointError(f"expected blocks in stages 0-3, found stages {sorted(depths)}")
    dims = []
    for i in range(4):
        key = f"stages.{i}.0.dwconv.weight"
        if key not in sd:
            raise CheckpointError(f"missing key {key!r} (depthwise conv of stage {i}, expected (C, 1, 7, 7))")
        dims.append(int(sd[key].shape[0]))
    return tuple(depths[i] for i in range(4)), tuple(dims)


def in_chans_of(sd: Mapping[str, torch.Tensor]) -> int:
    """Input bands of a canonical state dict: the stem conv's input channels (3 for RGB)."""
    stem = sd.get(STEM)
    return int(stem.shape[1]) if stem is not None and stem.dim() == 4 else 3


STEM = "downsample_layers.0.0.weight"


def stem_of(sd: Mapping[str, torch.Tensor]) -> int:
    """The stem's stride of a canonical or timm state dict (its kernel side: 4 for ConvNeXt V2; 2 or 1 for
    a model pretrained on 16- or 8-pixel patches, whose mask patch is 8 times it)."""
    stem = sd.get(STEM, sd.get("stem.0.weight"))
    return int(stem.shape[-1]) if stem is not None and stem.dim() == 4 else 4


def adapt_stem(canonical: Mapping[str, torch.Tensor], in_chans: int, source: str = "init") -> tuple[dict, str | None]:
    """RGB weights for a model of ``in_chans`` bands: the stem's filters over the 3 colours become
    filters over ``in_chans`` bands, scaled so a band image shaped like a grey one (every band alike)
    gives the stem the response the RGB filters gave it: one band takes the mean of the three filters
    times 3 (their sum); N bands repeat R, G, B, R, ... and scale by 3/N. Returns ``(state dict, what was
    done or None)``; weights with another band count than 3 are an error (nothing sensible to adapt)."""
    w = canonical[STEM]
    have = w.shape[1]
    if have == in_chans:
        return dict(canonical), None
    if have != 3:
        raise CheckpointError(f"{source}: the stem takes {have} bands, the model {in_chans} (model.in_chans); only "
                              "RGB (3-band) weights are adapted to another band count")
    if in_chans == 1:
        adapted = w.mean(dim=1, keepdim=True) * 3.0
        how = "the mean of the RGB stem filters x3 (their sum) for 1 band"
    else:
        adapted = w.repeat(1, (in_chans + 2) // 3, 1, 1)[:, :in_chans] * (3.0 / in_chans)
        how = f"the RGB stem filters repeated over {in_chans} bands and scaled by 3/{in_chans}"
    return {**canonical, STEM: adapted.contiguous()}, how


def expected_shapes(depths, dims, in_chans: int = 3, stem_stride: int = 4) -> dict[str, torch.Size]:
    """Key -> shape of the canonical encoder (built on the meta device: no memory)."""
    with torch.device("meta"):
        downs, stages = make_trunk(in_chans, depths, dims, 0.0, stem_stride)
    sd = {f"downsample_layers.{k}": v for k, v in downs.state_dict().items()}
    sd.update({f"stages.{k}": v for k, v in stages.state_dict().items()})
    return {k: v.shape for k, v in sd.items()}


def to_canonical(obj: Mapping, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Any supported checkpoint -> ``(canonical encoder state dict, detected layout)``.

    Raises :class:`CheckpointError` naming the first missing, unexpected or
    mis-shaped key with the shape the inferred model needs.
    """
    sd = _strip_prefixes(unwrap_state_dict(obj))
    layout = detect_layout(sd)
    if layout == "minkowski":
        sd = _minkowski_to_canonical(sd)
    elif layout == "timm":
        sd = _timm_to_canonical(sd)
    sd = _normalize_official(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}
    depths, dims = infer_shape(sd)
    want = expected_shapes(depths, dims, in_chans_of(sd), stem_of(sd))
    for k, shape in want.items():
        if k not in sd:
            raise CheckpointError(f"{source}: missing key {k!r} (expected shape {tuple(shape)})")
        if sd[k].shape != shape:
            raise CheckpointError(
                f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(shape)} "
                f"for a ConvNeXt V2 with depths {list(depths)} and dims {list(dims)}"
            )
    extra = sorted(set(sd) - set(want))
    if extra:
        raise CheckpointError(f"{source}: unexpected encoder keys {extra[:5]} for {layout} layout")
    canonical = OrderedDict((k, sd[k].detach().float().contiguous()) for k in want)
    return canonical, layout


# ---------------------------------------------------------------- canonical -> formats

def canonical_to_timm(sd: Mapping[str, torch.Tensor], conv_mlp: bool) -> dict[str, torch.Tensor]:
    """Canonical -> ``timm.create_model("convnextv2_<size>", num_classes=0)`` keys.

    timm's ``head.norm`` (applied after pooling) has no counterpart in the FCMAE
    encoder; it is written with its fresh init (ones/zeros) so ``strict=True`` loads.
    """
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "downsample_layers":
            k = f"stem.{parts[2]}.{parts[3]}" if parts[1] == "0" else f"stages.{parts[1]}.downsample.{'.'.join(parts[2:])}"
        else:
            i, j, name, leaf = parts[1], parts[2], parts[3], parts[4]
            base = f"stages.{i}.blocks.{j}"
            if name == "dwconv":
                k = f"{base}.conv_dw.{leaf}"
            elif name == "norm":
                k = f"{base}.norm.{leaf}"
            elif name in ("pwconv1", "pwconv2"):
                k = f"{base}.mlp.{'fc1' if name == 'pwconv1' else 'fc2'}.{leaf}"
                if conv_mlp and leaf == "weight":
                    v = v[:, :, None, None]
            elif name == "grn":
                k = f"{base}.mlp.grn.{'weight' if leaf == 'gamma' else 'bias'}"
                v = v.reshape(-1)
        out[k] = v.contiguous()
    last = sd["stages.3.0.dwconv.weight"].shape[0]
    out["head.norm.weight"] = torch.ones(last)
    out["head.norm.bias"] = torch.zeros(last)
    return out


def variant_of(sd: Mapping[str, torch.Tensor]) -> Variant | None:
    return find_variant(*infer_shape(sd))


def canonical_to_format(canonical: Mapping[str, torch.Tensor], format: str) -> dict[str, torch.Tensor]:
    """Canonical encoder state dict -> ``official`` or ``timm`` keys."""
    if format not in FORMATS:
        raise CheckpointError(f"format={format!r}; choose one of {', '.join(FORMATS)}")
    if format == "official":
        return dict(canonical)
    variant = variant_of(canonical)
    if variant is None:
        raise CheckpointError(
            f"depths/dims {infer_shape(canonical)} match no convnextv2_<size>; timm has no such model, "
            "export with format='official'"
        )
    return canonical_to_timm(canonical, conv_mlp=variant.name in TIMM_CONV_MLP)


def to_dense(state_dict: Mapping, format: str = "official") -> dict[str, torch.Tensor]:
    """Any supported checkpoint or state dict -> dense encoder state dict.

    ``official``: keys of the official dense ``convnextv2.py`` (no ``norm``/``head``).
    ``timm``: loads into ``timm.create_model("convnextv2_<size>", num_classes=0)`` strictly.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    canonical, _ = to_canonical(state_dict)
    return canonical_to_format(canonical, format)
