"""The paper's degradation model and the interpolation baselines.

A low-resolution (LR) volume is made by trilinear downscaling of the high-resolution (HR) one
by 1/scale; REM's input is that LR volume trilinearly upscaled back to the HR grid (the paper's
"down-up" protocol). Everything uses ``align_corners=False`` so that a real LR NIfTI with a
correctly scaled affine (MONAI's ``Zoom``) lands on exactly the grid used in training.
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
    scales = [scale] * len(shape) if np.isscalar(scale) else list(scale)
    return tuple(max(1, int(np.floor(s / f))) for s, f in zip(shape, scales))


def downsample(hr: torch.Tensor, scale: float | Sequence[float]) -> torch.Tensor:
    """Trilinear downscaling of a [C, D, H, W] volume by 1/scale."""
    x = _as_batch(hr)
    return F.interpolate(x, size=lr_shape(x.shape[2:], scale), mode="trilinear", align_corners=False)[0]


def upsample(lr: torch.Tensor, size: Sequence[int], method: str = "trilinear") -> torch.Tensor:
    """Upsample a [C, d, h, w] LR volume to `size` with nearest, trilinear or cubic B-spline interpolation."""
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
    """HR [C, D, H, W] -> LR -> back to the HR grid with `method` (REM's input for method='trilinear')."""
    return upsample(downsample(hr, scale), hr.shape[1:], method)


class Degraded(MapTransform):
    """Write ``degrade(data[key], scale)`` to ``data[out_key]``; keeps the HR meta data (same grid)."""

    def __init__(self, keys: KeysCollection, scale: float, out_key: str = "lr", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale = scale
        self.out_key = out_key

    def _apply(self, d: dict, key: Hashable, scale: float) -> None:
        out = degrade(d[key], scale)
        if isinstance(d[key], MetaTensor):
            out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
        d[self.out_key] = out
        d["scale"] = float(scale)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self._apply(d, key, self.scale)
        return d


class MultiScaleDegraded(MapTransform):
    """Deterministic: write ``degrade(data[key], s)`` to ``data[f"{prefix}{s:g}"]`` for every s in `scales`.

    Placed before the random transforms, so `CacheDataset` computes each scale's degraded volume
    once instead of once per sample (the full-volume interpolation dominates data loading on CPU).
    """

    def __init__(self, keys: KeysCollection, scales: Sequence[float] = (2, 4), prefix: str = "lr_x",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if len(scales) == 0:
            raise ValueError("MultiScaleDegraded needs at least one scale")
        self.scales = [float(s) for s in scales]
        self.prefix = prefix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            for scale in self.scales:
                out = degrade(d[key], scale)
                if isinstance(d[key], MetaTensor):
                    out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
                d[f"{self.prefix}{scale:g}"] = out
        return d


class RandSelectScaled(Randomizable, MapTransform):
    """Random: move one of the `MultiScaleDegraded` outputs to `out_key` (and its scale to ``"scale"``),
    dropping the others."""

    def __init__(self, scales: Sequence[float] = (2, 4), out_key: str = "image", prefix: str = "lr_x"):
        MapTransform.__init__(self, keys=[f"{prefix}{float(s):g}" for s in scales])
        self.scales = [float(s) for s in scales]
        self.prefix = prefix
        self.out_key = out_key
        self.scale = self.scales[0]

    def randomize(self, data=None) -> None:
        self.scale = self.scales[self.R.randint(len(self.scales))]

    def __call__(self, data: Mapping) -> dict:
        self.randomize()
        d = dict(data)
        d[self.out_key] = d[f"{self.prefix}{self.scale:g}"]
        for s in self.scales:
            d.pop(f"{self.prefix}{s:g}", None)
        d["scale"] = self.scale
        return d
