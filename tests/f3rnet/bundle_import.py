"""Import helper for the f3rnet_ct_mri bundle's ``scripts`` package (other bundles ship a ``scripts`` package too)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2] / "bundles" / "f3rnet_ct_mri"


def load_f3rnet(module: str):
    """Return ``scripts.<module>`` of the f3rnet_ct_mri bundle, after purging any previously imported ``scripts*``."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    root = str(BUNDLE_ROOT)
    sys.path[:] = [p for p in sys.path if p != root]
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    return importlib.import_module(f"scripts.{module}")
