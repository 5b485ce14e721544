"""Dictionary transforms used by the rem_sr configs around the network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Zoom

from .checks import BundleInputError


def _spacing(img: MetaTensor) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=float)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


class UpsampleToTargetd(MapTransform):
    """Trilinear upsampling of a LR volume to the target grid, with the affine updated (MONAI `Zoom`).

    Give either `scale` (a number or one per axis) or `target_spacing` (mm, one number or one per
    axis); `target_spacing` wins when both are set. Uses ``align_corners=False``, the grid REM was
    trained on, so the field of view is kept and the voxel size becomes spacing / scale.
    """

    def __init__(self, keys: KeysCollection, scale: float | Sequence[float] | None = 4,
                 target_spacing: float | Sequence[float] | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if scale is None and target_spacing is None:
            raise BundleInputError("set either `scale` or `target_spacing` for the upsampling")
        self.scale = scale
        self.target_spacing = target_spacing

    def zoom_for(self, img: MetaTensor) -> list[float]:
        if self.target_spacing is not None:
            target = np.broadcast_to(np.asarray(self.target_spacing, dtype=float), (3,))
            if np.any(target <= 0):
                raise BundleInputError(f"target_spacing must be positive, got {self.target_spacing}")
            return list(_spacing(img) / target)
        zoom = np.broadcast_to(np.asarray(self.scale, dtype=float), (3,))
        if np.any(zoom < 1):
            raise BundleInputError(f"scale must be >= 1 for super-resolution, got {self.scale}")
        return list(zoom)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            zoom = self.zoom_for(d[key])
            d[key] = Zoom(zoom=zoom, mode="trilinear", align_corners=False, keep_size=False)(d[key])
        return d


class PercentileScaled(MapTransform):
    """Divide by the `percentile` of the non-zero voxels (REM was trained on volumes scaled so that
    the brain's 99.5th percentile is 1) and remember the factor under `factor_key` for the way back."""

    def __init__(self, keys: KeysCollection, percentile: float = 99.5, factor_key: str = "intensity_factor",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.percentile = percentile
        self.factor_key = factor_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).float()
            nonzero = values[values != 0]
            factor = float(torch.quantile(nonzero[:: max(1, nonzero.numel() // 1_000_000)],
                                          self.percentile / 100)) if nonzero.numel() else 1.0
            factor = factor if factor > 0 else 1.0
            d[key] = d[key] / factor
            d[self.factor_key] = factor
        return d


class RestoreIntensityd(MapTransform):
    """Multiply by the factor that `PercentileScaled` removed, so outputs are in the input's units."""

    def __init__(self, keys: KeysCollection, factor_key: str = "intensity_factor", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.factor_key = factor_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        factor = float(torch.as_tensor(d.get(self.factor_key, 1.0)).reshape(-1)[0])
        for key in self.key_iterator(d):
            d[key] = d[key] * factor
        return d


class ShareCaseNamed(MapTransform):
    """Give `keys` the source file name of `source`, so `SaveImaged` puts all of a case's outputs
    in one folder named after the input (each file keeps its own affine)."""

    def __init__(self, keys: KeysCollection, source: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.source = source

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        name = d[self.source].meta.get("filename_or_obj")
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["filename_or_obj"] = name
        return d
