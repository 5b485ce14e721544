"""Pair transforms: the paper's down-up degradation and the frozen REM applied once per volume.

Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section IV-D (LR inputs: trilinear downscaling by 1/2 or 1/4, then trilinear upscaling back to the image
dimension) and Section IV-B.2 (REM is pretrained and frozen inside the cascade).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .fast_inference import HaloSlidingWindowInferer


def degrade(volume: torch.Tensor, scale: float) -> torch.Tensor:
    """
    The "down-up" degradation: trilinear downscaling by ``1 / scale``, then trilinear upscaling to the same grid
    (``align_corners=False``, the grid REM was trained on).

    Source: Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-D.

    Args:
        volume: the high-resolution volume, channel first, in shape [C, D, H, W].
        scale: the downscaling factor (2 or 4 in the paper); 1 returns a copy.

    Returns:
        the degraded float32 volume on the input grid, [C, D, H, W].

    Raises:
        NotImplementedError: when ``scale != 1`` and ``volume`` is not 4-dimensional (raised by
            ``torch.nn.functional.interpolate``).
    """
    x = torch.as_tensor(volume).as_subclass(torch.Tensor).float()[None]
    if scale == 1:
        return x[0].clone()
    size = x.shape[2:]
    low = F.interpolate(x, size=[max(1, int(s // scale)) for s in size], mode="trilinear", align_corners=False)
    return F.interpolate(low, size=size, mode="trilinear", align_corners=False)[0]


def _like(out: torch.Tensor, ref) -> torch.Tensor:
    return MetaTensor(out, meta=ref.meta, applied_operations=[]) if isinstance(ref, MetaTensor) else out


class DegradePaird(MapTransform):
    """
    Write the down-up degraded copy (:func:`degrade`) of each key to ``<key>_lr`` (the HR volume stays under
    `key`; the copy keeps its metadata, it lies on the same grid).

    Args:
        keys: the key(s) of the HR volumes [C, D, H, W] (moving and fixed image).
        scale: the downscaling factor.
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(self, keys: KeysCollection, scale: float = 4, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale = float(scale)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the HR volume(s) [C, D, H, W] under ``keys``.

        Returns:
            a shallow copy of ``data`` with ``<key>_lr`` added for each key, [C, D, H, W].

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
            NotImplementedError: when a volume is not 4-dimensional (and ``scale != 1``).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_lr"] = _like(degrade(d[key], self.scale), d[key])
        return d


class EnhancePaird(MapTransform):
    """
    Write REM(`key`) to `out_keys` with the frozen REM (a copy when REM is None: the identity).

    Placed before the random crop in training so `CacheDataset` runs REM once per volume rather than
    once per step; REM is frozen, so this is exactly the cascade's first stage (``y = REM(x)`` of Eq. (2) in
    Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images", Section III-B).
    REM runs window by window on REM's device, under ``torch.no_grad``, with
    ``scripts.fast_inference.HaloSlidingWindowInferer`` (MONAI ``sliding_window_inference``; the full-volume result,
    as the cascade computes at inference); volumes are cached by file name, so an image shared by several pairs is
    enhanced once.

    Args:
        keys: the key(s) of the trilinear-upsampled LR volumes [1, D, H, W].
        out_keys: the output key for each of ``keys``, in the same order.
        rem: the frozen REM (``scripts.rem_loader.load_rem``), or ``None`` for the identity.
        max_window_voxels: the largest window, in voxels (bounds the memory).
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        out_keys: Sequence[str],
        rem: torch.nn.Module | None,
        max_window_voxels: int = 2**21,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.out_keys = list(out_keys)
        self.rem = rem
        self.inferer = HaloSlidingWindowInferer(max_window_voxels=max_window_voxels)
        self._cache: dict[str, torch.Tensor] = {}  # volumes shared by several pairs are enhanced once

    @torch.no_grad()
    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the LR volume(s) [1, D, H, W] under ``keys``.

        Returns:
            a shallow copy of ``data`` with the SR volume [1, D, H, W] (float32, on the CPU, with the input's
            metadata) under each of ``out_keys``.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key, out_key in zip(self.key_iterator(d), self.out_keys):
            name = str(getattr(d[key], "meta", {}).get("filename_or_obj", "")) or None
            if name is not None and name in self._cache:
                x = self._cache[name]
            else:
                x = torch.as_tensor(d[key]).as_subclass(torch.Tensor).float()
                if self.rem is not None:
                    device = next(self.rem.parameters()).device
                    x = self.inferer(x[None].to(device), self.rem)[0].cpu()
                if name is not None:
                    self._cache[name] = x
            d[out_key] = _like(x.clone(), d[key])
        return d


def cache_key(scale: float, rem: torch.nn.Module | None) -> str:
    """A short key of everything the cached training volumes depend on besides the datalist item: the
    degradation scale and REM (its weights, or none). Used to keep on-disk caches of different settings apart."""
    digest = hashlib.sha1(f"scale={float(scale)!r};rem={rem is not None}".encode())
    if rem is not None:
        for name, tensor in sorted(rem.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def training_dataset(
    data: Sequence[Mapping],
    transform,
    cache_dir: str | None = None,
    scale: float = 4,
    rem: torch.nn.Module | None = None,
    num_workers: int = 0,
):
    """
    The training dataset: MONAI ``CacheDataset`` (every pair's deterministic preprocessing, REM included, held in
    memory; the default) or, with `cache_dir`, MONAI ``PersistentDataset`` (the same results written once to disk and
    read back at every step; missing entries are computed here, before training starts).

    Why: caching REM's output for a few dozen full volumes takes 10-20 minutes on a CPU; on disk it is computed once
    and shared by every later run with the same scale and REM. The cache lives in ``<cache_dir>/<cache_key>``, so runs
    with another scale, without REM (``use_rem false``) or with other REM weights never read each other's volumes.
    MONAI keys each entry by the datalist item, so change `cache_dir` after changing the preprocessing otherwise.

    Args:
        data: the datalist items.
        transform: the preprocessing (``train#preprocessing``); caching stops at its first random transform.
        cache_dir: folder of the on-disk cache, or None / "" for the in-memory ``CacheDataset``.
        scale: the degradation scale (part of the cache key).
        rem: the frozen REM, or None (part of the cache key).
        num_workers: ``CacheDataset``'s workers for the initial caching.

    Returns:
        a ``CacheDataset`` or a ``PersistentDataset``.
    """
    from monai.data import CacheDataset, PersistentDataset

    if not cache_dir:
        return CacheDataset(data=data, transform=transform, cache_rate=1.0, num_workers=num_workers)
    from tqdm import tqdm

    dataset = PersistentDataset(
        data=data, transform=transform, cache_dir=os.path.join(cache_dir, cache_key(scale, rem))
    )
    # fill the cache now, as CacheDataset does, so that a time-limited run spends its budget on training
    for index in tqdm(range(len(dataset)), desc="caching the training pairs", unit="pair"):
        dataset[index]
    return dataset
