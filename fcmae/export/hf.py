"""``fcmae-export --format hf``: a Hugging Face ``transformers`` folder (``ConvNextV2Model``).

The folder holds ``config.json`` (depths, hidden sizes, drop path), ``model.safetensors`` and
``preprocessor_config.json`` (``ConvNextImageProcessor``: size, crop, mean, std), so that

    ConvNextV2Model.from_pretrained(DIR)
    ConvNextV2ForImageClassification.from_pretrained(DIR, num_labels=N)   # a new head

load it. Writing needs no ``transformers``; the check after writing does (``pip install
'fcmae[hf]'``): the transformers model's last hidden state must equal our sparse encoder's with
nothing masked, on the source checkpoint read without the converter where a reader exists.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ..storage.files import disk_refusals
from ..storage.weights_file import CheckpointError, save_state_dict
from .convert import in_chans_of, stem_of

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_BLOCK_KEYS = {"dwconv": "dwconv", "norm": "layernorm", "pwconv1": "pwconv1", "pwconv2": "pwconv2",
               "grn.gamma": "grn.weight", "grn.beta": "grn.bias"}


def canonical_to_hf(canonical: Mapping[str, torch.Tensor], dims) -> dict[str, torch.Tensor]:
    """Official encoder keys -> ``ConvNextV2Model`` keys. The final LayerNorm (applied to the pooled
    output only; FCMAE has none) starts as the identity, as timm's head norm does after an export."""
    out = {}
    for key, value in canonical.items():
        parts = key.split(".")
        if parts[0] == "downsample_layers":
            i, j, leaf = int(parts[1]), int(parts[2]), parts[3]
            if i == 0:
                out[f"embeddings.{'patch_embeddings' if j == 0 else 'layernorm'}.{leaf}"] = value
            else:
                out[f"encoder.stages.{i}.downsampling_layer.{j}.{leaf}"] = value
        elif parts[0] == "stages":
            i, j, rest = parts[1], parts[2], ".".join(parts[3:])
            module, _, leaf = rest.rpartition(".")
            name = _BLOCK_KEYS.get(rest) or f"{_BLOCK_KEYS[module]}.{leaf}"
            if rest.startswith("grn."):
                value = value.reshape(1, 1, 1, -1)
            out[f"encoder.stages.{i}.layers.{j}.{name}"] = value
        else:
            raise CheckpointError(f"{key}: not an encoder key of the official layout")
    out["layernorm.weight"] = torch.ones(dims[-1])
    out["layernorm.bias"] = torch.zeros(dims[-1])
    return out


def hf_config(depths, dims, image_size: int, num_channels: int = 3, stem_stride: int = 4) -> dict:
    """transformers' ``ConvNextV2Config``; its ``patch_size`` is the stem's stride (4; 2 or 1 for a model
    pretrained on 16- or 8-pixel mask patches)."""
    return {
        "model_type": "convnextv2", "architectures": ["ConvNextV2Model"], "num_channels": num_channels,
        "patch_size": stem_stride,
        "num_stages": 4, "depths": list(depths), "hidden_sizes": list(dims), "hidden_act": "gelu",
        "initializer_range": 0.02, "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": image_size,
    }


def preprocessor_config(image_size: int, mean, std, rescale: float | None = 1 / 255) -> dict:
    """The evaluation transform of our fine-tuning (resize to size / 0.875, centre crop, normalise), with
    the run's own pixel scaling (``rescale``: 1/255 for 8-bit, 1/65535 for 16-bit files, None for floats),
    so that raw pixels reach the model as they reached it in pretraining."""
    return {
        "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "crop_pct": 0.875, "resample": 3, "do_rescale": rescale is not None, "rescale_factor": rescale or 1.0,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
    }


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("checking an --format hf export needs transformers: pip install 'fcmae[hf]' "
                              "(or skip the check with --no-verify)") from None
    return transformers


def write_hf(canonical: Mapping[str, torch.Tensor], depths, dims, out: Path, image_size: int = 224,
             mean=IMAGENET_MEAN, std=IMAGENET_STD, metadata: dict | None = None, check=None,
             rescale: float | None = 1 / 255) -> Path:
    """Write the folder next to ``out``, run ``check(folder)`` on it, and move it into place: an
    interrupted or failed export leaves no folder that looks whole. An existing ``out`` is replaced
    only if it is an earlier export."""
    out = Path(out)
    if out.suffix in (".safetensors", ".pth", ".pt"):
        raise CheckpointError(f"--format hf writes a folder; --out {out} names a file")
    if out.exists() and not _is_hf_export(out):
        raise CheckpointError(f"{out} exists and is not an earlier --format hf export; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_refusals(out, "export", "write it elsewhere (--out PATH)"):
        try:
            tmp.mkdir(parents=True)
            save_state_dict(canonical_to_hf(canonical, dims), tmp / "model.safetensors", metadata=metadata)
            config = hf_config(depths, dims, image_size, in_chans_of(canonical), stem_of(canonical))
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image_size, mean, std, rescale),
                                                                     indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if check is not None:
        try:
            check(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _is_hf_export(path: Path) -> bool:
    try:
        return path.is_dir() and json.loads((path / "config.json").read_text()).get("model_type") == "convnextv2"
    except (OSError, ValueError):
        return False


@torch.no_grad()
def hf_features(folder: Path, imgs: torch.Tensor) -> torch.Tensor:
    """``ConvNextV2Model.from_pretrained(folder)``'s last hidden state on ``imgs``; every weight
    must come from the folder (a missing or unexpected key is an error, not a fresh init)."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # one small folder: the bar is noise in our log
    model, info = transformers.ConvNextV2Model.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise CheckpointError(f"{folder}: transformers did not load every weight ({bad})")
    return model.eval()(pixel_values=imgs).last_hidden_state
