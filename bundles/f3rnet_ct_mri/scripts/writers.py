"""Output writing: NIfTI files are written under a temporary name and renamed into place, so an
interrupted run never leaves a half-written file behind."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from monai.data import NibabelWriter


class AtomicNibabelWriter(NibabelWriter):
    def write(self, filename, verbose: bool = False, **obj_kwargs):
        final = Path(filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        # keep the real suffix (.nii.gz) so nibabel picks the same format for the temporary file
        tmp = final.with_name(f".partial-{uuid.uuid4().hex[:8]}-{final.name}")
        try:
            super().write(str(tmp), verbose=False, **obj_kwargs)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        if verbose:
            print(f"wrote {final}")
