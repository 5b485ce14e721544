"""Early, explicit checks of user input, so that bad data fails with one clear message naming the
file and the problem, before any output is written (GUIDE §2)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import load_decathlon_datalist


class BundleInputError(ValueError):
    """Raised for invalid user input: the message names the file and what is wrong with it."""


def load_datalist(datalist: str, dataset_dir: str, section: str) -> list[dict]:
    """Read one section of a Decathlon-style datalist, with paths resolved against `dataset_dir`."""
    if not os.path.isfile(datalist):
        raise BundleInputError(f"datalist not found: {datalist}. Run `python tools/fetch_sample_data.py` for the "
                               f"sample data, or pass --datalist <your.json> --dataset_dir <folder>.")
    try:
        content = json.loads(Path(datalist).read_text())
    except json.JSONDecodeError as e:
        raise BundleInputError(f"datalist {datalist} is not valid JSON: {e}") from None
    if not content.get(section):
        raise BundleInputError(f"datalist {datalist} has no items in its '{section}' list")
    return load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=section, base_dir=dataset_dir)


def check_volume_file(path: str, min_size: int | Sequence[int] = 1) -> tuple[int, ...]:
    """Check that `path` is a readable single-channel 3D volume of finite values, at least `min_size`."""
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
    mins = [min_size] * 3 if np.isscalar(min_size) else list(min_size)
    if any(s < m for s, m in zip(spatial, mins)):
        raise BundleInputError(f"{path}: shape {spatial} is smaller than the minimum {tuple(mins)} for this network")
    data = np.asanyarray(img.dataobj)
    if not np.all(np.isfinite(data)):
        raise BundleInputError(f"{path}: contains NaN or infinite values ({int((~np.isfinite(data)).sum())} voxels)")
    return spatial


def check_items(items: list[dict], keys: Sequence[str], min_size: int | Sequence[int] = 1,
                optional_keys: Sequence[str] = ()) -> list[dict]:
    """Check every file of every datalist item; returns the items unchanged so configs can chain it."""
    for item in items:
        for key in keys:
            if key not in item:
                raise BundleInputError(f"datalist item {item} has no '{key}' entry")
            check_volume_file(item[key], min_size)
        for key in optional_keys:
            if key in item:
                check_volume_file(item[key], 1)
    return items


def check_weights(path: str, network: torch.nn.Module) -> str:
    """Check that `path` holds a state dict that fits `network` exactly; returns the path."""
    checked_state(path, network)
    return path


def load_checked_weights(path: str, network: torch.nn.Module) -> torch.nn.Module:
    """Load the weights at `path` (a state dict or a training checkpoint with a "model" entry) into
    `network` after `check_weights`' checks; returns the network."""
    network.load_state_dict(checked_state(path, network))
    return network


def checked_state(path: str, network: torch.nn.Module) -> dict:
    """The state dict at `path` (unwrapped from a training checkpoint's "model" entry), if it fits
    `network` exactly; one BundleInputError naming the path otherwise."""
    if not os.path.isfile(path):
        raise BundleInputError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleInputError(f"{path}: not a loadable PyTorch state dict ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"{len(wrong)} of wrong shape (e.g. {wrong[0]}: {found[wrong[0]]} vs {expected[wrong[0]]})")
        raise BundleInputError(f"{path}: weights do not match the configured network "
                               f"{type(network).__name__}: " + "; ".join(details))
    return state


def checked_datalist(datalist: str, dataset_dir: str, section: str, keys: Sequence[str],
                     min_size: int | Sequence[int] = 1, optional_keys: Sequence[str] = ()) -> list[dict]:
    """`load_datalist` + `check_items`, as one callable for configs (``_target_``)."""
    return check_items(load_datalist(datalist, dataset_dir, section), keys, min_size, optional_keys)


def config_flag(value, name: str) -> bool:
    """A boolean config key given as a bool or as the string a command line produces
    (`--key false` reaches the config as the string "false", which Python would call true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BundleInputError(f"{name} must be true or false, got {value!r}")
