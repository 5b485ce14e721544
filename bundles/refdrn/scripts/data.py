"""Pair transforms: the paper's down-up degradation and the frozen REM applied once per volume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform


def degrade(volume: torch.Tensor, scale: float) -> torch.Tensor:
    """[C, D, H, W] -> trilinear down by 1/scale -> trilinear up to the same grid (align_corners=False,
    the grid REM was trained on). scale 1 returns a copy."""
    x = torch.as_tensor(volume).as_subclass(torch.Tensor).float()[None]
    if scale == 1:
        return x[0].clone()
    size = x.shape[2:]
    low = F.interpolate(x, size=[max(1, int(s // scale)) for s in size], mode="trilinear", align_corners=False)
    return F.interpolate(low, size=size, mode="trilinear", align_corners=False)[0]


def _like(out: torch.Tensor, ref) -> torch.Tensor:
    return MetaTensor(out, meta=ref.meta, applied_operations=[]) if isinstance(ref, MetaTensor) else out


class DegradePaird(MapTransform):
    """Write the down-up degraded copy of each key to ``<key>_lr`` (the HR volume stays under `key`)."""

    def __init__(self, keys: KeysCollection, scale: float = 4, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale = float(scale)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_lr"] = _like(degrade(d[key], self.scale), d[key])
        return d


class EnhancePaird(MapTransform):
    """Write REM(`key`) to `out_keys` with the frozen REM (a copy when REM is None: the identity).

    Placed before the random crop in training so `CacheDataset` runs REM once per volume rather than
    once per step; REM is frozen, so this is exactly the cascade's first stage.
    """

    def __init__(self, keys: KeysCollection, out_keys: Sequence[str], rem: torch.nn.Module | None,
                 roi_size: Sequence[int] = (96, 96, 96), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.out_keys = list(out_keys)
        self.rem = rem
        self.inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=1, overlap=0.25, mode="gaussian")
        self._cache: dict[str, torch.Tensor] = {}  # volumes shared by several pairs are enhanced once

    @torch.no_grad()
    def __call__(self, data: Mapping) -> dict:
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
