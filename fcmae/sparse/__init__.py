"""Sparse execution of the ConvNeXt V2 encoder.

- ``layout``: where the active sites are, computed once per batch and shared by every block.
- ``compact``: the ``sparse`` backend, features of active sites as a compact ``(rows, C)`` tensor.
- ``masked_dense``: the ``dense`` backend, a masked-dense reference on full canvases.
- ``tiles`` + ``triton_dwconv``: the ``sparse`` backend's depthwise conv without a canvas (Triton).
"""
from .layout import SparseLayout

BACKENDS = ("sparse", "dense", "minkowski")
GRN_STATS = ("sample", "batch")
# the `sparse` backend's depthwise conv: auto (tiles on CUDA with Triton, else canvas) | canvas | tiles
DWCONV = ("auto", "canvas", "tiles")

__all__ = ["SparseLayout", "BACKENDS", "GRN_STATS", "DWCONV"]
