"""The ConvNeXt V2 size table (depths and widths from the paper, arXiv 2301.00808)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("atto", (2, 2, 6, 2), (40, 80, 160, 320)),
        Variant("femto", (2, 2, 6, 2), (48, 96, 192, 384)),
        Variant("pico", (2, 2, 6, 2), (64, 128, 256, 512)),
        Variant("nano", (2, 2, 8, 2), (80, 160, 320, 640)),
        Variant("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        Variant("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        Variant("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
        Variant("huge", (3, 3, 27, 3), (352, 704, 1408, 2816)),
    )
}


def get_variant(name: str) -> Variant:
    """Look up a size by ``"atto"`` or ``"convnextv2_atto"``."""
    key = name.removeprefix("convnextv2_")
    if key not in VARIANTS:
        known = ", ".join(f"convnextv2_{k}" for k in VARIANTS)
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return VARIANTS[key]


def find_variant(depths, dims) -> Variant | None:
    """The named size with these depths and dims, or None for a custom shape."""
    for v in VARIANTS.values():
        if tuple(v.depths) == tuple(depths) and tuple(v.dims) == tuple(dims):
            return v
    return None
