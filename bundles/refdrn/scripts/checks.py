"""Early, explicit checks of the registration pairs a user gives the bundle: one clear message naming the
file and the problem, before anything is written. The checks every bundle shares live in `common`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .common import (  # noqa: F401  (re-exported: configs and tests use scripts.checks.*)
    BundleInputError,
    check_weights,
    checked_state,
    config_flag,
    load_checked_weights,
    load_datalist,
    volume_header,
)

DATA_HINT = "Run `python tools/make_brain_pairs.py` for the sample pairs."


def check_pairs(
    items: list[dict],
    min_size: int | Sequence[int] = 1,
    require_labels: bool = False,
    labels_on_image_grid: bool = True,
) -> list[dict]:
    """Check every pair: both images (and labels when present) readable 3D volumes on the same grid.
    With `labels_on_image_grid` false (inference on LR images), labels may be on another grid."""
    for item in items:
        for key in ("fixed_image", "moving_image"):
            if key not in item:
                raise BundleInputError(f"datalist item {item} has no '{key}' entry")
        fixed = volume_header(item["fixed_image"], min_size)
        moving = volume_header(item["moving_image"], min_size)
        if fixed.shape[:3] != moving.shape[:3] or not np.allclose(fixed.affine, moving.affine, atol=1e-3):
            raise BundleInputError(
                f"{item['moving_image']}: grid {moving.shape[:3]} does not match the fixed image "
                f"{item['fixed_image']} {fixed.shape[:3]}; resample the pair onto one grid (after affine "
                f"pre-alignment) first"
            )
        for key, ref in (("fixed_label", fixed), ("moving_label", moving)):
            if key not in item:
                if require_labels:
                    raise BundleInputError(f"datalist item {item.get('name', item)} has no '{key}' (needed for Dice)")
                continue
            label = volume_header(item[key], 1)
            if labels_on_image_grid and label.shape[:3] != ref.shape[:3]:
                raise BundleInputError(
                    f"{item[key]}: label grid {label.shape[:3]} does not match its image {ref.shape[:3]}"
                )
    return items


def checked_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    require_labels: bool = False,
    labels_on_image_grid: bool = True,
) -> list[dict]:
    """`load_datalist` + `check_pairs`, as one callable for configs (``_target_``)."""
    return check_pairs(
        load_datalist(datalist, dataset_dir, section, DATA_HINT), min_size, require_labels, labels_on_image_grid
    )
