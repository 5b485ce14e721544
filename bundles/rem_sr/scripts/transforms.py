"""Dictionary transforms used by the rem_sr configs around the network.

REM (K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-A) processes the *trilinear-upsampled* LR image, so inference first upsamples the LR NIfTI onto the
target grid (:class:`UpsampleToTargetd`), scales the intensities the way the training volumes were scaled
(``scripts.intensity.PercentileScaled``, re-exported here) and undoes that scaling on the output
(``scripts.intensity.RestoreIntensityd``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize

from .checks import BundleInputError
from .intensity import ClipToInputRanged, PercentileScaled, RestoreIntensityd  # noqa: F401  (re-exported for the configs)


def _spacing(img: MetaTensor) -> np.ndarray:
    """Voxel size (mm) along each axis: the column norms of the affine's 3x3 part."""
    affine = np.asarray(img.affine, dtype=float)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


class UpsampleToTargetd(MapTransform):
    """
    Trilinear upsampling of a low-resolution volume onto the target grid, with the affine updated (MONAI ``Resize``).

    Give either `scale` (a number or one per axis) or `target_spacing` (mm, one number or one per
    axis); `target_spacing` wins when both are set. Uses ``align_corners=False``, the grid REM was
    trained on, so the field of view is kept and the voxel size becomes field of view / new size.
    The new size of an axis is ``size * spacing / target_spacing`` (or ``size * scale``) rounded to the nearest
    integer, so that a spacing stored inexactly (float32 headers, oblique affines: 2.0999999 mm for 2.1 mm) gives
    the intended grid; an axis whose spacing is within `spacing_rtol` of the target is left unchanged (not
    resampled), and a volume with every axis unchanged is returned as it is.
    Source: REM's input is the trilinear-upsampled LR image (Sun & Simon, "A Resolution Enhancement Plug-in for
    Deformable Registration of Medical Images", Section III-A); the resampling is MONAI's ``Resize``.

    Args:
        keys: the key(s) of the LR volumes, MetaTensors [C, d, h, w] with an affine.
        scale: the upsampling factor (>= 1), one number or one per spatial axis.
        target_spacing: the target voxel size in mm, one number or one per spatial axis (> 0).
        spacing_rtol: relative tolerance under which an axis counts as already at `target_spacing`.
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        BundleInputError: (a ``ValueError``) when neither ``scale`` nor ``target_spacing`` is given.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float | Sequence[float] | None = 4,
        target_spacing: float | Sequence[float] | None = None,
        spacing_rtol: float = 1e-3,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if scale is None and target_spacing is None:
            raise BundleInputError("set either `scale` or `target_spacing` for the upsampling")
        self.scale = scale
        self.target_spacing = target_spacing
        self.spacing_rtol = float(spacing_rtol)

    def zoom_for(self, img: MetaTensor) -> list[float]:
        """
        The zoom factor per spatial axis for one image.

        Args:
            img: the LR volume [C, d, h, w]; its affine gives the current voxel size (mm) when ``target_spacing``
                is set.

        Returns:
            three zoom factors: ``spacing / target_spacing`` per axis (exactly 1 for an axis within
            ``spacing_rtol`` of the target), or ``scale`` broadcast to 3 axes.

        Raises:
            BundleInputError: (a ``ValueError``) when ``target_spacing`` is not positive or ``scale`` is below 1.
        """
        if self.target_spacing is not None:
            target = np.broadcast_to(np.asarray(self.target_spacing, dtype=float), (3,))
            if np.any(target <= 0):
                raise BundleInputError(f"target_spacing must be positive, got {self.target_spacing}")
            spacing = _spacing(img)
            at_target = np.isclose(spacing, target, rtol=self.spacing_rtol, atol=0.0)
            return [1.0 if same else float(s / t) for s, t, same in zip(spacing, target, at_target)]
        zoom = np.broadcast_to(np.asarray(self.scale, dtype=float), (3,))
        if np.any(zoom < 1):
            raise BundleInputError(f"scale must be >= 1 for super-resolution, got {self.scale}")
        return [float(z) for z in zoom]

    def size_for(self, img: MetaTensor) -> list[int]:
        """
        The upsampled grid size of one image: ``size * zoom`` per axis (:meth:`zoom_for`), rounded to the nearest
        integer (at least 1); an axis with zoom 1 keeps its size.

        Args:
            img: the LR volume [C, d, h, w].

        Returns:
            three sizes in voxels, e.g. ``[40, 40, 60]`` for 40x40x20 at 0.7/0.7/2.1 mm and ``target_spacing`` 0.7.

        Raises:
            BundleInputError: as :meth:`zoom_for`.
        """
        sizes = [int(s) for s in img.shape[1:4]]
        return [s if z == 1 else max(1, int(np.floor(s * z + 0.5))) for s, z in zip(sizes, self.zoom_for(img))]

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the LR MetaTensor(s) [C, d, h, w] under ``keys``.

        Returns:
            a shallow copy of ``data`` with each volume replaced by its upsampled version [C, D, H, W]
            (:meth:`size_for`), whose affine has the new voxel size (same field of view); a volume whose size does
            not change is returned unchanged.

        Raises:
            BundleInputError: (a ``ValueError``) for an invalid ``scale`` or ``target_spacing`` (see
                :meth:`zoom_for`).
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            size = self.size_for(d[key])
            if size != [int(s) for s in d[key].shape[1:4]]:
                d[key] = Resize(spatial_size=size, mode="trilinear", align_corners=False)(d[key])
        return d
