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
