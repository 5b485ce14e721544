"""Atomic output writing shared by the tools: write under a temporary name, then rename, so an
interrupted run never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp)`` with a path of the same file name in a private temporary folder next to `target`, then
    rename it over `target`; nothing is left behind on failure. Keeping the name matters to writers that derive
    content or format from it (nibabel's extension, the archive root of torch.jit.save / zip files)."""
    target = Path(target)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        tmp = tmp_dir / target.name
        write(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    def write(tmp: Path) -> None:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
