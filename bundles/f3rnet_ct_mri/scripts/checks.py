"""Early, explicit checks of the registration pairs a user gives the bundle: one clear message naming the
file and the problem, before anything is written. The checks every bundle shares live in `common`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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

DATA_HINT = "Run `python tools/make_abdomen_phantoms.py` for the sample phantoms."

DIRECTIONS = ("ct2mri", "mri2ct")


def check_direction(direction: str) -> str:
    """``ct2mri`` (moving CT, fixed MR) or ``mri2ct`` (moving MR, fixed CT)."""
    if str(direction) not in DIRECTIONS:
        raise BundleInputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return str(direction)


def load_direction_datalist(datalist: str, dataset_dir: str, section: str, direction: str | None = None) -> list[dict]:
    """`load_datalist` of the `section` list, paths resolved against `dataset_dir`. A datalist that declares
    its own ``direction`` (both data tools write one) must agree with the configured direction, since the
    direction decides which image is normalised as CT and which as MR.

    Raises:
        BundleInputError: as `load_datalist`, or the declared direction differs.
    """
    items = load_datalist(datalist, dataset_dir, section, DATA_HINT)
    if direction is not None:
        direction = check_direction(direction)
        declared = json.loads(Path(datalist).read_text()).get("direction")
        if declared is not None and declared != direction:
            raise BundleInputError(
                f"datalist {datalist} is for direction '{declared}' but the bundle runs "
                f"'{direction}'; pass --direction {declared} or the matching datalist"
            )
    return items


def check_pairs(items: list[dict], min_size: int | Sequence[int] = 1, require_labels: bool = False) -> list[dict]:
    """Check every pair: both images (and labels when present) readable 3D volumes on one grid. F3RNet
    predicts a DDF on the fixed grid from the stacked pair, so the moving image must already be resampled
    onto it (after affine pre-alignment); labels must be on their image's grid."""
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
            if label.shape[:3] != ref.shape[:3] or not np.allclose(label.affine, ref.affine, atol=1e-3):
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
    direction: str | None = None,
) -> list[dict]:
    """`load_datalist` + `check_pairs`, as one callable for configs (``_target_``)."""
    return check_pairs(load_direction_datalist(datalist, dataset_dir, section, direction), min_size, require_labels)


def inference_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    direction: str | None = None,
    moving_image: str | None = None,
    fixed_image: str | None = None,
    moving_label: str | None = None,
) -> list[dict]:
    """The pairs to register: one pair given by file (``--moving_image a --fixed_image b [--moving_label c]``),
    or else the `section` list of the datalist."""
    if moving_image or fixed_image:
        if direction is not None:
            check_direction(direction)
        if not (moving_image and fixed_image):
            raise BundleInputError("give both --moving_image and --fixed_image (or neither, to use the datalist)")
        item = {"moving_image": str(moving_image), "fixed_image": str(fixed_image)}
        if moving_label:
            item["moving_label"] = str(moving_label)
        return check_pairs([item], min_size)
    return checked_pairs(datalist, dataset_dir, section, min_size, direction=direction)
