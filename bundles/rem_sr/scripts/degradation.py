"""The paper's degradation model and the interpolation baselines.

Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section IV-A (the LR inputs are the HR images trilinearly downscaled by 1/2 and 1/4), Section IV-C and Fig. 4
(nearest-neighbour and trilinear upsampling baselines) and Section IV-D (the "down-up" protocol: trilinear
downscaling followed by trilinear upscaling of the same factor).

A low-resolution (LR) volume is made by trilinear downscaling of the high-resolution (HR) one
by 1/scale; REM's input is that LR volume trilinearly upscaled back to the HR grid (the paper's
"down-up" protocol). Everything uses ``align_corners=False`` so that a real LR NIfTI with a
correctly scaled affine (MONAI's ``Zoom``) lands on exactly the grid used in training. The cubic
B-spline baseline (``method="bspline"``) is an extra of this bundle (scipy ``ndimage.zoom``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage


def _as_batch(volume: torch.Tensor) -> torch.Tensor:
    """[C, D, H, W] -> [1, C, D, H, W] as a plain float tensor."""
    if volume.ndim != 4:
        raise ValueError(f"expected a channel-first 3D volume [C, D, H, W], got shape {tuple(volume.shape)}")
    return torch.as_tensor(volume).as_subclass(torch.Tensor).float()[None]


def lr_shape(shape: Sequence[int], scale: float | Sequence[float]) -> tuple[int, ...]:
    """
    Spatial size of the low-resolution grid for a downscaling by ``1 / scale``.

    Args:
        shape: the high-resolution spatial size (voxels), e.g. ``(D, H, W)``.
        scale: the downscaling factor, one number for all axes or one per axis (2 for x2, 4 for x4).

    Returns:
        ``floor(shape / scale)`` per axis, at least 1 voxel each.
    """
    scales = [scale] * len(shape) if np.isscalar(scale) else list(scale)
    return tuple(max(1, int(np.floor(s / f))) for s, f in zip(shape, scales))


def downsample(hr: torch.Tensor, scale: float | Sequence[float]) -> torch.Tensor:
    """
    Trilinear downscaling of a volume by ``1 / scale`` (``align_corners=False``).

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-A (trilinear downscaling by factors 1/2 and 1/4).

    Args:
        hr: the high-resolution volume, channel first, in shape [C, D, H, W].
        scale: the downscaling factor, one number or one per spatial axis.

    Returns:
        the low-resolution float32 volume [C, d, h, w] with ``(d, h, w) = lr_shape((D, H, W), scale)``.

    Raises:
        ValueError: when ``hr`` is not 4-dimensional.
    """
    x = _as_batch(hr)
    return F.interpolate(x, size=lr_shape(x.shape[2:], scale), mode="trilinear", align_corners=False)[0]


def upsample(lr: torch.Tensor, size: Sequence[int], method: str = "trilinear") -> torch.Tensor:
    """
    Interpolate a low-resolution volume onto a larger grid (the interpolation baselines of the paper).

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-C and Fig. 4 (nearest-neighbour and trilinear baselines); the cubic B-spline baseline uses scipy's
    ``ndimage.zoom`` (``order=3``, ``grid_mode=True``).

    Args:
        lr: the low-resolution volume, channel first, in shape [C, d, h, w].
        size: the target spatial size ``(D, H, W)`` in voxels.
        method: ``"nearest"`` (PyTorch ``nearest-exact``), ``"trilinear"`` (``align_corners=False``) or
            ``"bspline"`` (cubic B-spline, mirror boundary).

    Returns:
        the upsampled float32 volume [C, D, H, W].

    Raises:
        ValueError: when ``lr`` is not 4-dimensional or ``method`` is unknown.
    """
    x = _as_batch(lr)
    if method == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest-exact")[0]
    if method == "trilinear":
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]
    if method == "bspline":
        # scipy's grid_mode=True uses the same pixel-area alignment as align_corners=False
        arr = x[0].numpy()
        zoom = [t / s for t, s in zip(size, arr.shape[1:])]
        out = np.stack([ndimage.zoom(c, zoom, order=3, grid_mode=True, mode="grid-mirror") for c in arr])
        out = out[(slice(None),) + tuple(slice(0, t) for t in size)]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    raise ValueError(f"unknown interpolation method {method!r}; use nearest, trilinear or bspline")


def degrade(hr: torch.Tensor, scale: float | Sequence[float], method: str = "trilinear") -> torch.Tensor:
    """
    The "down-up" degradation: trilinear downscaling by ``1 / scale``, then interpolation back to the HR grid.

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-D (trilinear downscaling followed by trilinear upscaling of the same factor); with
    ``method="trilinear"`` this is REM's input.

    Args:
        hr: the high-resolution volume, channel first, in shape [C, D, H, W].
        scale: the downscaling factor, one number or one per spatial axis.
        method: the upsampling interpolation, see :func:`upsample`.

    Returns:
        the degraded float32 volume on the HR grid, [C, D, H, W].

    Raises:
        ValueError: when ``hr`` is not 4-dimensional or ``method`` is unknown.
    """
    return upsample(downsample(hr, scale), hr.shape[1:], method)


class Degraded(MapTransform):
    """
    Dictionary transform writing the down-up degraded copy ``degrade(data[key], scale, method)`` to ``data[out_key]``.

    The output keeps the HR volume's metadata (it lies on the same grid); ``data["scale"]`` is set to ``scale``.
    Source: the "down-up" protocol of Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration
    of Medical Images", Section IV-D (see :func:`degrade`).

    Args:
        keys: the key(s) of the HR volumes [C, D, H, W].
        scale: the downscaling factor (2 or 4 in the paper).
        out_key: where the degraded volume is written.
        allow_missing_keys: don't raise an exception when a key is missing.
        method: the upsampling back to the HR grid, see :func:`upsample`: ``"trilinear"`` (REM's input, the
            default), ``"nearest"`` or ``"bspline"`` (the interpolation baselines of evaluate.json).

    Raises:
        ValueError: when ``method`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float,
        out_key: str = "lr",
        allow_missing_keys: bool = False,
        method: str = "trilinear",
    ):
        super().__init__(keys, allow_missing_keys)
        if method not in ("nearest", "trilinear", "bspline"):
            raise ValueError(f"unknown interpolation method {method!r}; use nearest, trilinear or bspline")
        self.scale = scale
        self.out_key = out_key
        self.method = method

    def _apply(self, d: dict, key: Hashable, scale: float) -> None:
        out = degrade(d[key], scale, self.method)
        if isinstance(d[key], MetaTensor):
            out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
        d[self.out_key] = out
        d["scale"] = float(scale)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the HR volume(s) [C, D, H, W] under ``keys``.

        Returns:
            a shallow copy of ``data`` with ``out_key`` (the degraded volume [C, D, H, W]) and ``"scale"`` added.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
            ValueError: when a volume is not 4-dimensional.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            self._apply(d, key, self.scale)
        return d


class MultiScaleDegraded(MapTransform):
    """
    Deterministic transform writing ``degrade(data[key], s)`` to ``data[f"{prefix}{s:g}"]`` for every ``s`` in
    ``scales``.

    Placed before the random transforms, so `CacheDataset` computes each scale's degraded volume
    once instead of once per sample (the full-volume interpolation dominates data loading on CPU).
    Source: the "down-up" protocol of Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration
    of Medical Images", Section IV-D, at the paper's two scales x2 and x4 (Section IV-A).

    Args:
        keys: the key(s) of the HR volumes [C, D, H, W].
        scales: the downscaling factors.
        prefix: prefix of the output keys (``"lr_x2"``, ``"lr_x4"`` by default).
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        ValueError: when ``scales`` is empty.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scales: Sequence[float] = (2, 4),
        prefix: str = "lr_x",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(scales) == 0:
            raise ValueError("MultiScaleDegraded needs at least one scale")
        self.scales = [float(s) for s in scales]
        self.prefix = prefix

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the HR volume(s) [C, D, H, W] under ``keys``.

        Returns:
            a shallow copy of ``data`` with one degraded volume [C, D, H, W] per scale (HR metadata kept).

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
            ValueError: when a volume is not 4-dimensional.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            for scale in self.scales:
                out = degrade(d[key], scale)
                if isinstance(d[key], MetaTensor):
                    out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
                d[f"{self.prefix}{scale:g}"] = out
        return d


class RandSelectScaled(Randomizable, MapTransform):
    """
    Random transform moving one of the :class:`MultiScaleDegraded` outputs to ``out_key`` (and its scale to
    ``data["scale"]``), dropping the others, so that one model is trained on all the scales.

    Args:
        scales: the scales written by :class:`MultiScaleDegraded` (in any order).
        out_key: where the selected degraded volume is written.
        prefix: prefix of the :class:`MultiScaleDegraded` output keys.
    """

    def __init__(self, scales: Sequence[float] = (2, 4), out_key: str = "image", prefix: str = "lr_x"):
        MapTransform.__init__(self, keys=[f"{prefix}{float(s):g}" for s in scales])
        self.scales = [float(s) for s in scales]
        self.prefix = prefix
        self.out_key = out_key
        self.scale = self.scales[0]

    def randomize(self, data=None) -> None:
        """
        Draw the scale (uniformly among ``scales``) with the transform's random state ``self.R``.

        Args:
            data: unused (MONAI ``Randomizable`` signature).
        """
        self.scale = self.scales[self.R.randint(len(self.scales))]

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding every ``f"{prefix}{s:g}"`` volume written by :class:`MultiScaleDegraded`.

        Returns:
            a shallow copy of ``data`` with ``out_key`` set to the volume of the drawn scale, ``"scale"`` set to
            that scale (float) and the per-scale keys removed.

        Raises:
            KeyError: when the volume of the drawn scale is missing.
        """
        self.randomize()
        d = dict(data)
        d[self.out_key] = d[f"{self.prefix}{self.scale:g}"]
        for s in self.scales:
            d.pop(f"{self.prefix}{s:g}", None)
        d["scale"] = self.scale
        return d
