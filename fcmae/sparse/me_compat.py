"""Importing MinkowskiEngine (optional) without importing it at package import time.

MinkowskiEngine 0.5.4 does ``from collections import Sequence``, which Python 3.10
removed; the alias is restored before importing it (``collections.abc.Sequence``
is the same class the old name pointed to).
"""
from __future__ import annotations

import collections
import collections.abc

INSTALL_HINT = "bash launch/install_minkowski.sh (CPU build; see docs/sparse_backends.md for CUDA)"


def import_minkowski():
    """MinkowskiEngine, or an ImportError that says how to install it."""
    if not hasattr(collections, "Sequence"):
        collections.Sequence = collections.abc.Sequence
    try:
        import MinkowskiEngine as ME
    except Exception as exc:  # ImportError, or a broken build raising OSError
        raise ImportError(f"encoder.backend=minkowski needs MinkowskiEngine, which does not import here "
                          f"({type(exc).__name__}: {exc}); install it with: {INSTALL_HINT}; "
                          "or use encoder.backend=sparse") from exc
    return ME


def minkowski_error() -> str | None:
    """None when MinkowskiEngine imports, else why not."""
    try:
        import_minkowski()
    except ImportError as exc:
        return str(exc.__cause__ or exc)
    return None
