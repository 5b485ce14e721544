"""Atomic output writing shared by the tools: write under a temporary name, then rename, so an
interrupted run never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib


def atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=path.parent, prefix=".tmp_")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def crop_or_pad(data, affine, start, shape, fill: float = 0.0):
    """The `shape` box of `data` starting at voxel `start` (may be negative or run past the end: padded with `fill`),
    with the affine translated so world coordinates are kept."""
    import numpy as np

    start = np.asarray(start, dtype=int)
    out = np.full(tuple(shape), fill, dtype=data.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(shape), data.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, new_affine
