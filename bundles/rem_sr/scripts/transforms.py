"""Dictionary transforms used by the rem_sr configs around the network.

REM (K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-A) processes the *trilinear-upsampled* LR image, so inference first upsamples the LR NIfTI onto the
target grid (:class:`UpsampleToTargetd`), scales the intensities the way the training volumes were scaled
(:class:`PercentileScaled`) and undoes that scaling on the output (:class:`RestoreIntensityd`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Zoom

from .checks import BundleInputError


def _spacing(img: MetaTensor) -> np.ndarray:
    """Voxel size (mm) along each axis: the column norms of the affine's 3x3 part."""
    affine = np.asarray(img.affine, dtype=float)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


class UpsampleToTargetd(MapTransform):
    """
    Trilinear upsampling of a low-resolution volume onto the target grid, with the affine updated (MONAI ``Zoom``).

    Give either `scale` (a number or one per axis) or `target_spacing` (mm, one number or one per
    axis); `target_spacing` wins when both are set. Uses ``align_corners=False``, the grid REM was
    trained on, so the field of view is kept and the voxel size becomes spacing / scale.
    Source: REM's input is the trilinear-upsampled LR image (Sun & Simon, "A Resolution Enhancement Plug-in for
    Deformable Registration of Medical Images", Section III-A); the resampling is MONAI's ``Zoom``.

    Args:
        keys: the key(s) of the LR volumes, MetaTensors [C, d, h, w] with an affine.
        scale: the upsampling factor (>= 1), one number or one per spatial axis.
        target_spacing: the target voxel size in mm, one number or one per spatial axis (> 0).
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        BundleInputError: (a ``ValueError``) when neither ``scale`` nor ``target_spacing`` is given.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float | Sequence[float] | None = 4,
        target_spacing: float | Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if scale is None and target_spacing is None:
            raise BundleInputError("set either `scale` or `target_spacing` for the upsampling")
        self.scale = scale
        self.target_spacing = target_spacing

    def zoom_for(self, img: MetaTensor) -> list[float]:
        """
        The zoom factor per spatial axis for one image.

        Args:
            img: the LR volume [C, d, h, w]; its affine gives the current voxel size (mm) when ``target_spacing``
                is set.

        Returns:
            three zoom factors: ``spacing / target_spacing`` per axis, or ``scale`` broadcast to 3 axes.

        Raises:
            BundleInputError: (a ``ValueError``) when ``target_spacing`` is not positive or ``scale`` is below 1.
        """
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
        """
        Args:
            data: a dictionary holding the LR MetaTensor(s) [C, d, h, w] under ``keys``.

        Returns:
            a shallow copy of ``data`` with each volume replaced by its upsampled version [C, D, H, W], whose
            affine has the new voxel size (same field of view).

        Raises:
            BundleInputError: (a ``ValueError``) for an invalid ``scale`` or ``target_spacing`` (see
                :meth:`zoom_for`).
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            zoom = self.zoom_for(d[key])
            d[key] = Zoom(zoom=zoom, mode="trilinear", align_corners=False, keep_size=False)(d[key])
        return d


class PercentileScaled(MapTransform):
    """
    Divide each volume by the `percentile` of its non-zero voxels and remember the factor for the way back.

    REM was trained on volumes scaled so that the brain's 99.5th percentile is 1 (a choice of this bundle; the
    paper does not state its intensity normalisation). At most about one million non-zero voxels (a regular
    subsample) are used to compute the percentile; an empty or non-positive percentile gives the factor 1.

    Args:
        keys: the key(s) of the volumes, any shape, in the scanner's intensity units.
        percentile: the percentile (0-100) mapped to 1.
        factor_key: where the scale factor (a float, in the input's intensity units) is stored.
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        percentile: float = 99.5,
        factor_key: str = "intensity_factor",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.percentile = percentile
        self.factor_key = factor_key

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the volume(s) under ``keys``.

        Returns:
            a shallow copy of ``data`` with each volume divided by its factor (dimensionless, percentile = 1) and
            ``factor_key`` set to that factor (for several keys, the last one's).

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).float()
            nonzero = values[values != 0]
            factor = (
                float(torch.quantile(nonzero[:: max(1, nonzero.numel() // 1_000_000)], self.percentile / 100))
                if nonzero.numel()
                else 1.0
            )
            factor = factor if factor > 0 else 1.0
            d[key] = d[key] / factor
            d[self.factor_key] = factor
        return d


class RestoreIntensityd(MapTransform):
    """
    Multiply by the factor that :class:`PercentileScaled` removed, so outputs are in the input's intensity units.

    Args:
        keys: the key(s) of the volumes to rescale.
        factor_key: where :class:`PercentileScaled` stored the factor (1 when absent).
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(self, keys: KeysCollection, factor_key: str = "intensity_factor", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.factor_key = factor_key

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the volume(s) under ``keys`` and, optionally, the factor under
                ``factor_key`` (a number, or a batched tensor of which the first entry is used).

        Returns:
            a shallow copy of ``data`` with each volume multiplied by the factor.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        factor = float(torch.as_tensor(d.get(self.factor_key, 1.0)).reshape(-1)[0])
        for key in self.key_iterator(d):
            d[key] = d[key] * factor
        return d


class ShareCaseNamed(MapTransform):
    """
    Give the MetaTensors under `keys` the source file name of `source`, so that ``SaveImaged`` puts all of a
    case's outputs in one folder named after the input (each file keeps its own affine).

    Args:
        keys: the key(s) of the outputs to rename; non-MetaTensor values are left alone.
        source: the key of the MetaTensor whose ``filename_or_obj`` metadata is copied.
        allow_missing_keys: don't raise an exception when a key is missing (default true).
    """

    def __init__(self, keys: KeysCollection, source: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.source = source

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding a MetaTensor under ``source`` and the outputs under ``keys``.

        Returns:
            ``data`` (shallow copy) whose MetaTensors under ``keys`` have ``meta["filename_or_obj"]`` set, in place,
            to the one of ``source``.

        Raises:
            KeyError: when ``source`` is missing, or a key is missing and ``allow_missing_keys`` is false.
            AttributeError: when ``data[source]`` has no ``meta`` (not a MetaTensor).
        """
        d = dict(data)
        name = d[self.source].meta.get("filename_or_obj")
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["filename_or_obj"] = name
        return d
