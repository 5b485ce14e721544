"""Dictionary transforms of the refdrn inference pipeline.

The cascade takes trilinear-upsampled LR images (K. Sun and S. Simon, "A Resolution Enhancement Plug-in for
Deformable Registration of Medical Images", Sections III-A and IV-D) and returns a DDF in voxels that MONAI's
``Warp`` applies.
"""

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
    """
    Trilinear upsampling of LR volumes by `scale` (``align_corners=False``, the grid REM was trained on),
    with the affine updated by MONAI's ``Zoom`` (same field of view, voxel size divided by `scale`). scale 1
    leaves the volumes unchanged.

    Args:
        keys: the key(s) of the LR MetaTensors [C, d, h, w].
        scale: the upsampling factor (>= 1), one number or one per spatial axis.
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        BundleInputError: (a ``ValueError``) when a factor is below 1.
    """

    def __init__(self, keys: KeysCollection, scale: float | Sequence[float] = 4, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        zoom = np.broadcast_to(np.asarray(scale, dtype=float), (3,))
        if np.any(zoom < 1):
            raise BundleInputError(f"scale must be >= 1, got {scale}")
        self.zoom = list(zoom)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the LR MetaTensor(s) [C, d, h, w] under ``keys``.

        Returns:
            a shallow copy of ``data`` with each volume upsampled to [C, D, H, W] and its affine updated.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            if any(z != 1 for z in self.zoom):
                d[key] = Zoom(zoom=self.zoom, mode="trilinear", align_corners=False, keep_size=False)(d[key])
        return d


class WarpMovingd(MapTransform):
    """
    Warp `image_key` (bilinear, border padding) and, when present, `label_key` (nearest, zero padding, uint8)
    with the DDF in `ddf_key` (voxels, MONAI ``Warp`` convention), writing ``warped_<key>`` with the DDF's
    metadata. The label is first resampled onto the image's grid (nearest, MONAI ``ResampleToMatch``) if its size
    differs from the DDF's.

    Args:
        ddf_key: key of the DDF MetaTensor [3, D, H, W] (voxels).
        image_key: key of the image to warp [C, D, H, W] on the DDF's grid (the SR moving image by default).
        label_key: key of the moving label map [1, d, h, w] (optional in the data).
    """

    def __init__(self, ddf_key: str = "pred", image_key: str = "sr_moving", label_key: str = "moving_label"):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.ddf_key, self.image_key, self.label_key = ddf_key, image_key, label_key
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the DDF under ``ddf_key``, the image under ``image_key`` and, optionally,
                the moving label under ``label_key``.

        Returns:
            a shallow copy of ``data`` with ``warped_<image_key>`` (float32 [C, D, H, W]) and, when the label is
            present, ``warped_<label_key>`` (uint8 [1, D, H, W]).

        Raises:
            KeyError: when ``ddf_key`` or ``image_key`` is missing.
            ValueError: when the image's spatial size differs from the DDF's (raised by MONAI's ``Warp``).
        """
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
            warped = self.warp_label(plain, plain_ddf)[0].to(torch.uint8)
            d[f"warped_{self.label_key}"] = MetaTensor(warped, meta=ddf.meta)
        return d
