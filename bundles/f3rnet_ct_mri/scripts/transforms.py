"""Dictionary transforms of the f3rnet_ct_mri pipelines: modality-aware intensity normalisation and warping
of the moving image / label with the predicted DDF."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles

from .checks import check_direction
from .pairs import WarpMovingd  # noqa: F401  (re-exported for the configs: one implementation, scripts/pairs.py)

# which image of the pair is which modality, per direction
MODALITIES = {"ct2mri": {"moving": "ct", "fixed": "mr"}, "mri2ct": {"moving": "mr", "fixed": "ct"}}


class NormalizeCTMRd(MapTransform):
    """
    Map both images of a CT/MR pair to [0, 1], each by its modality.

    - CT: the soft-tissue window `ct_window` HU (default [-300, 500], the Learn2Reg preparation's clip) linearly to
      [0, 1], clipped (MONAI ``ScaleIntensityRange``);
    - MR: the `mr_percentiles` percentiles (default 0th and 99th) linearly to [0, 1], clipped (MR has no absolute
      scale, and the 99th percentile ignores the few brightest voxels; MONAI ``ScaleIntensityRangePercentiles``).

    `direction` says which image is CT: ``ct2mri`` = moving CT, fixed MR; ``mri2ct`` = moving MR, fixed CT.
    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 3.1 names "intensity normalization" among the standard preprocessing steps without details; the
    windows are this bundle's choice.

    Args:
        direction: ``"ct2mri"`` or ``"mri2ct"``.
        moving_key: key of the moving image [C, D, H, W].
        fixed_key: key of the fixed image [C, D, H, W].
        ct_window: the CT window ``(lo, hi)`` in HU mapped to [0, 1].
        mr_percentiles: the MR percentiles ``(lo, hi)`` (0-100) mapped to [0, 1].
        allow_missing_keys: don't raise an exception when a key is missing.

    Raises:
        BundleInputError: (a ``ValueError``) for an unknown ``direction``.
        ValueError: when ``ct_window`` is not increasing or ``mr_percentiles`` is not ``0 <= lo < hi <= 100``.
    """

    def __init__(
        self,
        direction: str,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        ct_window: Sequence[float] = (-300.0, 500.0),
        mr_percentiles: Sequence[float] = (0.0, 99.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([moving_key, fixed_key], allow_missing_keys)
        self.direction = check_direction(direction)
        lo, hi = (float(v) for v in ct_window)
        p_lo, p_hi = (float(v) for v in mr_percentiles)
        if not hi > lo or not 0 <= p_lo < p_hi <= 100:
            raise ValueError(
                f"need ct_window lo < hi and 0 <= mr_percentiles lo < hi <= 100, got {ct_window}, {mr_percentiles}"
            )
        ct = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        mr = ScaleIntensityRangePercentiles(lower=p_lo, upper=p_hi, b_min=0.0, b_max=1.0, clip=True)
        role = MODALITIES[self.direction]
        self.normalizers = {
            moving_key: ct if role["moving"] == "ct" else mr,
            fixed_key: ct if role["fixed"] == "ct" else mr,
        }

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the moving and fixed images under ``moving_key`` and ``fixed_key``.

        Returns:
            a shallow copy of ``data`` with both images as float32 in [0, 1] (CT from HU, MR from percentiles).

        Raises:
            KeyError: when an image is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizers[key](torch.as_tensor(d[key]).float())
        return d
