"""Dictionary transforms of the refdrn inference pipeline.

The cascade takes trilinear-upsampled LR images (K. Sun and S. Simon, "A Resolution Enhancement Plug-in for
Deformable Registration of Medical Images", Sections III-A and IV-D) and returns a DDF in voxels that MONAI's
``Warp`` applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Resize

from .checks import BundleInputError
from .pairs import WarpMovingd  # noqa: F401  (re-exported for the configs: one implementation, scripts/pairs.py)


class UpsampleToTargetd(MapTransform):
    """
    Trilinear upsampling of LR volumes by `scale` (``align_corners=False``, the grid REM was trained on),
    with the affine updated by MONAI's ``Resize`` (same field of view, voxel size field of view / new size). The
    new size of an axis is ``size * scale`` rounded to the nearest integer; an axis with factor 1 is left unchanged,
    and scale 1 leaves the volumes unchanged.

    Args:
        keys: the key(s) of the LR MetaTensors [C, d, h, w].
        scale: the upsampling factor (>= 1), one number or one per spatial axis.
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        BundleInputError: (a ``ValueError``) when a factor is below 1.
    """

    def __init__(self, keys: KeysCollection, scale: float | Sequence[float] = 4, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        zoom = np.broadcast_to(np.asarray(scale, dtype=float), (3,))
        if np.any(zoom < 1):
            raise BundleInputError(f"scale must be >= 1, got {scale}")
        self.zoom = list(zoom)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the LR MetaTensor(s) [C, d, h, w] under ``keys``.

        Returns:
            a shallow copy of ``data`` with each volume upsampled to [C, D, H, W] (sizes rounded to the nearest
            integer) and its affine updated.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            sizes = [int(s) for s in d[key].shape[1:4]]
            target = [s if z == 1 else max(1, int(np.floor(s * z + 0.5))) for s, z in zip(sizes, self.zoom)]
            if target != sizes:
                d[key] = Resize(spatial_size=target, mode="trilinear", align_corners=False)(d[key])
        return d
