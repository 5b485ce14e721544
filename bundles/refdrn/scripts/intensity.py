"""Intensity normalisation of raw scanner volumes and its inverse, shared by rem_sr and refdrn.

REM and the ReFDRN backbone were trained on T1 volumes scaled so that the lowest value (the background) is 0 and the
99.5th percentile of the other voxels is 1, clipped to [0, 1] (``tools/fetch_sample_data.py`` and
``tools/make_brain_pairs.py`` build the sample data this way, and deform some of the scaled volumes; the paper does not
state its normalisation). Every
config of both bundles applies :class:`PercentileScaled` to the volumes it reads, so a volume in 0-4000, a volume
multiplied by 110 and a z-scored volume reach the networks in the same units, and :class:`RestoreIntensityd` maps the
images a config saves back to the input's units. A volume already in those units (the sample data) is left unchanged.

This file is a deliberate, identical copy in ``bundles/{rem_sr,refdrn}/scripts/intensity.py`` (source: rem_sr; run
``python tools/sync_common.py`` after editing it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["PercentileScaled", "RestoreIntensityd", "percentile_range"]

# torch.quantile's input limit is 16M elements; a regular subsample of this many voxels gives the percentile
MAX_PERCENTILE_VOXELS = 1_000_000
# a volume whose maximum is at most this far above its 99.5th percentile (from the background) was already clipped
CLIPPED_RATIO = 1.05


def percentile_range(
    volume: torch.Tensor, percentile: float = 99.5, clipped_ratio: float = CLIPPED_RATIO
) -> tuple[float, float]:
    """The normalisation range of one volume: its lowest value and the `percentile` of the voxels above it.

    The lowest value is the background of a skull-stripped or magnitude MR volume (0 for the sample data, the most
    negative value for a z-scored volume); the percentile is taken over the other voxels (at most about one million,
    a regular subsample), so both move with a global scale and offset of the volume.

    A volume whose maximum lies within `clipped_ratio` of that percentile (measured from the lowest value) has
    already been clipped at its bright end, as the training volumes were (clipped at the 99.5th percentile of the
    template, then deformed or degraded, which lowers the percentile of the copy by up to 3% but keeps its maximum
    at the clipping level): its maximum is the upper end instead, so that such a volume is mapped exactly as it was
    trained (the sample data, x1 or x110, are left unchanged). A raw scanner volume has a bright tail (maximum well
    above the 99.5th percentile) and is scaled by the percentile. The ratio is invariant to scale and offset.

    Args:
        volume: any shape, in the scanner's intensity units.
        percentile: the percentile (0-100) of the voxels above the lowest value that is mapped to 1.
        clipped_ratio: ``(max - lowest) / (percentile - lowest)`` up to which the volume counts as already clipped.

    Returns:
        ``(offset, factor)``: the lowest value and ``upper - offset`` (``upper`` the percentile, or the maximum of an
        already clipped volume; 1.0 when no voxel is above the lowest value, i.e. a constant volume), both in the
        input's units; ``(x - offset) / factor`` is the scaled volume.

    Raises:
        ValueError: `percentile` outside [0, 100], or an empty volume.
    """
    if not 0 <= float(percentile) <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    values = torch.as_tensor(volume).as_subclass(torch.Tensor).detach().reshape(-1).double()
    if values.numel() == 0:
        raise ValueError("cannot normalise an empty volume")
    offset = float(values.min())
    above = values[values > offset]
    if above.numel() == 0:
        return offset, 1.0
    upper = float(torch.quantile(above[:: max(1, above.numel() // MAX_PERCENTILE_VOXELS)], float(percentile) / 100))
    highest = float(above.max())
    if upper > offset and highest - offset <= clipped_ratio * (upper - offset):
        upper = highest  # already clipped at the bright end: the clipping level is the training units' 1
    factor = upper - offset
    return offset, (factor if factor > 0 else 1.0)


def _entry_key(template: str | None, key: str) -> str | None:
    """`template` with ``{key}`` replaced by the image key (``"{key}_intensity_factor"`` -> ``"moving_image_..."``)."""
    return None if template is None else template.replace("{key}", str(key))


class PercentileScaled(MapTransform):
    """
    Map each volume to the training units: ``(x - lowest value) / (99.5th percentile of the voxels above it - lowest
    value)`` (:func:`percentile_range`; the maximum instead of the percentile for a volume already clipped at its
    bright end), optionally clipped to [0, 1], and remember the offset and factor.

    The result does not change when the input is multiplied by a positive number or shifted (×110, a 0-4000 scanner
    range, a z-scored volume): the networks always see the same units. A volume already scaled this way (the sample
    data: background 0, 99.5th percentile 1) is unchanged.

    Args:
        keys: the key(s) of the volumes, any shape, in the scanner's intensity units.
        percentile: the percentile (0-100) of the voxels above the lowest value that is mapped to 1.
        clip: clip the result to [0, 1], as the training volumes were (train and evaluate configs; inference keeps
            the brightest voxels above 1 so that the output can be mapped back without loss).
        factor_key: where the factor (a float, in the input's units) is stored; ``{key}`` is replaced by the image
            key (``"{key}_intensity_factor"``); None: not stored.
        offset_key: where the offset (the lowest value, in the input's units) is stored; as `factor_key`.
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        percentile: float = 99.5,
        clip: bool = False,
        factor_key: str | None = "intensity_factor",
        offset_key: str | None = "intensity_offset",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not 0 <= float(percentile) <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.clip = bool(clip)
        self.factor_key = factor_key
        self.offset_key = offset_key

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the volume(s) under ``keys`` (tensors or MetaTensors, any shape).

        Returns:
            a shallow copy of ``data`` with each volume scaled (float32, dimensionless: background 0, the percentile
            1; metadata kept), and its factor and offset under ``factor_key`` and ``offset_key`` (without ``{key}``
            in them and several keys, the last volume's).

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
            ValueError: an empty volume.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            offset, factor = percentile_range(d[key], self.percentile)
            scaled = (d[key].float() - offset) / factor
            d[key] = scaled.clamp(0.0, 1.0) if self.clip else scaled
            for template, value in ((self.factor_key, factor), (self.offset_key, offset)):
                entry = _entry_key(template, key)
                if entry is not None:
                    d[entry] = value
        return d


class RestoreIntensityd(MapTransform):
    """
    The inverse of :class:`PercentileScaled`: ``x * factor + offset``, so that saved images are in the input's
    intensity units.

    Args:
        keys: the key(s) of the volumes to map back.
        factor_key: where :class:`PercentileScaled` stored the factor (1 when absent); ``{key}`` as there.
        offset_key: where it stored the offset (0 when absent); ``{key}`` as there.
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        factor_key: str = "intensity_factor",
        offset_key: str = "intensity_offset",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.factor_key = factor_key
        self.offset_key = offset_key

    @staticmethod
    def _number(value, default: float) -> float:
        """A stored factor or offset: a number, or a batched tensor of which the first entry is used."""
        return default if value is None else float(torch.as_tensor(value).reshape(-1)[0])

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the volume(s) under ``keys`` and, optionally, the factor and offset (numbers,
                or batched tensors of which the first entry is used).

        Returns:
            a shallow copy of ``data`` with each volume mapped back to the input's units.

        Raises:
            KeyError: when a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            factor = self._number(d.get(_entry_key(self.factor_key, key)), 1.0)
            offset = self._number(d.get(_entry_key(self.offset_key, key)), 0.0)
            d[key] = d[key] * factor + offset
        return d


class ClipToInputRanged(MapTransform):
    """Clip a network output to the intensity range of the input it was computed from.

    REM's output (and an image warped from it) overshoots at edges (ringing), e.g. negative values in the
    background of an MR scan whose minimum is 0. With `enabled` the output under `keys` is clipped to ``[min, max]``
    of the volume under `ref_key` (the untouched input, in the same units after ``RestoreIntensityd``); without it
    the output is kept raw.

    Args:
        keys: the key(s) of the outputs ``[C, X, Y, Z]``, in the input's intensity units.
        ref_key: the key of the input volume whose minimum and maximum bound the outputs.
        enabled: clip (true) or keep the raw output (false): the config's ``clip_output`` flag.
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(self, keys: KeysCollection, ref_key: str, enabled: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.enabled = bool(enabled)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: one case: the outputs under ``keys`` and the input under ``ref_key``.

        Returns:
            a shallow copy of ``data`` with the outputs clipped to the input's range (unchanged when not `enabled`
            or when ``ref_key`` is absent).

        Raises:
            KeyError: a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        ref = d.get(self.ref_key)
        if not self.enabled or ref is None:
            return d
        low, high = float(ref.min()), float(ref.max())
        for key in self.key_iterator(d):
            d[key] = d[key].clamp(low, high)
        return d
