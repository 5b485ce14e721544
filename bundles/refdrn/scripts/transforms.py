"""Dictionary transforms of the refdrn inference pipeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, Zoom

from .checks import BundleInputError


class UpsampleToTargetd(MapTransform):
    """Trilinear upsampling of LR volumes by `scale` (``align_corners=False``, the grid REM was trained on),
    with the affine updated by MONAI's `Zoom`. scale 1 leaves the volumes unchanged."""

    def __init__(self, keys: KeysCollection, scale: float | Sequence[float] = 4, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        zoom = np.broadcast_to(np.asarray(scale, dtype=float), (3,))
        if np.any(zoom < 1):
            raise BundleInputError(f"scale must be >= 1, got {scale}")
        self.zoom = list(zoom)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if any(z != 1 for z in self.zoom):
                d[key] = Zoom(zoom=self.zoom, mode="trilinear", align_corners=False, keep_size=False)(d[key])
        return d


class WarpMovingd(MapTransform):
    """Warp `image_key` (bilinear) and, when present, `label_key` (nearest) with the DDF in `ddf_key`,
    writing ``warped_<key>``. The label is first resampled onto the DDF's grid (nearest) if needed."""

    def __init__(self, ddf_key: str = "pred", image_key: str = "sr_moving", label_key: str = "moving_label"):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.ddf_key, self.image_key, self.label_key = ddf_key, image_key, label_key
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ddf = d[self.ddf_key]
        plain_ddf = torch.as_tensor(ddf).as_subclass(torch.Tensor)[None].float()
        image = torch.as_tensor(d[self.image_key]).as_subclass(torch.Tensor)[None].float().to(plain_ddf.device)
        d[f"warped_{self.image_key}"] = MetaTensor(self.warp_image(image, plain_ddf)[0], meta=ddf.meta)
        if self.label_key in d:
            label = d[self.label_key]
            if tuple(label.shape[1:]) != tuple(ddf.shape[1:]):
                from monai.transforms import ResampleToMatch

                label = ResampleToMatch(mode="nearest")(label, img_dst=d[self.image_key])
            plain = torch.as_tensor(label).as_subclass(torch.Tensor)[None].float().to(plain_ddf.device)
            d[f"warped_{self.label_key}"] = MetaTensor(self.warp_label(plain, plain_ddf)[0].to(torch.uint8), meta=ddf.meta)
        return d
