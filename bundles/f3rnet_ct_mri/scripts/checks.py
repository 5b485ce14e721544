"""Early, explicit checks of user input (GUIDE §2): one clear message naming the file and the problem,
before anything is written."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

DIRECTIONS = ("ct2mri", "mri2ct")


class BundleInputError(ValueError):
    """Invalid user input; the message names the file and what is wrong with it."""


def check_direction(direction: str) -> str:
    """``ct2mri`` (moving CT, fixed MR) or ``mri2ct`` (moving MR, fixed CT)."""
    if str(direction) not in DIRECTIONS:
        raise BundleInputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return str(direction)


def load_datalist(datalist: str, dataset_dir: str, section: str, direction: str | None = None) -> list[dict]:
    """The `section` list of a Decathlon-style datalist, paths resolved against `dataset_dir`. A datalist that
    declares its own ``direction`` (both data tools write one) must agree with the configured direction, since
    the direction decides which image is normalised as CT and which as MR."""
    if not os.path.isfile(datalist):
        raise BundleInputError(f"datalist not found: {datalist}. Run `python tools/make_abdomen_phantoms.py` for the "
                               f"sample phantoms, or pass --datalist <your.json> --dataset_dir <folder>.")
    try:
        content = json.loads(Path(datalist).read_text())
    except json.JSONDecodeError as e:
        raise BundleInputError(f"datalist {datalist} is not valid JSON: {e}") from None
    if direction is not None:
        direction = check_direction(direction)
        declared = content.get("direction")
        if declared is not None and declared != direction:
            raise BundleInputError(f"datalist {datalist} is for direction '{declared}' but the bundle runs "
                                   f"'{direction}'; pass --direction {declared} or the matching datalist")
    if not content.get(section):
        raise BundleInputError(f"datalist {datalist} has no items in its '{section}' list")
    return load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=section, base_dir=dataset_dir)


def volume_header(path: str, min_size: int | Sequence[int] = 1, check_values: bool = True) -> nib.spatialimages.SpatialImage:
    """Check that `path` is a readable single-channel 3D volume of finite values at least `min_size`."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise BundleInputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise BundleInputError(f"{path}: not a readable NIfTI/Analyze image ({e})") from None
    shape = tuple(int(s) for s in img.shape)
    spatial = shape[:3] if len(shape) > 3 and all(s == 1 for s in shape[3:]) else shape
    if len(spatial) != 3:
        raise BundleInputError(f"{path}: expected a 3D volume, got shape {shape}")
    mins = [int(min_size)] * 3 if np.isscalar(min_size) else [int(m) for m in min_size]
    if any(s < m for s, m in zip(spatial, mins)):
        raise BundleInputError(f"{path}: shape {spatial} is smaller than the minimum {tuple(mins)} for this network")
    if check_values:
        data = np.asanyarray(img.dataobj)
        if not np.all(np.isfinite(data)):
            raise BundleInputError(f"{path}: contains NaN or infinite values ({int((~np.isfinite(data)).sum())} voxels)")
    return img


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
                f"pre-alignment) first")
        for key, ref in (("fixed_label", fixed), ("moving_label", moving)):
            if key not in item:
                if require_labels:
                    raise BundleInputError(f"datalist item {item.get('name', item)} has no '{key}' (needed for Dice)")
                continue
            label = volume_header(item[key], 1)
            if label.shape[:3] != ref.shape[:3] or not np.allclose(label.affine, ref.affine, atol=1e-3):
                raise BundleInputError(f"{item[key]}: label grid {label.shape[:3]} does not match its image "
                                       f"{ref.shape[:3]}")
    return items


def checked_pairs(datalist: str, dataset_dir: str, section: str, min_size: int | Sequence[int] = 1,
                  require_labels: bool = False, direction: str | None = None) -> list[dict]:
    """`load_datalist` + `check_pairs`, as one callable for configs (``_target_``)."""
    return check_pairs(load_datalist(datalist, dataset_dir, section, direction), min_size, require_labels)


def inference_pairs(datalist: str, dataset_dir: str, section: str, min_size: int | Sequence[int] = 1,
                    direction: str | None = None, moving_image: str | None = None, fixed_image: str | None = None,
                    moving_label: str | None = None) -> list[dict]:
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


def check_weights(path: str, network) -> str:
    """Check that `path` holds a state dict that fits `network` exactly (keys and shapes)."""
    import torch

    if not os.path.isfile(path):
        raise BundleInputError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleInputError(f"{path}: not a loadable PyTorch state dict ({str(e).splitlines()[0]})") from None
    module = network.module if hasattr(network, "module") else network
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if expected != found:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        variant = getattr(module, "f3d", "?")
        raise BundleInputError(f"{path}: weights do not match the configured network (F3RNet variant '{variant}'; "
                               f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of wrong shape"
                               + (f", e.g. {(missing + unexpected + wrong)[0]}" if missing or unexpected or wrong else "")
                               + "); check --variant and the channel settings")
    return path
