"""Sparse execution of the ConvNeXt V2 encoder.

- ``layout``: where the active sites are, computed once per batch and shared by every block.
- ``compact``: the ``sparse`` backend, features of active sites as a compact ``(rows, C)`` tensor.
- ``masked_dense``: the ``dense`` backend, a masked-dense reference on full canvases.
"""
from .layout import SparseLayout

BACKENDS = ("sparse", "dense", "minkowski")
GRN_STATS = ("sample", "batch")

__all__ = ["SparseLayout", "BACKENDS", "GRN_STATS"]
