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


PROFILES = ("none", "gaussian", "box")
# FWHM of a Gaussian = 2 sqrt(2 ln 2) sigma
FWHM_PER_SIGMA = 2.0 * float(np.sqrt(2.0 * np.log(2.0)))


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> list[float]:
    values = [float(value)] * ndim if np.isscalar(value) else [float(v) for v in value]
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value or {ndim} (one per spatial axis), got {value!r}")
    return values


def slice_profile_kernel(thickness: float, profile: str) -> torch.Tensor:
    """
    The 1D slice profile of a thick-slice acquisition, sampled on the HR grid.

    Args:
        thickness: the slice thickness in HR voxels (> 0): the FWHM of the ``"gaussian"`` profile, the width of
            the ``"box"`` profile (partial voxels at its ends get fractional weights).
        profile: ``"gaussian"`` or ``"box"``.

    Returns:
        the normalised float32 kernel (odd length, sums to 1).

    Raises:
        ValueError: for a thickness <= 0 or an unknown profile.
    """
    if thickness <= 0:
        raise ValueError(f"slice thickness must be > 0 voxels, got {thickness}")
    if profile == "gaussian":
        sigma = thickness / FWHM_PER_SIGMA
        radius = int(np.ceil(3 * sigma))
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        weights = np.exp(-0.5 * (x / sigma) ** 2)
    elif profile == "box":
        radius = max(0, int(np.ceil(thickness / 2 - 0.5 - 1e-9)))
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        # overlap of each HR voxel [x - 1/2, x + 1/2] with the slab [-t/2, t/2]
        weights = np.clip(np.minimum(x + 0.5, thickness / 2) - np.maximum(x - 0.5, -thickness / 2), 0, None)
    else:
        raise ValueError(f"unknown slice profile {profile!r}; use one of {PROFILES[1:]}")
    return torch.from_numpy((weights / weights.sum()).astype(np.float32))


def blur_slice_profile(
    volume: torch.Tensor, thickness: float | Sequence[float], profile: str = "gaussian"
) -> torch.Tensor:
    """
    Convolve a volume with a slice profile along every axis whose thickness exceeds one voxel.

    Args:
        volume: a channel-first volume [C, D, H, W].
        thickness: slice thickness in HR voxels, one number or one per spatial axis; axes with thickness <= 1
            are left alone.
        profile: ``"gaussian"`` (FWHM = thickness), ``"box"`` (width = thickness) or ``"none"`` (no blur).

    Returns:
        the blurred float32 volume [C, D, H, W] (edges replicated).

    Raises:
        ValueError: for a volume that is not 4-dimensional or an unknown profile.
    """
    x = _as_batch(volume)
    if profile == "none":
        return x[0]
    if profile not in PROFILES:
        raise ValueError(f"unknown slice profile {profile!r}; use one of {PROFILES}")
    for axis, t in enumerate(_per_axis(thickness, 3, "thickness")):
        if t <= 1.0:
            continue
        kernel = slice_profile_kernel(t, profile)
        radius = len(kernel) // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad counts from the last axis
        c = x.shape[1]
        x = F.conv3d(
            F.pad(x, pad, mode="replicate"), kernel.reshape(shape).expand(c, *shape[1:]).contiguous(), groups=c
        )
    return x[0]


def downsample(
    hr: torch.Tensor,
    scale: float | Sequence[float],
    profile: str = "none",
    thickness: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """
    Downscaling by ``1 / scale`` (trilinear sampling, ``align_corners=False``), after an optional slice profile.

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-A (trilinear downscaling by factors 1/2 and 1/4: ``profile="none"``, the default). The slice
    profiles model thick-slice acquisitions (this bundle's extension): each LR slice integrates the HR volume over
    its thickness (Gaussian with FWHM = thickness, or a box of that width); a thickness below the slice spacing
    ``scale`` leaves a slice gap.

    Args:
        hr: the high-resolution volume, channel first, in shape [C, D, H, W].
        scale: the downscaling factor (the LR slice spacing in HR voxels), one number or one per spatial axis.
        profile: ``"none"`` (the paper's plain trilinear downscaling), ``"gaussian"`` or ``"box"``.
        thickness: the slice thickness in HR voxels, one number or one per axis; ``None`` = ``scale`` (no gap).

    Returns:
        the low-resolution float32 volume [C, d, h, w] with ``(d, h, w) = lr_shape((D, H, W), scale)``.

    Raises:
        ValueError: when ``hr`` is not 4-dimensional, or for an unknown profile.
    """
    x = _as_batch(hr)
    if profile != "none":
        x = blur_slice_profile(x[0], scale if thickness is None else thickness, profile)[None]
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


def degrade(
    hr: torch.Tensor,
    scale: float | Sequence[float],
    method: str = "trilinear",
    profile: str = "none",
    gap: float = 0.0,
) -> torch.Tensor:
    """
    The "down-up" degradation: downscaling by ``1 / scale``, then interpolation back to the HR grid.

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-D (trilinear downscaling followed by trilinear upscaling of the same factor); with
    ``method="trilinear"`` and ``profile="none"`` this is REM's input in the paper's protocol. A per-axis scale
    with a slice profile (``scale=(1, 1, 4), profile="gaussian"``) is a thick-slice acquisition, 1x1x4 mm from
    1 mm.

    Args:
        hr: the high-resolution volume, channel first, in shape [C, D, H, W].
        scale: the downscaling factor, one number or one per spatial axis.
        method: the upsampling interpolation, see :func:`upsample`.
        profile: the slice profile of the downscaling, see :func:`downsample`.
        gap: the slice gap in HR voxels (slice thickness = scale - gap on every axis with scale > 1).

    Returns:
        the degraded float32 volume on the HR grid, [C, D, H, W].

    Raises:
        ValueError: when ``hr`` is not 4-dimensional, ``method`` or ``profile`` is unknown, or the gap leaves no
            slice thickness.
    """
    scales = _per_axis(scale, 3, "scale")
    thickness = [s - gap if s > 1 else s for s in scales]
    if gap and min(t for t, s in zip(thickness, scales) if s > 1) <= 0:
        raise ValueError(f"slice gap {gap} leaves no slice thickness at scale {scale}")
    return upsample(downsample(hr, scales, profile, thickness), hr.shape[1:], method)


class Degraded(MapTransform):
    """
    Dictionary transform writing the down-up degraded copy ``degrade(data[key], scale, method)`` to ``data[out_key]``.

    The output keeps the HR volume's metadata (it lies on the same grid); ``data["scale"]`` is set to ``scale``.
    Source: the "down-up" protocol of Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration
    of Medical Images", Section IV-D (see :func:`degrade`).

    Args:
        keys: the key(s) of the HR volumes [C, D, H, W].
        scale: the downscaling factor (2 or 4 in the paper), one number or one per axis; ``None`` reads the
            degradation of each item from ``data["degradation"]`` (``{"scale": ..., "profile": ..., "gap": ...}``,
            see :func:`expand_degradations`).
        out_key: where the degraded volume is written.
        allow_missing_keys: don't raise an exception when a key is missing.
        method: the upsampling back to the HR grid, see :func:`upsample`: ``"trilinear"`` (REM's input, the
            default), ``"nearest"`` or ``"bspline"`` (the interpolation baselines of evaluate.json).
        profile: the slice profile, see :func:`downsample`; ``"auto"`` = ``"none"`` (the paper's protocol) for an
            isotropic scale, ``"gaussian"`` for a per-axis (thick-slice) scale such as ``[1, 1, 4]``.
        gap: the slice gap in HR voxels, see :func:`degrade`.

    Raises:
        ValueError: when ``method`` or ``profile`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float | Sequence[float],
        out_key: str = "lr",
        allow_missing_keys: bool = False,
        method: str = "trilinear",
        profile: str = "auto",
        gap: float = 0.0,
    ):
        super().__init__(keys, allow_missing_keys)
        if method not in ("nearest", "trilinear", "bspline"):
            raise ValueError(f"unknown interpolation method {method!r}; use nearest, trilinear or bspline")
        if profile not in PROFILES + ("auto",):
            raise ValueError(f"unknown slice profile {profile!r}; use auto or one of {PROFILES}")
        self.scale = scale
        self.out_key = out_key
        self.method = method
        self.profile = profile if profile != "auto" else ("none" if np.isscalar(scale) else "gaussian")
        self.gap = float(gap)

    def _apply(self, d: dict, key: Hashable, scale: float | Sequence[float]) -> None:
        out = degrade(d[key], scale, self.method, self.profile, self.gap)
        if isinstance(d[key], MetaTensor):
            out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
        d[self.out_key] = out
        d["scale"] = float(scale) if np.isscalar(scale) else float(max(scale))

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
            if self.scale is None:
                self._apply_item(d, key, d["degradation"])
            else:
                self._apply(d, key, self.scale)
        return d

    def _apply_item(self, d: dict, key: Hashable, degradation: Mapping) -> None:
        scale = degradation["scale"]
        profile = degradation.get("profile", "auto")
        profile = profile if profile != "auto" else ("none" if np.isscalar(scale) else "gaussian")
        out = degrade(d[key], scale, self.method, profile, float(degradation.get("gap", 0.0)))
        if isinstance(d[key], MetaTensor):
            out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
        d[self.out_key] = out
        d["scale"] = float(scale) if np.isscalar(scale) else float(max(scale))


def degradation_label(scale: float | Sequence[float], profile: str = "auto", gap: float = 0.0) -> str:
    """A short name of a degradation: ``x4`` (isotropic), ``1x1x4`` (thick-slice), ``1x1x4_box_gap1``."""
    if np.isscalar(scale):
        name = f"x{float(scale):g}"
    else:
        name = "x".join(f"{float(s):g}" for s in scale)
    if profile not in ("auto", "none", "gaussian") or (profile == "none" and not np.isscalar(scale)):
        name += f"_{profile}"
    return name + (f"_gap{float(gap):g}" if gap else "")


def degradation_text(scale: float | Sequence[float], profile: str = "auto", gap: float = 0.0) -> str:
    """A readable description for figure titles: ``x4 coarser``, ``1x1x4 slices``, ``1x1x4 slices, box, gap 1``
    (a Gaussian profile is the default of thick slices and is not named)."""
    if np.isscalar(scale) and profile in ("auto", "none"):
        return f"x{float(scale):g} coarser"
    if np.isscalar(scale):
        scale = [scale] * 3
    text = f"{'x'.join(f'{float(s):g}' for s in scale)} slices"
    text += f", {profile}" if profile not in ("auto", "gaussian") else ""
    return text + (f", gap {float(gap):g}" if gap else "")


def expand_degradations(items: Sequence[Mapping], degradations: Sequence[Mapping]) -> list[dict]:
    """
    One copy of every item per degradation, for validating one model on several LR kinds at once.

    Args:
        items: datalist items (dicts).
        degradations: e.g. ``[{"scale": 2}, {"scale": 4}, {"scale": [1, 1, 4], "profile": "gaussian"}]``.

    Returns:
        the items x degradations, each with ``"degradation"`` set and ``"name"`` suffixed with
        :func:`degradation_label`.

    Raises:
        ValueError: when ``degradations`` is empty or an entry has no ``scale``.
    """
    if not degradations or any("scale" not in g for g in degradations):
        raise ValueError(f"degradations must be a non-empty list of dicts with a 'scale', got {degradations!r}")
    out = []
    for item in items:
        for g in degradations:
            label = degradation_label(g["scale"], g.get("profile", "auto"), g.get("gap", 0.0))
            out.append({**item, "degradation": dict(g), "name": f"{item.get('name', 'case')}_{label}"})
    return out


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


class RandDegraded(Randomizable, MapTransform):
    """
    Random degradation for training one model on isotropic and thick-slice low-resolution input.

    Each call draws one of:

    - **isotropic** (probability ``1 - thick_prob``): a factor from ``iso_scales`` on every axis, plain trilinear
      downscaling (the paper's protocol, Sun & Simon, Section IV-A/D);
    - **thick-slice** (probability ``thick_prob``): one random axis downscaled by an integer factor drawn from
      ``thick_scales`` (the slice spacing), after a slice profile drawn from ``profiles`` (Gaussian with FWHM =
      thickness, or box); with probability ``gap_prob`` a slice gap of up to ``max_gap_fraction`` of the spacing.

    The HR volume ``data[keys]`` (and every key in ``crop_keys``) is first trimmed at its far end to a multiple of
    the drawn factor on each scaled axis, so that the LR grid divides the patch exactly as it divides a whole
    volume; the degraded volume (trilinear back onto the trimmed HR grid) goes to ``out_key``. Crop a margin of
    at least the largest factor off every side afterwards (``CenterSpatialCropd``): it holds the patch edges'
    interpolation artefacts, which a whole volume does not have.

    Args:
        keys: the HR volume key [C, D, H, W] (one key).
        out_key: where the degraded volume [C, D', H', W'] is written.
        iso_scales: isotropic factors (the paper's 2 and 4).
        thick_scales: slice-spacing factors of the thick-slice mode (integers).
        thick_prob: probability of the thick-slice mode.
        profiles: slice profiles of the thick-slice mode, drawn uniformly.
        gap_prob: probability of a slice gap in the thick-slice mode.
        max_gap_fraction: the largest gap as a fraction of the slice spacing.
        crop_keys: other keys trimmed with the HR volume (e.g. a mask).
        min_size: the smallest trimmed size per axis (the training patch): a smaller result is an error that names
            ``crop_margin``, instead of a batch of mismatched patches.

    Raises:
        ValueError: for empty factor lists, a non-integer thick factor, probabilities outside [0, 1] or an
            unknown profile.
    """

    def __init__(
        self,
        keys: KeysCollection,
        out_key: str = "image",
        iso_scales: Sequence[float] = (2, 4),
        thick_scales: Sequence[int] = (2, 3, 4, 5, 6),
        thick_prob: float = 0.5,
        profiles: Sequence[str] = ("gaussian", "box"),
        gap_prob: float = 0.25,
        max_gap_fraction: float = 0.5,
        crop_keys: KeysCollection = (),
        min_size: Sequence[int] | None = None,
    ):
        MapTransform.__init__(self, keys)
        if not 0 <= thick_prob <= 1 or not 0 <= gap_prob <= 1 or not 0 <= max_gap_fraction < 1:
            raise ValueError("thick_prob and gap_prob must be in [0, 1], max_gap_fraction in [0, 1)")
        if (thick_prob < 1 and not iso_scales) or (thick_prob > 0 and not thick_scales):
            raise ValueError("RandDegraded needs iso_scales (thick_prob < 1) and thick_scales (thick_prob > 0)")
        if any(int(s) != s or s < 2 for s in thick_scales):
            raise ValueError(f"thick_scales must be integers >= 2, got {list(thick_scales)}")
        if any(p not in PROFILES[1:] for p in profiles) or not profiles:
            raise ValueError(f"profiles must be a non-empty list of {PROFILES[1:]}, got {list(profiles)}")
        self.out_key = out_key
        self.iso_scales = [float(s) for s in iso_scales]
        self.thick_scales = [int(s) for s in thick_scales]
        self.thick_prob = thick_prob
        self.profiles = list(profiles)
        self.gap_prob = gap_prob
        self.max_gap_fraction = max_gap_fraction
        self.crop_keys = [crop_keys] if isinstance(crop_keys, str) else list(crop_keys)
        self.min_size = None if min_size is None else [int(n) for n in min_size]
        self.scale: list[float] = [self.iso_scales[0]] * 3 if self.iso_scales else [1.0, 1.0, 1.0]
        self.profile = "none"
        self.gap = 0.0

    def randomize(self, data=None) -> None:
        """
        Draw the mode, factor(s), profile and gap with the transform's random state ``self.R``.

        Args:
            data: unused (MONAI ``Randomizable`` signature).
        """
        if self.R.rand() < self.thick_prob:
            scale = [1.0, 1.0, 1.0]
            scale[self.R.randint(3)] = float(self.thick_scales[self.R.randint(len(self.thick_scales))])
            self.scale = scale
            self.profile = self.profiles[self.R.randint(len(self.profiles))]
            self.gap = (
                float(self.R.uniform(0, self.max_gap_fraction) * max(scale)) if self.R.rand() < self.gap_prob else 0.0
            )
        else:
            self.scale = [self.iso_scales[self.R.randint(len(self.iso_scales))]] * 3
            self.profile, self.gap = "none", 0.0

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the HR volume [C, D, H, W] under ``keys``.

        Returns:
            a shallow copy of ``data`` with the HR volume (and ``crop_keys``) trimmed to multiples of the factors,
            ``out_key`` (the degraded volume on that grid) and ``"scale"`` (the largest factor) set.

        Raises:
            KeyError: when the HR volume is missing.
            ValueError: when a scaled axis is shorter than its factor.
        """
        self.randomize()
        d = dict(data)
        (key,) = list(self.keys)
        shape = d[key].shape[1:]
        keep = tuple(slice(0, int(n // s * s)) if s > 1 else slice(None) for n, s in zip(shape, self.scale))
        if any(k.stop == 0 for k in keep if k.stop is not None):
            raise ValueError(f"a patch of {tuple(shape)} voxels is smaller than the factor {self.scale}")
        trimmed = [k.stop if k.stop is not None else n for k, n in zip(keep, shape)]
        if self.min_size is not None and any(t < m for t, m in zip(trimmed, self.min_size)):
            raise ValueError(
                f"a crop of {tuple(shape)} voxels trimmed to a multiple of the factor {self.scale} is "
                f"{tuple(trimmed)}, smaller than the patch {tuple(self.min_size)}: set crop_margin to at least half "
                "the largest factor"
            )
        for k in [key, *self.crop_keys]:
            if k in d:
                d[k] = d[k][(slice(None),) + keep]
        out = degrade(d[key], self.scale, "trilinear", self.profile, self.gap)
        if isinstance(d[key], MetaTensor):
            out = MetaTensor(out, meta=d[key].meta, applied_operations=[])
        d[self.out_key] = out
        d["scale"] = float(max(self.scale))
        return d
