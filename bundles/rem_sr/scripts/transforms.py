"""Dictionary transforms used by the rem_sr configs around the network.

REM (K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-A) processes the *trilinear-upsampled* LR image, so inference first upsamples the LR NIfTI onto the
target grid (:class:`UpsampleToTargetd`), scales the intensities the way the training volumes were scaled
(``scripts.intensity.PercentileScaled``, re-exported here) and undoes that scaling on the output
(``scripts.intensity.RestoreIntensityd``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize

from .checks import BundleInputError
from .common import case_name
from .intensity import ClipToInputRanged, PercentileScaled, RestoreIntensityd  # noqa: F401  (re-exported for the configs)

AUTO = "auto"


def _spacing(img: MetaTensor) -> np.ndarray:
    """Voxel size (mm) along each array axis: the column norms of the affine's 3x3 part."""
    affine = np.asarray(img.affine, dtype=float)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _per_axis(value, what: str, ok) -> list[float]:
    """`value` (one number, a numeric string, or three numbers) as three floats, each passing `ok`.

    Raises:
        BundleInputError: ``<what>, got <value>`` when `value` is not one or three finite numbers or one fails `ok`.
    """
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BundleInputError(f"{what}, got {value!r}") from None
    if len(numbers) not in (1, 3) or not all(np.isfinite(n) and ok(n) for n in numbers):
        raise BundleInputError(f"{what}, got {value!r}")
    return numbers * 3 if len(numbers) == 1 else numbers


def _axes(selected: np.ndarray) -> str:
    """``"axis 2"`` or ``"axes 0, 1"``: the array axes where `selected` is true."""
    axes = [str(a) for a in np.flatnonzero(selected)]
    return ("axis " if len(axes) == 1 else "axes ") + ", ".join(axes)


def _fmt(values: Sequence[float]) -> str:
    """``1x1x4``: numbers joined by ``x`` with up to 4 significant digits (a float32 0.69999999 reads 0.7)."""
    return "x".join(f"{float(v):.4g}" for v in values)


class UpsampleToTargetd(MapTransform):
    """
    Trilinear upsampling of a low-resolution volume onto the target grid, with the affine updated (MONAI ``Resize``),
    and one printed line per case saying what it does.

    Every factor refers to the ARRAY axes of the volume as it is given (inference.json applies this transform to
    the file as stored, before ``Orientationd`` turns it to RAS): ``scale: [1, 1, 4]`` refines the file's third
    axis, whatever anatomical direction that is. The grid is chosen by, in this order:

    - `target_spacing` (mm, one number or one per array axis): each axis coarser than the target gets
      ``size * spacing / target_spacing`` voxels; an axis already at or finer than the target keeps its voxels
      (never downsampled: super-resolution only adds voxels; the printed line names such axes);
    - `scale` ``"auto"`` (the default of inference.json): a (near-)isotropic input, whose coarsest spacing is below
      `isotropy_ratio` times its finest, is upsampled by `auto_scale` (4, the factor REM is trained for) along every
      axis; an anisotropic input (e.g. 1x1x4 mm) only along the axes coarser than its finest spacing, to that
      spacing (1x1x4 mm -> 1x1x1 mm), the finest axes keeping their voxels;
    - `scale` as a number or one number per array axis (each >= 1), applied as given.

    Uses ``align_corners=False``, the grid REM was trained on, so the field of view is kept and the voxel size
    becomes field of view / new size. The new size of an axis is ``size * factor`` rounded to the nearest integer,
    so that a spacing stored inexactly (float32 headers, oblique affines: 2.0999999 mm for 2.1 mm) gives the
    intended grid; an axis whose spacing is within `spacing_rtol` of its target is left unchanged (not resampled),
    and a volume with every axis unchanged is returned as it is.

    For each case it prints (stdout) ``<case>: <shape> voxels at <spacing> mm -> <shape> voxels at <spacing> mm
    (<ratio>x the voxels; <how>)``, and a ``warning:`` line (stderr) when the output has more than `warn_ratio`
    (64 = 4 x 4 x 4, the trained isotropic x4) times the input's voxels, or needs more than `warn_bytes` (1 GiB) as
    a float32 array: the run goes on, the line says why the grid is that large and what to pass instead.

    Source: REM's input is the trilinear-upsampled LR image (Sun & Simon, "A Resolution Enhancement Plug-in for
    Deformable Registration of Medical Images", Section III-A); the resampling is MONAI's ``Resize``.

    Args:
        keys: the key(s) of the LR volumes, MetaTensors [C, d, h, w] with an affine.
        scale: ``"auto"``, or the upsampling factor (>= 1), one number or one per array axis.
        target_spacing: the target voxel size in mm, one number or one per array axis (> 0); wins over `scale`.
        spacing_rtol: relative tolerance under which an axis counts as already at its target spacing.
        isotropy_ratio: ``"auto"`` treats an input as isotropic while coarsest / finest spacing is below this.
        auto_scale: ``"auto"``'s factor for an isotropic input.
        warn_ratio: warn above this many output voxels per input voxel.
        warn_bytes: warn when the float32 output array is larger than this (bytes).
        report: print the line per case (and the warning).
        allow_missing_keys: don't raise an exception when a key is missing.
        zoom_key: when set, the zoom factors of the (last) upsampled key are written to ``data[zoom_key]`` (float32
            tensor [3], 1 for an axis left alone), for ``scripts.input_weights`` to pick REM's weights for the kind of
            input.

    Raises:
        BundleInputError: (a ``ValueError``) when neither ``scale`` nor ``target_spacing`` is given, ``scale`` is not
            ``"auto"``, a number >= 1 or three such numbers, or ``target_spacing`` is not one or three numbers > 0.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: str | float | Sequence[float] | None = AUTO,
        target_spacing: float | Sequence[float] | None = None,
        spacing_rtol: float = 1e-3,
        isotropy_ratio: float = 1.5,
        auto_scale: float = 4.0,
        warn_ratio: float = 64.0,
        warn_bytes: float = 2**30,
        report: bool = True,
        allow_missing_keys: bool = False,
        zoom_key: str | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.zoom_key = zoom_key
        if scale is None and target_spacing is None:
            raise BundleInputError("set either `scale` or `target_spacing` for the upsampling")
        self.target_spacing = None
        if target_spacing is not None:
            what = "target_spacing must be a voxel size in mm > 0, one number or one per array axis ([1, 1, 1])"
            self.target_spacing = _per_axis(target_spacing, what, lambda v: v > 0)
        self.auto = isinstance(scale, str) and scale.strip().lower() == AUTO
        self.scale = None
        if scale is not None and not self.auto:
            what = "scale must be 'auto' or a factor >= 1, one number or one per array axis ([1, 1, 4])"
            self.scale = _per_axis(scale, what, lambda v: v >= 1)
        self.spacing_rtol = float(spacing_rtol)
        self.isotropy_ratio = float(isotropy_ratio)
        self.auto_scale = float(auto_scale)
        self.warn_ratio = float(warn_ratio)
        self.warn_bytes = float(warn_bytes)
        self.report = bool(report)

    def plan(self, img: MetaTensor) -> tuple[list[float], str]:
        """
        The zoom factor per array axis for one image, and how it was chosen.

        Args:
            img: the LR volume [C, d, h, w]; its affine gives the voxel size (mm) per array axis.

        Returns:
            three zoom factors (exactly 1 for an axis that is not resampled), and a short text for the printed line,
            e.g. ``"scale auto: anisotropic input, axes 2 brought to the finest spacing 1 mm"``.
        """
        spacing = _spacing(img)
        if self.target_spacing is not None:
            target = np.asarray(self.target_spacing)
            coarser = spacing > target * (1 + self.spacing_rtol)
            finer = spacing < target * (1 - self.spacing_rtol)
            how = f"target_spacing {_fmt(target)} mm"
            if finer.any():
                how += f"; {_axes(finer)} kept at {_fmt(spacing[finer])} mm, finer than the target (never downsampled)"
            return [float(s / t) if c else 1.0 for s, t, c in zip(spacing, target, coarser)], how
        if self.auto:
            finest = float(spacing.min())
            if spacing.max() < self.isotropy_ratio * finest:
                how = f"scale auto: isotropic input, x{self.auto_scale:g} along every axis (REM's training factor)"
                return [self.auto_scale] * 3, how
            coarser = spacing > finest * (1 + self.spacing_rtol)
            how = f"scale auto: anisotropic input, {_axes(coarser)} brought to its finest spacing {finest:.4g} mm"
            return [float(s / finest) if c else 1.0 for s, c in zip(spacing, coarser)], how
        return list(self.scale), f"scale {_fmt(self.scale)}"

    def zoom_for(self, img: MetaTensor) -> list[float]:
        """
        The zoom factor per array axis for one image (:meth:`plan`).

        Args:
            img: the LR volume [C, d, h, w].

        Returns:
            three zoom factors: ``spacing / target_spacing`` per axis coarser than the target (else exactly 1), the
            ``"auto"`` choice, or ``scale`` broadcast to 3 axes.
        """
        return self.plan(img)[0]

    def size_for(self, img: MetaTensor) -> list[int]:
        """
        The upsampled grid size of one image: ``size * zoom`` per axis (:meth:`zoom_for`), rounded to the nearest
        integer (at least 1); an axis with zoom 1 keeps its size.

        Args:
            img: the LR volume [C, d, h, w].

        Returns:
            three sizes in voxels, e.g. ``[40, 40, 60]`` for 40x40x20 at 0.7/0.7/2.1 mm and ``target_spacing`` 0.7.
        """
        return self._sizes(img, self.zoom_for(img))

    @staticmethod
    def _sizes(img: MetaTensor, zoom: Sequence[float]) -> list[int]:
        sizes = [int(s) for s in img.shape[1:4]]
        return [s if z == 1 else max(1, int(np.floor(s * z + 0.5))) for s, z in zip(sizes, zoom)]

    def describe(self, name: str, img: MetaTensor, size: Sequence[int], how: str) -> tuple[str, str | None]:
        """
        The printed line of one case and its warning (None when the grid is within the limits).

        Args:
            name: the case name.
            img: the LR volume [C, d, h, w] (its shape and affine).
            size: the output size per array axis (voxels).
            how: the text of :meth:`plan`.

        Returns:
            ``(line, warning)``, e.g. ``("t1: 64x64x16 voxels at 1x1x4 mm -> 64x64x64 voxels at 1x1x1 mm (4x the
            voxels; scale auto: ...)", None)``.
        """
        shape = [int(s) for s in img.shape[1:4]]
        spacing = _spacing(img)
        out_spacing = [s * n / m for s, n, m in zip(spacing, shape, size)]
        ratio = float(np.prod(size)) / float(np.prod(shape))
        gib = float(np.prod(size)) * int(img.shape[0]) * 4 / 2**30
        line = (
            f"{name}: {_fmt(shape)} voxels at {_fmt(spacing)} mm -> {_fmt(size)} voxels at {_fmt(out_spacing)} mm "
            f"({ratio:.4g}x the voxels; {how})"
        )
        reasons = []
        if ratio > self.warn_ratio:
            reasons.append(
                f"{ratio:.4g} times the input's voxels, more than {self.warn_ratio:g} (x4 along every axis, what REM "
                "is trained for)"
            )
        if gib * 2**30 > self.warn_bytes:
            reasons.append(f"{gib:.3g} GiB as float32, more than {self.warn_bytes / 2**30:.3g} GiB")
        if not reasons:
            return line, None
        warning = (
            f"warning: {name}: the SR grid {_fmt(size)} at {_fmt(out_spacing)} mm has " + " and ".join(reasons) + "; "
            "memory and time grow with it. For an anisotropic scan use --scale auto (axes coarser than the finest "
            "brought to it) or --target_spacing <mm>"
        )
        return line, warning

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the LR MetaTensor(s) [C, d, h, w] under ``keys`` (and the case ``name``,
                for the printed line; else the file name).

        Returns:
            a shallow copy of ``data`` with each volume replaced by its upsampled version [C, D, H, W]
            (:meth:`size_for`), whose affine has the new voxel size (same field of view); a volume whose size does
            not change is returned unchanged.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            zoom, how = self.plan(d[key])
            size = self._sizes(d[key], zoom)
            if self.report:
                line, warning = self.describe(case_name(d, key), d[key], size, how)
                print(line, flush=True)
                if warning:
                    print(warning, file=sys.stderr, flush=True)
            if size != [int(s) for s in d[key].shape[1:4]]:
                d[key] = Resize(spatial_size=size, mode="trilinear", align_corners=False)(d[key])
            if self.zoom_key:
                d[self.zoom_key] = torch.as_tensor([float(z) for z in zoom], dtype=torch.float32)
        return d
