"""SynthSR-style training images synthesised from label maps.

Source: J. E. Iglesias et al., "SynthSR: A public AI tool to turn heterogeneous clinical brain scans into
high-resolution T1-weighted images for 3D morphometry", Science Advances 2023, and B. Billot et al., "SynthSeg:
Segmentation of brain MRI scans of any contrast and resolution without retraining", Medical Image Analysis 2023:
every label of a real label map gets a random intensity (a Gaussian mixture whose means and standard deviations
are drawn per label and per volume), then partial-volume blur. The bias field, gamma, noise and the random
deformation of the label map are MONAI's own transforms in ``train.json`` (``RandBiasFieldd``,
``RandAdjustContrastd``, ``RandGaussianNoised``, ``Rand3DElasticd``); only the label-to-image step lives here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from .common import BundleInputError
from .degradation import blur_slice_profile


class RandLabelSynthd(Randomizable, MapTransform):
    """
    Synthesise an image from an integer label map: ``image = blur(mean[label] + std[label] * N(0, 1))``.

    Per call, every label id present gets a mean intensity drawn from ``U(mean_range)`` and a within-label
    standard deviation from ``U(std_range)`` (texture and noise); label 0 (background) stays 0, as in the
    skull-stripped volumes REM is trained and tested on. The result is blurred by a Gaussian with an FWHM drawn
    from ``U(fwhm_range)`` voxels (partial volume) and clipped to [0, 1], the units of the real training volumes.
    An item without the label key (a real image) passes through unchanged, so real and synthetic items can share
    one datalist.

    Args:
        keys: the label map key, [1, D, H, W] integer ids (one key).
        image_key: where the synthesised image [1, D, H, W] float32 is written.
        mean_range: range of the per-label mean intensity.
        std_range: range of the per-label standard deviation.
        fwhm_range: range of the partial-volume blur's FWHM in voxels (0 = no blur).
        drop_labels: remove the label map from the output (it is not a training target).

    Raises:
        ValueError: for a range whose low end exceeds its high end, or negative values.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        mean_range: Sequence[float] = (0.05, 1.0),
        std_range: Sequence[float] = (0.0, 0.04),
        fwhm_range: Sequence[float] = (0.5, 2.0),
        drop_labels: bool = True,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        for name, (low, high) in (("mean_range", mean_range), ("std_range", std_range), ("fwhm_range", fwhm_range)):
            if low > high or low < 0:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {tuple((low, high))}")
        self.image_key = image_key
        self.mean_range = tuple(float(v) for v in mean_range)
        self.std_range = tuple(float(v) for v in std_range)
        self.fwhm_range = tuple(float(v) for v in fwhm_range)
        self.drop_labels = drop_labels
        self.fwhm = 0.0

    def randomize(self, data=None) -> None:
        """
        Draw the partial-volume blur with ``self.R`` (the per-label intensities are drawn in ``__call__``, once the
        number of labels is known).

        Args:
            data: unused (MONAI ``Randomizable`` signature).
        """
        self.fwhm = float(self.R.uniform(*self.fwhm_range))

    def synthesise(self, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            labels: integer label map [1, D, H, W] (any integer or float dtype holding integers).

        Returns:
            the synthesised float32 image [1, D, H, W] in [0, 1].
        """
        ids, inverse = torch.unique(
            torch.as_tensor(labels).as_subclass(torch.Tensor).round().long(), return_inverse=True
        )
        means = torch.from_numpy(self.R.uniform(*self.mean_range, size=len(ids)).astype(np.float32))
        stds = torch.from_numpy(self.R.uniform(*self.std_range, size=len(ids)).astype(np.float32))
        means[ids == 0], stds[ids == 0] = 0.0, 0.0
        noise = torch.from_numpy(self.R.standard_normal(inverse.shape).astype(np.float32))
        image = means[inverse] + stds[inverse] * noise
        # an FWHM of one voxel or less is no blur on the voxel grid (blur_slice_profile leaves such axes alone)
        image = blur_slice_profile(image, [self.fwhm] * 3, "gaussian")
        return image.clamp_(0.0, 1.0)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary; when it holds the label map under ``keys``, the image is synthesised from it.

        Returns:
            a shallow copy of ``data`` with ``image_key`` set (keeping the label map's metadata) and the label map
            removed when ``drop_labels``; unchanged (but copied) when the label key is absent.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize()
            labels = d[key]
            image = self.synthesise(labels)
            if isinstance(labels, MetaTensor):
                image = MetaTensor(image, meta=labels.meta, applied_operations=[])
            d[self.image_key] = image
            if self.drop_labels:
                d.pop(key)
        return d


class ForegroundWeightd(MapTransform):
    """
    The sampling weight of ``RandWeightedCropd``: the intensity of a real image, or 1 inside the labels of a label
    map (0 outside), so that patches of either kind are drawn from the head rather than the background.

    Args:
        keys: the image key (weight = intensity, clamped at 0) and the label map key (weight = label > 0), in
            that order; an item holds one of them.
        out_key: where the weight map [1, D, H, W] float32 is written.

    Raises:
        ValueError: when ``keys`` is not two keys.
    """

    def __init__(self, keys: KeysCollection, out_key: str = "weight"):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise ValueError(f"ForegroundWeightd needs [image key, label key], got {list(self.keys)}")
        self.out_key = out_key

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the image or the label map.

        Returns:
            a shallow copy of ``data`` with the weight map under ``out_key``.

        Raises:
            KeyError: when the item holds neither key.
        """
        d = dict(data)
        image_key, label_key = self.keys
        if image_key in d:
            d[self.out_key] = torch.as_tensor(d[image_key]).float().clamp(min=0)
        elif label_key in d:
            d[self.out_key] = (torch.as_tensor(d[label_key]) > 0).float()
        else:
            raise KeyError(
                f"ForegroundWeightd: the item holds neither {image_key!r} nor {label_key!r} (keys {sorted(d)})"
            )
        return d


def mix_weights(items: Sequence[Mapping], synthetic_fraction: float, label_key: str = "labels") -> list[float]:
    """
    Per-item sampling weights that draw label-map items (synthetic images) with probability ``synthetic_fraction``
    and real images otherwise, whatever the number of each in the datalist.

    Args:
        items: the training datalist items; an item with ``label_key`` is a label map.
        synthetic_fraction: the expected fraction of synthetic samples, in [0, 1].
        label_key: the label-map key.

    Returns:
        one weight per item (summing to 1).

    Raises:
        BundleInputError: (a ValueError) for a fraction outside [0, 1], or one that asks for a kind of item the
            datalist lacks.
    """
    if not 0 <= synthetic_fraction <= 1:
        raise BundleInputError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
    synthetic = [label_key in item for item in items]
    n_synth = sum(synthetic)
    n_real = len(items) - n_synth
    if synthetic_fraction > 0 and n_synth == 0:
        raise BundleInputError(
            f"synthetic_fraction is {synthetic_fraction} but the training datalist has no {label_key!r} items "
            "(label maps); build them with tools/make_sr_training_data.py or set --synthetic_fraction 0"
        )
    if synthetic_fraction < 1 and n_real == 0:
        raise BundleInputError(
            f"synthetic_fraction is {synthetic_fraction} but the training datalist has only label maps; "
            "set --synthetic_fraction 1 or add real images"
        )
    return [synthetic_fraction / n_synth if s else (1 - synthetic_fraction) / n_real for s in synthetic]


def mix_sampler(
    items: Sequence[Mapping], synthetic_fraction: float, num_samples: int, label_key: str = "labels"
) -> torch.utils.data.WeightedRandomSampler:
    """
    A PyTorch ``WeightedRandomSampler`` (with replacement) over the training items with :func:`mix_weights`.

    Args:
        items: the training datalist items.
        synthetic_fraction: the expected fraction of synthetic samples.
        num_samples: samples per pass of the data loader (one trainer epoch's worth).
        label_key: the label-map key.

    Returns:
        the sampler.

    Raises:
        BundleInputError: see :func:`mix_weights`.
    """
    weights = torch.tensor(mix_weights(items, synthetic_fraction, label_key), dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=int(num_samples), replacement=True)
